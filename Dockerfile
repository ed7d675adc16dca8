# One image for every Mailrail service. The service is chosen by the command, e.g.
#   docker run IMAGE python -m services.ingest
# (the Kubernetes Deployments under deploy/k8s/ set it). Build from the repository root:
#   docker build -t ghcr.io/mailrail/mailrail:0.1.0 .
# For a reproducible build, pass the base image pinned by digest:
#   --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 mailrail \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin mailrail

WORKDIR /app

# Dependencies first, so code changes reuse this layer.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY schemas/ schemas/
COPY services/ services/
# Bytecode compiled at build time: the root filesystem is read-only at run time.
RUN python -m compileall -q schemas services

USER 10001:10001
# ingest HTTP, health and metrics (admin), bounce SMTP
EXPOSE 8080 9090 2525
