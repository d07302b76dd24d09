#!/usr/bin/env bash
# Create .venv with bliss (server stack and CPU FAISS) and its development tools (tests,
# ruff, protoc plugin).
#
# torch/torchvision are installed first and pinned: on this project's build machines pip
# takes these exact wheels from local disk (a newer PyPI torchvision does not import beside
# the CPU-only torch). Elsewhere, override them, e.g.
#   BLISS_TORCH="torch torchvision" ./setup.sh
# BLISS_FAISS=gpu installs faiss-gpu (CUDA 12) instead of faiss-cpu: never both, since both
# provide the module `faiss` and the one installed last replaces the other's files.
set -euo pipefail
cd "$(dirname "$0")"
faiss=${BLISS_FAISS:-cpu}
if [ "$faiss" != cpu ] && [ "$faiss" != gpu ]; then
    echo "error: BLISS_FAISS is '$faiss': use cpu (default) or gpu" >&2
    exit 2
fi
python3 -m venv .venv
.venv/bin/pip install --quiet ${BLISS_TORCH:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/pip install --quiet -e ".[$faiss,dev]"
echo "bliss installed in .venv: run .venv/bin/bliss --help"
