# The pipeline image: torch, Lightning, DVC, MLflow, Prefect (the lock's `pipeline` extra) and the project,
# for running the DVC stages (`dvc repro`, the default command) and the Prefect server and worker
# (docker-compose.yml). About 6 GB: torch from PyPI brings its CUDA libraries. See docker/README.md.
#
#   docker build -f docker/pipeline.Dockerfile -t catdog-pipeline .
#   # GPU hosts (NVIDIA driver + container toolkit): the same image works with `docker run --gpus all`;
#   # or on NVIDIA's CUDA runtime base (python3 comes from apt when the base has none):
#   docker build -f docker/pipeline.Dockerfile \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t catdog-pipeline:cuda .
#
# The project lives in /workspace (PYTHONPATH, not installed): mount volumes on /workspace/data,
# /workspace/models and /workspace/.dvc/cache to keep the pipeline's outputs, or mount a checkout there.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: the locked pipeline environment in /opt/venv ----
FROM ${BASE_IMAGE} AS builder

ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NATIVE_TLS=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/sh", "-eu", "-c"]
# Python with venv where the base has none (the nvidia/cuda images: Ubuntu 24.04's python3 is 3.12).
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --quiet "uv==${UV_VERSION}"

WORKDIR /build
COPY pyproject.toml uv.lock README.md ./
# The lock's `pipeline` extra, exactly (--frozen), and `serve` (the promotion gate smoke-tests the candidate
# on a staging service of its own), without the project itself (it is on PYTHONPATH).
RUN /opt/uv/bin/uv sync --frozen --no-dev --extra pipeline --extra serve --no-install-project \
        --python python3 --quiet

# ---- runtime ----
FROM ${BASE_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/sh", "-eu", "-c"]
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 10001 catdog \
    && useradd --no-log-init --uid 10001 --gid catdog --home-dir /workspace --no-create-home \
        --shell /usr/sbin/nologin catdog

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/workspace/src:/workspace \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DVC_NO_ANALYTICS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PREFECT_HOME=/workspace/.prefect

COPY --from=builder /opt/venv /opt/venv
WORKDIR /workspace
COPY --chown=10001:10001 pyproject.toml uv.lock README.md params.yaml dvc.yaml dvc.lock .dvcignore ./
COPY --chown=10001:10001 .dvc/config .dvc/config
COPY --chown=10001:10001 src/ src/
COPY --chown=10001:10001 api/ api/
COPY --chown=10001:10001 flows/ flows/
# No git repository in the image: DVC runs without SCM (a mounted checkout with .git keeps its own config).
RUN dvc config --local core.no_scm true \
    && mkdir -p data models reports metrics plots .dvc/cache .prefect \
    && chown -R 10001:10001 /workspace

USER 10001:10001

# A batch and worker image: compose gives the Prefect server and worker their own health checks.
HEALTHCHECK NONE

CMD ["dvc", "repro"]
