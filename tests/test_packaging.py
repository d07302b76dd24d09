"""What each install brings: the client alone (base), the server with CPU or GPU FAISS.

The client-only test builds bliss from this checkout into a fresh virtual environment,
with its dependencies from the package index (pip's cache makes repeats fast), and
scores through it against a server of this environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bliss.client import BlissClient
from tests.serving_fixtures import build_from_embeddings
from tests.synthetic_embeddings import synthetic_world
from tests.test_server_process import start_serving

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "bliss-anomaly"
FAISS_DISTRIBUTIONS = {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"}
# The server stack, by import name: none of it may come with, or be imported by, the client.
SERVER_STACK = ("torch", "torchvision", "open_clip", "faiss", "sqlalchemy", "alembic", "pydantic")
# What `pip install bliss-anomaly` may install: the client's dependencies and theirs
# (googleapis-common-protos for grpcio-status, typing-extensions for grpcio).
CLIENT_DISTRIBUTIONS = {
    DISTRIBUTION,
    "numpy",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-status",
    "protobuf",
    "googleapis-common-protos",
    "typing-extensions",
}
VENV_TOOLS = {"pip", "setuptools", "wheel"}
# The folders of pyproject's [tool.setuptools.package-dir] (a folder added there and not
# here fails the build below, with setuptools naming it).
PACKAGE_FOLDERS = ("bliss", "client", "indexer", "migrations", "proto", "server")


def requirements(extra: str = "") -> set[str]:
    """Distributions that the installed metadata says an install with ``extra`` brings
    (``""``: the base install), through the extras of bliss-anomaly that it names."""
    found: set[str] = set()
    for line in importlib.metadata.requires(DISTRIBUTION) or ():
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name == DISTRIBUTION:
            for named in requirement.extras:
                found |= requirements(named)
        else:
            found.add(name)
    return found


def test_cpu_and_gpu_each_bring_one_faiss_and_nothing_else_brings_any():
    extras = importlib.metadata.metadata(DISTRIBUTION).get_all("Provides-Extra") or []
    assert {"cpu", "gpu", "server", "dev"} <= set(extras)
    assert not requirements() & FAISS_DISTRIBUTIONS, "the base install brings a FAISS"
    assert requirements("cpu") & FAISS_DISTRIBUTIONS == {"faiss-cpu"}
    assert requirements("gpu") & FAISS_DISTRIBUTIONS == {"faiss-gpu"}
    for extra in set(extras) - {"cpu", "gpu"}:
        brought = requirements(extra) & FAISS_DISTRIBUTIONS
        assert not brought, f"[{extra}] brings {brought}: `[gpu,{extra}]` would shadow faiss-gpu"
    # Both FAISS extras carry the whole server stack.
    assert requirements("server") <= requirements("cpu") & requirements("gpu")
    assert {"torch", "sqlalchemy", "open-clip-torch"} <= requirements("server")


def test_the_base_install_is_the_client_alone():
    assert requirements() | {DISTRIBUTION} <= CLIENT_DISTRIBUTIONS


def test_importing_the_client_imports_no_server_stack():
    script = (
        "import sys\n"
        "import bliss.client\n"
        "for name in bliss.client.__all__: getattr(bliss.client, name)\n"
        "import bliss.client.remote_scoring\n"
        "print(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert not set(result.stdout.split()) & set(SERVER_STACK)


def test_the_server_without_faiss_says_what_to_install(tmp_path):
    # As if no FAISS were installed: `import faiss` raises ModuleNotFoundError.
    script = (
        "import sys\n"
        "sys.modules['faiss'] = None\n"
        "from bliss.cli import main\n"
        f"sys.exit(main(['serve', '--data-dir', {str(tmp_path)!r}, '--port', '0']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: no FAISS is installed: pip install 'bliss-anomaly[cpu]' "
        "(or 'bliss-anomaly[gpu]' for CUDA 12 GPUs)"
    )


def copy_sources(target: Path) -> Path:
    """What a build of this checkout reads (a copy: building in place would write build/
    and egg-info folders into the checkout)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(ROOT / folder, target / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, target / name)
    return target


LIGHT_CLIENT_SCRIPT = """
import asyncio, importlib.metadata, importlib.util, json, sys
import numpy as np
from bliss.client import AsyncBlissClient, BlissClient, ScoringServiceError

address, embeddings = sys.argv[1], np.load(sys.argv[2])
with BlissClient(address, max_retries=0) as client:
    items = client.score(embeddings=embeddings, class_scores=True)
    broken = embeddings[:2].copy()
    broken[1, 0] = np.nan
    try:
        client.score(embeddings=broken)
    except ScoringServiceError as error:
        violations = [v.field for v in error.violations]

async def score_async():
    async with AsyncBlissClient(address, max_retries=0) as client:
        return await client.score(embeddings=embeddings, class_scores=True)

print(json.dumps({
    "sync": [item.to_json_dict() for item in items],
    "async": [item.to_json_dict() for item in asyncio.run(score_async())],
    "violations": violations,
    "installed": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
    "findable": [name for name in sys.argv[3:] if importlib.util.find_spec(name)],
    "imported": sorted({name.partition(".")[0] for name in sys.modules} & set(sys.argv[3:])),
}))
"""


@pytest.mark.slow
def test_a_client_only_install_scores_like_the_full_one(tmp_path):
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The new environment's own interpreter and site-packages, nothing of this one's.
    environment = {
        k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    }
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", copy_sources(tmp_path / "source")],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=540,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr

    world = synthetic_world(classes=3, entries=150, per_class=10, tests=8, seed=21)
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data)
    np.save(tmp_path / "test.npy", world.test)
    process, port, _ = start_serving(data)
    address = f"127.0.0.1:{port}"
    try:
        light = subprocess.run(
            [python, "-c", LIGHT_CLIENT_SCRIPT, address, tmp_path / "test.npy", *SERVER_STACK],
            capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert light.returncode == 0, light.stderr
        # Its `bliss` command belongs to the server install, and says so in one line.
        command = subprocess.run(
            [venv / "bin" / "bliss", "health", "--server", address],
            capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=60,
        )  # fmt: skip
        with BlissClient(address, max_retries=0) as client:
            scored = client.score(embeddings=world.test, class_scores=True)
        full = [item.to_json_dict() for item in scored]
    finally:
        process.kill()
        process.wait()

    report = json.loads(light.stdout)
    assert report["findable"] == [] and report["imported"] == []
    names = {canonicalize_name(name) for name in report["installed"]}
    assert names - VENV_TOOLS <= CLIENT_DISTRIBUTIONS, names - VENV_TOOLS - CLIENT_DISTRIBUTIONS
    assert report["sync"] == full and report["async"] == full
    assert report["violations"] == ["items[1].embedding"]
    assert command.returncode == 2
    assert command.stderr.splitlines() == [
        "error: pydantic is not installed: the bliss command needs the server install, "
        "pip install 'bliss-anomaly[cpu]' (or 'bliss-anomaly[gpu]' for CUDA 12 GPUs)"
    ]
