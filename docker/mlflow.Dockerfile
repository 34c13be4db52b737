# The MLflow tracking server of docker-compose.yml: runs and the model registry in PostgreSQL, artifacts in
# MinIO (S3), served through the server (--serve-artifacts), so clients (the pipeline, the prediction
# service) need no S3 credentials. Basic auth (docker/mlflow-auth.ini): every request needs a user;
# docker/mlflow_users.py (compose's mlflow-users job) makes the pipeline's and the read-only serving user.
# See docker/README.md.
#
#   docker build -f docker/mlflow.Dockerfile -t catdog-mlflow .

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/sh", "-eu", "-c"]
COPY docker/mlflow-requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --quiet -r /tmp/requirements.txt

FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/sh", "-eu", "-c"]
RUN groupadd --gid 10001 mlflow \
    && useradd --no-log-init --uid 10001 --gid mlflow --home-dir /var/lib/mlflow --create-home \
        --shell /usr/sbin/nologin mlflow \
    && install -d -o mlflow -g mlflow -m 700 /var/lib/mlflow/auth
COPY --from=builder /opt/venv /opt/venv
COPY docker/mlflow-auth.ini /etc/mlflow/basic_auth.ini
COPY docker/mlflow_users.py /opt/mlflow/mlflow_users.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/mlflow
USER 10001:10001
EXPOSE 5000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

# The compose file passes the stores (PostgreSQL, MinIO) and the allowed hosts.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
