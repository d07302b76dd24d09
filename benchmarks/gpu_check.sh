#!/usr/bin/env bash
# One-shot check of bliss on a GPU machine, in under 8 minutes: a GPU summary, the GPU
# tests (pytest -m gpu: they skip, with the reason, where CUDA or faiss-gpu is missing),
# then benchmarks/gpu_throughput.py (faiss GPU flat search against a torch matmul floor at
# 1M and 10M entries, ViT-B/16 encoding in fp32 and fp16).
#
#   bash benchmarks/gpu_check.sh        # from anywhere; exits non-zero if a step failed
#
# Expects ./setup.sh, then the README's faiss-gpu install ("Large dictionaries and GPUs").
# When faiss still has no GPU support, this installs the pinned faiss-gpu wheel itself
# (that needs the package index; where there is none it carries on without it).
# On a machine without .venv but with a python3 that has torch, it makes a virtual
# environment over that python3's packages and installs into it, offline and without
# dependencies, the wheels found in .whl/ (carry there what python3 lacks: open_clip_torch,
# ftfy, wcwidth, faiss-cpu or faiss-gpu, SQLAlchemy, alembic, Mako, pydantic-settings,
# python-dotenv; setuptools>=77 if older) and bliss itself (editable).
# With OUT set, everything printed is also written to $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."

FAISS_GPU_WHEEL="faiss-gpu==1.15.1"
TOTAL_S=470 # the whole run, kept under 8 minutes
SCRATCH_VENV=/tmp/bliss-gpu-venv
started=$(date +%s)

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
# Skips are the expected answer where faiss-gpu is missing: report them, do not fail on them.
unset BLISS_REQUIRE_ALL_TESTS

elapsed() { echo $(($(date +%s) - started)); }
section() { printf '\n== %s (%s s)\n' "$1" "$(elapsed)"; }

scratch_python() {
    # python3 may itself be a virtual environment, whose packages --system-site-packages
    # would not see: a .pth file puts its site-packages behind the new environment's own.
    local parent site
    parent=$(python3 -c 'import site; print("\n".join(site.getsitepackages()))')
    python3 -m venv --without-pip "$SCRATCH_VENV"
    site=$("$SCRATCH_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$parent" >"$site/bliss-gpu-parent.pth"
    local pip=("$SCRATCH_VENV/bin/python" -m pip install -q --no-index --no-deps)
    if compgen -G ".whl/*.whl" >/dev/null; then
        "${pip[@]}" .whl/*.whl >&2
    fi
    "${pip[@]}" --no-build-isolation -e . >&2
    echo "$SCRATCH_VENV/bin/python"
}

pick_python() {
    if [ -x .venv/bin/python ]; then
        echo .venv/bin/python
    elif python3 -c 'import torch' 2>/dev/null; then
        scratch_python
    else
        echo "no .venv and no python3 with torch here: run ./setup.sh first" >&2
        exit 1
    fi
}

check_modules() {
    "$PY" - <<'EOF'
import importlib.util
import sys

needed = ["numpy", "torch", "faiss", "open_clip", "sqlalchemy", "alembic", "pydantic_settings", "pytest"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing Python modules {', '.join(missing)}: run ./setup.sh, or put their wheels in .whl/")
EOF
}

faiss_has_gpu() {
    "$PY" -c 'import faiss, sys; sys.exit(0 if hasattr(faiss, "StandardGpuResources") else 1)'
}

install_faiss_gpu() {
    local pip=("$PY" -m pip install -q --retries 0 --timeout 20)
    # faiss-gpu and faiss-cpu both own the faiss/ folder: the forced reinstall makes the
    # GPU build's files the ones in place.
    if timeout 150 "${pip[@]}" "$FAISS_GPU_WHEEL" &&
        timeout 60 "${pip[@]}" --force-reinstall --no-deps "$FAISS_GPU_WHEEL"; then
        return
    fi
    echo "could not install $FAISS_GPU_WHEEL: the faiss GPU tests skip, the benchmark measures torch only"
}

section "GPUs"
nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv ||
    echo "nvidia-smi failed: no NVIDIA driver here?"

section "Python"
PY=$(pick_python)
check_modules
"$PY" -c 'import sys, torch, faiss; print(sys.version.split()[0], "torch", torch.__version__,
    "CUDA", torch.cuda.is_available(), "faiss", faiss.__version__,
    "GPU build" if hasattr(faiss, "StandardGpuResources") else "CPU build")'
if ! faiss_has_gpu; then
    section "faiss has no GPU support: installing $FAISS_GPU_WHEEL"
    install_faiss_gpu
fi

section "GPU tests"
tests_status=0
timeout 150 "$PY" -m pytest tests/test_gpu.py -m gpu -v -ra -p no:cacheprovider || tests_status=$?

section "throughput"
bench_status=0
left=$((TOTAL_S - $(elapsed)))
if [ "$left" -lt 90 ]; then
    echo "only $left s left of the $TOTAL_S s run: benchmark skipped"
else
    # The budget leaves room for the measurement running when it runs out.
    timeout "$left" "$PY" benchmarks/gpu_throughput.py --budget-s $((left - 60)) || bench_status=$?
fi

section "done: GPU tests exit $tests_status, benchmark exit $bench_status"
if [ "$tests_status" -ne 0 ]; then
    exit "$tests_status"
fi
exit "$bench_status"
