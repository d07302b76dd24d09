"""Regenerate the Python stubs of the .proto files beside this module.

    python -m bliss.v1.generate           # rewrite *_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python -m bliss.v1.generate --check   # exit 1 when the checked-in stubs are out of date

Needs grpcio-tools (a dev dependency, pinned so the output is byte-for-byte reproducible).
The include root is the folder holding ``bliss/``, so the stubs import each other as
``bliss.v1.*`` with no path hacks.

grpc_predict_v2.proto is the Open Inference Protocol (KServe v2), vendored verbatim from
kserve/open-inference-protocol specification/protocol/open_inference_grpc.proto (commit
d49cc23f): the kserve/kserve copy lacks InferParameter.double_param, which Triton clients
send for float parameters. Its package is ``inference``, so Triton and KServe clients reach
it; its stubs are checked like ours.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_ROOT = PACKAGE_DIR.parent.parent
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generate(output_root: Path) -> list[Path]:
    """Run protoc on every .proto here, writing under ``output_root/bliss/v1``; return the stubs."""
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"
    sources = [str(path.relative_to(INCLUDE_ROOT)) for path in proto_files()]
    (output_root / "bliss" / "v1").mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{INCLUDE_ROOT}",
            f"-I{well_known}",
            f"--python_out={output_root}",
            f"--pyi_out={output_root}",
            f"--grpc_python_out={output_root}",
            *sources,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {', '.join(sources)}")
    return stub_paths(output_root / "bliss" / "v1")


def stub_paths(folder: Path) -> list[Path]:
    return [folder / f"{p.stem}{suffix}" for p in proto_files() for suffix in STUB_SUFFIXES]


def stale_stubs() -> list[str]:
    """Names of checked-in stubs that differ from freshly generated ones (or are missing)."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        return [
            path.name
            for path in fresh
            if not (PACKAGE_DIR / path.name).is_file()
            or not filecmp.cmp(path, PACKAGE_DIR / path.name, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bliss.v1.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report out-of-date stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"out of date: {', '.join(stale)}; run python -m bliss.v1.generate")
            return 1
        print("stubs are up to date")
        return 0
    for path in generate(INCLUDE_ROOT):
        print(f"wrote {path.relative_to(INCLUDE_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
