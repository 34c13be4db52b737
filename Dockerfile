# The prediction service (api/): FastAPI + ONNX Runtime, no torch, no training code. See docker/README.md.
#
#   docker build -t catdog-api .                                   # official Python base from Docker Hub
#   docker build --build-arg BASE_IMAGE=catdog-base:bookworm -t catdog-api .    # a locally made base
#   docker run -p 8000:8000 -e MODEL_URI=models:/catdog@champion -e MLFLOW_TRACKING_URI=http://mlflow:5000 catdog-api
#
# The model is resolved when the container starts (MODEL_URI: an MLflow URI, or a folder mounted at /models);
# --build-arg MODEL_DIR=models bakes the exported model into /models for air-gapped deploys.
# The dependency set is the lock's `serve` extra (uv export), installed with hashes into /opt/venv.
# Works on the official image (python at /usr/local/bin) and on a Debian base with python3 + python3-venv.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: the locked serving environment in /opt/venv ----
FROM ${BASE_IMAGE} AS builder

ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NATIVE_TLS=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy

SHELL ["/bin/sh", "-eu", "-c"]
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --quiet "uv==${UV_VERSION}"

WORKDIR /build
COPY pyproject.toml uv.lock ./
# Only the lock's `serve` extra (and the shared numpy/pillow), every wheel checked against its hash.
RUN /opt/uv/bin/uv export --frozen --no-dev --extra serve --no-emit-project --quiet \
        --output-file requirements.txt \
    && python3 -m venv --without-pip /opt/venv \
    && /opt/uv/bin/uv pip install --quiet --python /opt/venv/bin/python --no-deps --require-hashes \
        --compile-bytecode -r requirements.txt \
    && cp requirements.txt /opt/venv/requirements.txt \
    && site=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && find "$site/numpy" -depth -type d -name tests -exec rm -rf {} + \
    && rm -rf "$site/onnxruntime/transformers" "$site/onnxruntime/datasets"

# ---- runtime: the environment, api/ and the few catdog modules the service imports ----
FROM ${BASE_IMAGE} AS runtime

# A folder (in the build context) copied to /models: the empty placeholder unless a model is baked in.
ARG MODEL_DIR=docker/no-model

LABEL org.opencontainers.image.title="catdog-api" \
      org.opencontainers.image.description="Cats-vs-Dogs prediction service (FastAPI + ONNX Runtime)" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_URI=/models \
    MODEL_CACHE_DIR=/var/lib/catdog/model-cache \
    FEEDBACK_DB=/var/lib/catdog/feedback.db \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

# A fixed numeric user (Kubernetes runAsNonRoot checks the number); /var/lib/catdog is its only writable
# place (feedback database, downloaded models): mount a volume there to keep them across restarts.
RUN groupadd --gid 10001 catdog \
    && useradd --no-log-init --uid 10001 --gid catdog --home-dir /var/lib/catdog --no-create-home \
        --shell /usr/sbin/nologin catdog \
    && mkdir -p /var/lib/catdog/model-cache /models \
    && chown -R 10001:10001 /var/lib/catdog

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY api/ api/
COPY src/catdog/__init__.py src/catdog/preprocessing.py src/catdog/onnx_model.py src/catdog/image_stats.py \
     src/catdog/smoke.py catdog/
RUN python -m compileall -q /app
COPY ${MODEL_DIR}/ /models/

USER 10001:10001
EXPOSE 8000

# Liveness of the process (GET /health); readiness (model loaded) is GET /ready.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "api"]
