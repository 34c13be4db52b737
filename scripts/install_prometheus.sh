#!/usr/bin/env bash
# Install Debian's `prometheus` package (promtool + prometheus) for the monitoring tests
# (tests/integration/test_monitoring_rules.py), when either tool is missing. Idempotent and quiet:
# prints nothing when both are already there; `apt-get update` runs only when the install fails without it.
# Without apt-get, root or passwordless sudo it says so and exits 0 (the monitoring tests then fail and say
# why); under CI (CI=true: GitHub Actions, .ci/run) it exits 1, so the run stops at the cause.
set -uo pipefail

PACKAGE=prometheus

have_tools() {
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1
}

have_tools && exit 0

warn() { echo "install_prometheus: $*" >&2; }
# What cannot be installed: a warning, and under CI a failure.
give_up() {
	warn "$*"
	case "${CI:-}" in 1 | [Tt]rue | [Yy]es) warn "CI=true: failing"; exit 1 ;; esac
	exit 0
}

if ! command -v apt-get >/dev/null 2>&1; then
	give_up "promtool/prometheus missing and no apt-get here: install Prometheus 2.x yourself (the monitoring tests need both)"
fi
if [ "$(id -u)" = 0 ]; then
	SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
	SUDO=(sudo -n)
else
	give_up "promtool/prometheus missing and neither root nor passwordless sudo: run 'apt-get install $PACKAGE' as root"
fi

echo "Installing Debian's $PACKAGE package (promtool, prometheus) with apt-get"
# Wait for the dpkg lock (another apt-get may be running) instead of failing at once.
APT_OPTS=(-y -qq -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" --no-install-recommends)
# Try with the package lists already on the machine first; refresh them only when that fails.
if ! "${APT[@]}" install "$PACKAGE" >/dev/null 2>&1; then
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" update >/dev/null \
		&& "${APT[@]}" install "$PACKAGE" >/dev/null \
		|| give_up "apt-get could not install $PACKAGE: the monitoring tests will fail"
fi
# The package's init script may have started a system-wide Prometheus on :9090 (not where policy-rc.d
# forbids it, as in containers); the tests never use it: they start their own on a free port.
if have_tools; then
	promtool --version 2>&1 | head -n 1
else
	give_up "$PACKAGE installed but promtool/prometheus still not on PATH"
fi
exit 0
