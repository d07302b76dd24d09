#!/usr/bin/env bash
# Create .venv with bliss and its development tools (tests, ruff, protoc plugin).
#
# torch/torchvision are installed first and pinned: on this project's build machines pip
# takes these exact wheels from local disk (a newer PyPI torchvision does not import beside
# the CPU-only torch). Elsewhere, override them, e.g.
#   BLISS_TORCH="torch torchvision" ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet ${BLISS_TORCH:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/pip install --quiet -e '.[dev]'
echo "bliss installed in .venv: run .venv/bin/bliss --help"
