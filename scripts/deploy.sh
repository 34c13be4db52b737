#!/usr/bin/env bash
# Deploy the prediction service to a Kubernetes environment: the one way people and the GitHub workflows do it.
#   render deploy/k8s/overlays/ENV with the image IMAGE:TAG -> apply -> wait for the rollout -> smoke test
#   (make smoke through a port-forward to a new pod; PUBLIC_URL's /health and a closed /admin when given)
#   -> on any failure after the apply: kubectl rollout undo (and `catdog rollback` of @champion when
#   ROLLBACK_MODEL=1 and this deploy moved the model), an alert, exit 1.
#
# Usage: scripts/deploy.sh ENV TAG            ENV: a folder of deploy/k8s/overlays (staging, production)
#        scripts/deploy.sh --render ENV TAG   print the manifests it would apply; touches no cluster
#                                             TAG: the image tag (the git SHA CI pushed)
# Environment:
#   IMAGE              image repository (default ghcr.io/$GITHUB_REPOSITORY, lower-cased; IMAGE=catdog for kind)
#   KUBE_CONTEXT       kubectl context (default: the current one)
#   PUBLIC_HOST        the Ingress host and its TLS certificate's name (production)
#   PUBLIC_URL         the public base URL: /health must answer 200 there, POST /admin/reload 404
#   SYNC_SECRET=1      create/update the pods' Secret catdog-serving-secrets from ADMIN_API_KEY, FEEDBACK_API_KEY
#                      (the key POST /feedback needs; unset = anyone who got a prediction may label it) and the registry's
#                      READ-ONLY serving user: SERVING_MLFLOW_TRACKING_USERNAME / _PASSWORD (and
#                      SERVING_MLFLOW_TRACKING_URI, default MLFLOW_TRACKING_URI). Never the pipeline's
#                      MLFLOW_TRACKING_USERNAME / _PASSWORD (this script's own, for `make rollback`), never S3 keys.
#   ROLLBACK_MODEL=1   on failure also roll @champion back if this deploy moved it (see fail())
#   ROLLOUT_TIMEOUT    how long the rollout may take (default 300s)
#   SMOKE_CMD          the smoke test, {url} replaced by the service's URL (default: make smoke URL={url})
#   SMOKE_PORT         local port of the smoke test's port-forward (default 18080)
#   DISCORD_WEBHOOK_URL, CATDOG_ALERT_URLS   where a failure is announced (curl; Apprise URLs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
APP=catdog
SECRET=catdog-serving-secrets
# The pods' Secret: key=the variable it comes from. Least privilege: the serving user reads the registry and
# can move no alias; the MLflow server proxies the artifacts (--serve-artifacts), so pods hold no S3 keys.
SECRET_KEYS=(ADMIN_API_KEY=ADMIN_API_KEY FEEDBACK_API_KEY=FEEDBACK_API_KEY MLFLOW_TRACKING_URI=SERVING_MLFLOW_TRACKING_URI
    MLFLOW_TRACKING_USERNAME=SERVING_MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD=SERVING_MLFLOW_TRACKING_PASSWORD)
# Keys the pods' Secret must never hold: storage credentials (a Secret made out of band is checked too).
FORBIDDEN_KEYS='^(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN)$'
SELECTOR=app.kubernetes.io/name=catdog,app.kubernetes.io/component=api

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'deploy: %s\n' "$*" >&2; exit 2; }

RENDER_ONLY=0
if [ "${1:-}" = "--render" ]; then RENDER_ONLY=1; shift; fi
case "${1:-}" in -h | --help) usage 0 ;; esac
[ $# -eq 2 ] || usage 2
ENV_NAME=$1
TAG=$2
OVERLAY=deploy/k8s/overlays/$ENV_NAME
if [ ! -f "$OVERLAY/kustomization.yaml" ]; then
    envs=(deploy/k8s/overlays/*/)
    envs=("${envs[@]#deploy/k8s/overlays/}")
    die "no overlay $OVERLAY (environments: ${envs[*]%/})"
fi
[[ $TAG =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "'$TAG' is not a valid image tag"
if [ -z "${IMAGE:-}" ]; then
    [ -n "${GITHUB_REPOSITORY:-}" ] || die "set IMAGE (e.g. IMAGE=ghcr.io/OWNER/REPO, or IMAGE=catdog for kind)"
    IMAGE=ghcr.io/${GITHUB_REPOSITORY,,}
fi
NAMESPACE=$(sed -n 's/^namespace: *//p' "$OVERLAY/kustomization.yaml")
[ -n "$NAMESPACE" ] || die "$OVERLAY/kustomization.yaml sets no namespace"
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-300s}
SMOKE_CMD=${SMOKE_CMD:-make --no-print-directory smoke URL=\{url\}}
SMOKE_PORT=${SMOKE_PORT:-18080}

bash scripts/lint_deploy.sh ensure-kubectl
KUBECTL=(kubectl)
[ -n "${KUBE_CONTEXT:-}" ] && KUBECTL+=(--context "$KUBE_CONTEXT")
K=("${KUBECTL[@]}" --namespace "$NAMESPACE")

WORK=$(mktemp -d)
PORT_FORWARD_PID=
cleanup() {
    set +e  # the port-forward ends by our kill: its status is no failure of the deploy
    if [ -n "$PORT_FORWARD_PID" ]; then kill "$PORT_FORWARD_PID" 2>/dev/null; wait "$PORT_FORWARD_PID" 2>/dev/null; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- render: the overlay as a base, the image and (optionally) the public host set on top. Relative paths and
# `bases`/`patchesJson6902` because kustomize v2.0.3 (Debian's kubectl 1.20) allows nothing else.
render() {
    local rel
    rel=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$ROOT/$OVERLAY" "$WORK")
    {
        printf 'bases:\n  - %s\nimages:\n  - name: %s\n    newName: %s\n    newTag: "%s"\n' \
            "$rel" "$APP" "$IMAGE" "$TAG"
        if [ -n "${PUBLIC_HOST:-}" ] && grep -q '^  - ingress.yaml' "$OVERLAY/kustomization.yaml"; then
            printf 'patchesJson6902:\n  - target:\n      group: networking.k8s.io\n      version: v1\n'
            printf '      kind: Ingress\n      name: %s\n      namespace: %s\n    path: host.yaml\n' "$APP" "$NAMESPACE"
        fi
    } >"$WORK/kustomization.yaml"
    if [ -n "${PUBLIC_HOST:-}" ]; then
        [[ $PUBLIC_HOST =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] || die "PUBLIC_HOST '$PUBLIC_HOST' is not a host name"
        printf -- '- op: replace\n  path: /spec/rules/0/host\n  value: %s\n' "$PUBLIC_HOST" >"$WORK/host.yaml"
        printf -- '- op: replace\n  path: /spec/tls/0/hosts/0\n  value: %s\n' "$PUBLIC_HOST" >>"$WORK/host.yaml"
    fi
    kubectl kustomize "$WORK" 2> >(grep -v "^# Warning: '[a-zA-Z0-9]*' is deprecated" >&2)
}

render >"$WORK/manifests.yaml"
if [ "$RENDER_ONLY" = 1 ]; then
    cat "$WORK/manifests.yaml"
    exit 0
fi

alert() {
    local text="catdog deploy to $ENV_NAME of $IMAGE:$TAG failed: $1"
    [ -n "${GITHUB_SERVER_URL:-}" ] && text+=" ($GITHUB_SERVER_URL/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID)"
    printf '::error::%s\n' "$text"
    if [ -n "${CATDOG_ALERT_URLS:-}" ] && [ -x .venv/bin/apprise ]; then
        # shellcheck disable=SC2086  # whitespace-separated Apprise URLs
        if ! .venv/bin/apprise -t "catdog deploy failed" -b "$text" $CATDOG_ALERT_URLS; then
            say "warning: the Apprise alert was not sent"
        fi
    fi
    if [ -n "${DISCORD_WEBHOOK_URL:-}" ]; then
        if ! python3 -c 'import json, sys; print(json.dumps({"content": sys.argv[1][:1900]}))' "$text" |
            curl -fsS --max-time 15 -H 'Content-Type: application/json' --data-binary @- "$DISCORD_WEBHOOK_URL"; then
            say "warning: the Discord alert was not sent"
        fi
    fi
}

PREVIOUS_REVISION=
MODEL_SHIPPED=
MODEL_BEFORE=
MODEL_ANNOTATION=catdog/model-version
champion_version() {
    .venv/bin/python -c 'from catdog.config import Project; from catdog.registry.promotion import open_registry
champion = open_registry(Project()).by_alias("champion"); print(champion.version if champion else "")'
}
fail() {
    local why=$1 rolled="no previous revision: nothing rolled back"
    say "FAILED: $why"
    if [ -n "$PREVIOUS_REVISION" ]; then
        say "rolling back deployment/$APP to revision $PREVIOUS_REVISION"
        if "${K[@]}" rollout undo "deployment/$APP" --to-revision="$PREVIOUS_REVISION" &&
            "${K[@]}" rollout status "deployment/$APP" --timeout="$ROLLOUT_TIMEOUT"; then
            rolled="rolled back to revision $PREVIOUS_REVISION"
        else
            rolled="ROLLBACK OF THE DEPLOYMENT FAILED too"
        fi
    fi
    if [ "${ROLLBACK_MODEL:-0}" = 1 ]; then
        # The model is rolled back only when this deploy moved it: @champion (read before the apply) is not the
        # version the last good deploy ran (the Deployment's annotation $MODEL_ANNOTATION). A deploy of the same
        # model failing (kubectl trouble, a retry) says nothing about the model; --expect-champion refuses when
        # @champion moved meanwhile (another rollback, a promotion), so no one else's move is undone.
        if [ -z "$MODEL_SHIPPED" ] || [ -z "$MODEL_BEFORE" ] || [ "$MODEL_SHIPPED" = "$MODEL_BEFORE" ]; then
            rolled+="; @champion ${MODEL_SHIPPED:-(none)} left alone: this deploy did not move the model"
            rolled+=" (the last good deploy ran ${MODEL_BEFORE:-an unrecorded version})"
        else
            say "model $MODEL_BEFORE -> $MODEL_SHIPPED came with this deploy: catdog rollback of @champion $MODEL_SHIPPED"
            if .venv/bin/python -m catdog rollback --expect-champion "$MODEL_SHIPPED" \
                --reason "deploy of $IMAGE:$TAG to $ENV_NAME failed: $why"; then
                rolled+="; @champion $MODEL_SHIPPED rolled back"
            else rolled+="; catdog rollback of @champion $MODEL_SHIPPED FAILED or was refused"
            fi
        fi
    fi
    alert "$why; $rolled"
    exit 1
}

# --- the Secret: created out of band, or here from the environment (the workflows' environment secrets).
if [ "${SYNC_SECRET:-0}" = 1 ]; then
    SERVING_MLFLOW_TRACKING_URI=${SERVING_MLFLOW_TRACKING_URI:-${MLFLOW_TRACKING_URI:-}}
    if [ -n "${MLFLOW_TRACKING_USERNAME:-}" ] && [ -z "${SERVING_MLFLOW_TRACKING_USERNAME:-}" ]; then
        die "SYNC_SECRET=1: the registry has users but SERVING_MLFLOW_TRACKING_USERNAME is unset: give the pods the read-only serving user (deploy/README.md), never the pipeline's"
    fi
    if [ -n "${SERVING_MLFLOW_TRACKING_USERNAME:-}" ] &&
        [ "${SERVING_MLFLOW_TRACKING_USERNAME}" = "${MLFLOW_TRACKING_USERNAME:-}" ]; then
        die "SERVING_MLFLOW_TRACKING_USERNAME is the pipeline's user ($MLFLOW_TRACKING_USERNAME): the pods must get the read-only serving user"
    fi
    args=()
    for pair in "${SECRET_KEYS[@]}"; do
        key=${pair%%=*} var=${pair#*=}
        [ -n "${!var:-}" ] && args+=("--from-literal=$key=${!var}")
    done
    [ ${#args[@]} -gt 0 ] || die "SYNC_SECRET=1 but none of ${SECRET_KEYS[*]#*=} is set"
    say "secret/$SECRET in $NAMESPACE from the environment (${#args[@]} keys)"
    "${KUBECTL[@]}" create namespace "$NAMESPACE" --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f - >/dev/null
    "${K[@]}" create secret generic "$SECRET" "${args[@]}" --dry-run=client -o yaml | "${K[@]}" apply -f - >/dev/null
elif ! keys=$("${K[@]}" get secret "$SECRET" -o go-template='{{range $k, $v := .data}}{{$k}}{{"\n"}}{{end}}' 2>/dev/null); then
    die "secret/$SECRET is missing in namespace $NAMESPACE: create it (deploy/k8s/base/secret.example.yaml) or set SYNC_SECRET=1"
elif forbidden=$(grep -E "$FORBIDDEN_KEYS" <<<"$keys"); then
    die "secret/$SECRET in $NAMESPACE holds storage credentials ($(tr '\n' ' ' <<<"$forbidden")): the pods need none (deploy/README.md); remove them"
fi

PREVIOUS_REVISION=$("${K[@]}" get "deployment/$APP" --ignore-not-found \
    -o jsonpath='{.metadata.annotations.deployment\.kubernetes\.io/revision}')
if [ "${ROLLBACK_MODEL:-0}" = 1 ]; then
    MODEL_SHIPPED=$(champion_version) || die "cannot read @champion from the registry (ROLLBACK_MODEL=1)"
    MODEL_BEFORE=$("${K[@]}" get "deployment/$APP" --ignore-not-found \
        -o jsonpath="{.metadata.annotations.$MODEL_ANNOTATION}")
    say "model: @champion ${MODEL_SHIPPED:-none}; the last good deploy ran ${MODEL_BEFORE:-an unrecorded version}"
fi
say "deploying $IMAGE:$TAG to $ENV_NAME (namespace $NAMESPACE; current revision: ${PREVIOUS_REVISION:-none})"
"${KUBECTL[@]}" apply -f "$WORK/manifests.yaml" || fail "kubectl apply"
"${K[@]}" rollout status "deployment/$APP" --timeout="$ROLLOUT_TIMEOUT" || fail "the rollout did not finish in $ROLLOUT_TIMEOUT"

# --- smoke test against one new pod (the metrics check needs the predictions and /metrics on the same pod).
POD=$("${K[@]}" get pods -l "$SELECTOR" -o \
    jsonpath='{range .items[?(@.status.phase=="Running")]}{.metadata.name} {.spec.containers[0].image} {.metadata.deletionTimestamp}{"\n"}{end}' |
    awk -v image="$IMAGE:$TAG" '$2 == image && $3 == "" {print $1; exit}')
[ -n "$POD" ] || fail "no running pod of $IMAGE:$TAG after the rollout"
say "smoke test on pod/$POD (port-forward to 127.0.0.1:$SMOKE_PORT)"
"${K[@]}" port-forward "pod/$POD" "$SMOKE_PORT:8000" >"$WORK/port-forward.log" 2>&1 &
PORT_FORWARD_PID=$!
for _ in $(seq 60); do
    curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$SMOKE_PORT/health" 2>/dev/null && break
    kill -0 "$PORT_FORWARD_PID" 2>/dev/null || break
    sleep 0.5
done
SMOKE=${SMOKE_CMD//\{url\}/http://127.0.0.1:$SMOKE_PORT}
say "$SMOKE"
bash -c "$SMOKE" || fail "smoke test ($SMOKE) on pod/$POD; port-forward log: $(tr '\n' ' ' <"$WORK/port-forward.log")"

if [ -n "${PUBLIC_URL:-}" ]; then
    url=${PUBLIC_URL%/}
    say "public URL $url: /health answers, /admin is not exposed"
    curl -fsS --max-time 15 -o /dev/null "$url/health" || fail "$url/health does not answer 200"
    code=$(curl -s --max-time 15 -o /dev/null -w '%{http_code}' -X POST "$url/admin/reload")
    [ "$code" = 404 ] || fail "$url/admin/reload answered $code: the admin routes must not be public (expected 404)"
fi
if [ -n "$MODEL_SHIPPED" ]; then  # the model version this environment ran through a good deploy: see fail()
    "${K[@]}" annotate "deployment/$APP" "$MODEL_ANNOTATION=$MODEL_SHIPPED" --overwrite >/dev/null ||
        say "warning: deployment/$APP not annotated $MODEL_ANNOTATION=$MODEL_SHIPPED"
fi
say "deployed $IMAGE:$TAG to $ENV_NAME"
