# bliss: `bliss serve` (gRPC scoring server) and every other `bliss` command in one image.
#
# CPU image (default; public base, PyTorch's CPU wheels):
#   docker build -t bliss .
# CUDA image (PyTorch's CUDA 12.4 wheels; Ubuntu's Python 3.10 is installed on the base):
#   docker build -t bliss:cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 \
#       --build-arg BLISS_EXTRAS=gpu,postgres .
#   docker run --gpus all ... bliss:cuda serve
# Behind a TLS-intercepting proxy or with a private package index, pass the CA bundle and
# the index as build arguments (podman: mount the bundle with -v at build time), e.g.
#   podman build --format docker --network host \
#       -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro \
#       --build-arg BASE_IMAGE=localhost/python:3.11-bookworm \
#       --build-arg PIP_CERT=/run/host-ca.crt \
#       --build-arg TORCH_INDEX_URL= --build-arg TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" .
# (`--format docker` keeps the HEALTHCHECK: podman's default OCI format drops it.)
#
# Run: the data directory (SQLite store, FAISS files, model cache) is /data; mount a volume
# there. The server listens on 0.0.0.0 inside the container (BLISS_HOST, BLISS_METRICS_HOST):
# publish 50051 (gRPC) and 9464 (Prometheus) only where they should be reachable, and
# serve other machines with TLS and a token (README, "Production setup").
#   docker run -d -v bliss-data:/data -p 127.0.0.1:50051:50051 bliss
#   docker run --rm -v bliss-data:/data bliss quickstart

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------
# Python and venv on any Debian or Ubuntu base: python:3.x-slim has them; nvidia/cuda
# bases get Python from the distribution.
FROM ${BASE_IMAGE} AS python-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 --version

# ---------------------------------------------------------------------------------------
# Builder: everything is installed into /opt/venv, which the runtime stage copies.
FROM python-base AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# pip's settings, as build arguments so nothing of them stays in the image:
# PIP_CERT: CA bundle for pip (a path inside the build, e.g. a bundle mounted with -v);
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS: a mirror or local wheels.
ARG PIP_CERT=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
# The torch install: TORCH_SPEC is what pip installs, from TORCH_INDEX_URL when it is not
# empty (PyTorch's CPU wheels by default; .../whl/cu124 for CUDA 12.4; empty: the normal
# index, whose Linux x86_64 torch is a CUDA build of several GB).
ARG TORCH_SPEC="torch torchvision"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1

# hadolint ignore=SC2086
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_SPEC} \
    && /opt/venv/bin/pip freeze | grep -i -E '^(torch|torchvision)==' > /opt/torch-constraints.txt \
    && cat /opt/torch-constraints.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bliss/ bliss/
COPY server/ server/
COPY indexer/ indexer/
COPY client/ client/
COPY migrations/ migrations/
COPY proto/ proto/
# bliss's extras (pyproject.toml): exactly one FAISS build, `cpu` (faiss-cpu) or `gpu`
# (faiss-gpu, CUDA 12), plus postgres for BLISS_STORE_URL=postgresql://...; add inputs,
# distributed or milvus as needed.
ARG BLISS_EXTRAS=cpu,postgres
# More packages for pip, installed last, e.g. "s3fs" for s3:// inputs.
ARG EXTRA_PIP_PACKAGES=""
# torch stays the build installed above (the constraint file pins it).
# hadolint ignore=SC2086
RUN /opt/venv/bin/pip install --no-cache-dir --constraint /opt/torch-constraints.txt \
        ".[${BLISS_EXTRAS}]" \
    && if [ -n "${EXTRA_PIP_PACKAGES}" ]; then \
        /opt/venv/bin/pip install --no-cache-dir --constraint /opt/torch-constraints.txt \
            ${EXTRA_PIP_PACKAGES}; \
    fi \
    && /opt/venv/bin/bliss --version

# ---------------------------------------------------------------------------------------
# Runtime: the base, the venv and a non-root user; no compilers, no pip cache, no sources.
FROM python-base AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it (deploy/kubernetes).
RUN groupadd --system --gid 10001 bliss \
    && useradd --system --uid 10001 --gid bliss --home-dir /home/bliss \
        --create-home --shell /usr/sbin/nologin bliss \
    && mkdir -p /data \
    && chown bliss:bliss /data
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 deploy/container/healthcheck.sh /usr/local/bin/bliss-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BLISS_DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    BLISS_HOST=0.0.0.0 \
    BLISS_METRICS_HOST=0.0.0.0 \
    BLISS_PORT=50051 \
    BLISS_METRICS_PORT=9464
USER 10001:10001
WORKDIR /home/bliss
EXPOSE 50051 9464
# grpc.health.v1 of the local server (SERVING once an index is served). Follows BLISS_PORT
# and, with TLS, BLISS_TLS_CERT (or BLISS_HEALTH_CA_CERT); see deploy/container/healthcheck.sh.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["/usr/local/bin/bliss-healthcheck"]
ENTRYPOINT ["bliss"]
CMD ["serve"]
