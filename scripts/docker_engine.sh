#!/usr/bin/env bash
# The container engine for the image and compose tests (tests/containers/) and `make docker`.
#
#   scripts/docker_engine.sh install      Debian's docker.io + debootstrap with apt-get, when missing
#   scripts/docker_engine.sh start        start dockerd (overlay2) in the background unless an engine answers;
#                                         prints "started PID" when it started one, else "running"
#   scripts/docker_engine.sh stop [PID]   stop the dockerd this script started (its PID file, or PID)
#   scripts/docker_engine.sh base-image   make the local base image (TAG) unless it exists: debootstrap
#                                         bookworm minbase with python3, python3-venv, python3-pip and this
#                                         machine's CA bundle, imported with `docker import`
#   scripts/docker_engine.sh all          install + start + base-image (`make docker`)
#   scripts/docker_engine.sh status       whether an engine answers, and the base image
#
# Why a local base image: where Docker Hub cannot be reached (these machines, air-gapped CI) nothing can be
# pulled, so the Dockerfiles take their base as a build argument (BASE_IMAGE) and the tests pass this one.
# The CA bundle goes in so that pip/uv reach PyPI through a TLS-intercepting proxy.
#
# Environment: CATDOG_BASE_IMAGE (TAG, default catdog-base:bookworm; another name is pulled instead, e.g. the
# official python image where Docker Hub is reachable), CATDOG_DOCKERD_DIR (PID file and log, default
# /tmp/catdog-dockerd), MIRROR (Debian mirror; default: the one apt already uses).
set -euo pipefail

BASE_TAG=${CATDOG_BASE_IMAGE:-catdog-base:bookworm}
STATE_DIR=${CATDOG_DOCKERD_DIR:-/tmp/catdog-dockerd}
PID_FILE=$STATE_DIR/dockerd.pid
LOG_FILE=$STATE_DIR/dockerd.log
SUITE=bookworm

say() { echo "docker_engine: $*" >&2; }
die() {
	say "$*"
	exit 1
}

sudo_cmd() {
	if [ "$(id -u)" = 0 ]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		sudo -n "$@"
	else
		die "needs root or passwordless sudo for: $*"
	fi
}

engine_answers() { docker info >/dev/null 2>&1; }

install() {
	local missing=()
	command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
	command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
	command -v docker >/dev/null 2>&1 || missing+=(docker.io)
	[ ${#missing[@]} -eq 0 ] && return 0
	command -v apt-get >/dev/null 2>&1 || die "no apt-get here: install Docker and debootstrap yourself"
	say "installing ${missing[*]} with apt-get"
	local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)
	# The package lists already on the machine first; refresh them only when that fails.
	if ! sudo_cmd "${apt[@]}" install --no-install-recommends docker.io debootstrap >/dev/null 2>&1; then
		sudo_cmd "${apt[@]}" update >/dev/null
		sudo_cmd "${apt[@]}" install --no-install-recommends docker.io debootstrap >/dev/null
	fi
}

start() {
	if engine_answers; then
		echo running
		return 0
	fi
	command -v dockerd >/dev/null 2>&1 || die "dockerd not installed (scripts/docker_engine.sh install)"
	[ "$(id -u)" = 0 ] || die "dockerd is not running and only root can start it here"
	mkdir -p "$STATE_DIR"
	# Its own session, stdin/stdout detached: the caller (make, pytest) neither waits for it nor signals it.
	setsid dockerd --storage-driver=overlay2 </dev/null >"$LOG_FILE" 2>&1 &
	local pid=$!
	echo "$pid" >"$PID_FILE"
	for _ in $(seq 1 150); do
		if engine_answers; then
			say "dockerd started (pid $pid, log $LOG_FILE)"
			echo "started $pid"
			return 0
		fi
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.2
	done
	kill "$pid" 2>/dev/null || true
	rm -f "$PID_FILE"
	tail -n 20 "$LOG_FILE" >&2 || true
	die "dockerd did not come up (log $LOG_FILE)"
}

stop() {
	local pid=${1:-}
	if [ -z "$pid" ]; then
		[ -f "$PID_FILE" ] || {
			say "no dockerd started by this script"
			return 0
		}
		pid=$(cat "$PID_FILE")
	fi
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid"
		for _ in $(seq 1 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.2
		done
		kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
		say "dockerd (pid $pid) stopped"
	fi
	if [ -f "$PID_FILE" ] && [ "$(cat "$PID_FILE")" = "$pid" ]; then rm -f "$PID_FILE"; fi
}

mirror() {
	if [ -n "${MIRROR:-}" ]; then
		echo "$MIRROR"
		return
	fi
	local found=""
	if [ -f /etc/apt/sources.list.d/debian.sources ]; then
		found=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' \
			/etc/apt/sources.list.d/debian.sources)
	fi
	if [ -z "$found" ] && [ -f /etc/apt/sources.list ]; then
		found=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) {print $i; exit}}' \
			/etc/apt/sources.list)
	fi
	echo "${found:-http://deb.debian.org/debian}"
}

base_image() {
	engine_answers || die "no engine answers (scripts/docker_engine.sh start)"
	if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
		say "base image $BASE_TAG exists"
		return 0
	fi
	case "$BASE_TAG" in
	catdog-base:*) ;;
	*)
		# Another base (e.g. the official python image on a machine that reaches Docker Hub): pull it.
		docker pull -q "$BASE_TAG" >/dev/null || die "cannot pull $BASE_TAG"
		return 0
		;;
	esac
	command -v debootstrap >/dev/null 2>&1 || die "debootstrap not installed (scripts/docker_engine.sh install)"
	if [ "$(id -u)" != 0 ]; then
		sudo -n true 2>/dev/null || die "debootstrap needs root or passwordless sudo"
		exec sudo -n env CATDOG_BASE_IMAGE="$BASE_TAG" MIRROR="$(mirror)" bash "$0" base-image
	fi
	local url rootfs started
	url=$(mirror)
	started=$(date +%s)
	rootfs=$(mktemp -d /var/tmp/catdog-rootfs.XXXXXX)
	# shellcheck disable=SC2064
	trap "rm -rf '$rootfs'" EXIT
	say "debootstrap $SUITE from $url (about a minute)"
	debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
		"$SUITE" "$rootfs" "$url" >"$rootfs.log" 2>&1 || {
		tail -n 20 "$rootfs.log" >&2
		die "debootstrap failed"
	}
	rm -f "$rootfs.log"
	# This machine's CA bundle (it may trust a TLS-intercepting proxy): as the bundle, and as a local
	# certificate so that a later update-ca-certificates (apt-get install in a derived image) keeps it.
	if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
		cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
		mkdir -p "$rootfs/usr/local/share/ca-certificates"
		cp /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
	fi
	rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
		"$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
		"$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
		"$rootfs"/var/cache/debconf/*-old
	find "$rootfs/usr/lib/python3" -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
	tar --numeric-owner -C "$rootfs" -c . | docker import \
		-c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		-c 'ENV LANG=C.UTF-8' \
		-c 'CMD ["/bin/bash"]' \
		-m "debootstrap $SUITE minbase + python3, python3-venv, python3-pip, CA bundle" - "$BASE_TAG" >/dev/null
	say "base image $BASE_TAG made in $(($(date +%s) - started))s ($(docker image inspect -f '{{.Size}}' "$BASE_TAG" |
		awk '{printf "%.0f MB", $1 / 1e6}'))"
}

status() {
	if engine_answers; then
		echo "engine: $(docker version -f 'server {{.Server.Version}}, client {{.Client.Version}}' 2>/dev/null)"
	else
		echo "engine: not answering"
	fi
	[ -f "$PID_FILE" ] && echo "dockerd started by this script: pid $(cat "$PID_FILE")"
	if engine_answers && docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
		echo "base image: $BASE_TAG"
	else
		echo "base image: $BASE_TAG missing"
	fi
}

case "${1:-}" in
install) install ;;
start) start ;;
stop) stop "${2:-}" ;;
base-image) base_image ;;
all)
	install
	start >/dev/null
	base_image
	;;
status) status ;;
*)
	sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
	;;
esac
