"""``bliss index``: build, list, show, activate and delete index versions."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from bliss.class_statistics import StatisticsPath
from bliss.dictionary_index import IndexKind
from bliss.errors import InvalidInputError
from bliss.indexer import build_arguments, version_commands
from bliss.indexer.build_arguments import DEFAULT_MODEL, DEFAULT_PRETRAINED
from bliss.indexer.build_inputs import DEFAULT_CHUNK_SIZE
from bliss.indexer.image_checks import DEFAULT_MAX_IMAGE_PIXELS
from bliss.scoring import DEFAULT_K, DEFAULT_LAMBDA
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

if TYPE_CHECKING:
    from bliss.indexer.build_options import BuildOutcome
    from bliss.indexer.executors import Executor

logger = logging.getLogger(__name__)

NAME_LIMIT = 100
NAME_HELP = (
    f"index name: 1 to {NAME_LIMIT} letters, digits, '.', '_' or '-', starting with a letter "
    "or digit (a version number is added per build)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="build and manage index versions")
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    _register_build(actions)
    _register_extend(actions)

    version_commands.register(actions)


def _register_build(actions: argparse._SubParsersAction) -> None:
    build = actions.add_parser(
        "build",
        help="build an index version from class image folders or precomputed embeddings",
        description="Build (or resume, or skip if identical) an index version. Re-running a "
        "finished build does nothing; a killed build resumes where it stopped.",
    )
    build.add_argument("--name", required=True, help=NAME_HELP)
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-images",
        metavar="DIR",
        help="one sub-folder of images per normal class: a local folder or an fsspec URL "
        "(s3://bucket/prefix, gs://..., memory://...)",
    )
    source.add_argument(
        "--from-webdataset",
        metavar="SHARDS",
        help="webdataset tar shards, e.g. 'shards/{00000..00099}.tar' or 's3://b/shards/*.tar' "
        "(one image per sample; class per --class-from)",
    )
    source.add_argument(
        "--from-parquet",
        metavar="FILES",
        help="parquet files, e.g. 'data/*.parquet', with an image column (bytes, {bytes, path} "
        "structs or paths/URLs) and a label column",
    )
    source.add_argument(
        "--from-embeddings",
        type=Path,
        metavar="DIR",
        help="dictionary.txt/.npy, classes.txt, class_text.npy, normal.npy, normal_labels.npy",
    )
    build.add_argument(
        "--class-map",
        type=Path,
        help="rename classes: JSON {folder or label: class} or 'folder<TAB>class' lines",
    )
    images = build.add_argument_group("image inputs")
    images.add_argument(
        "--class-from",
        metavar="SPEC",
        help="webdataset class: cls (the .cls member, default), json[:FIELD] (a field of the "
        ".json member, default field 'label') or key:REGEX (its one group, in the sample key)",
    )
    images.add_argument("--image-column", help="parquet image column (default: image)")
    images.add_argument("--label-column", help="parquet label column (default: label)")
    images.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help="pixel budget per normal image (width x height); larger ones are bad images",
    )
    images.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out normal images that cannot be read or decoded, or exceed the budget "
        "(default: list them and stop before encoding)",
    )
    model = build.add_argument_group("model (images; optional record for embeddings)")
    model.add_argument(
        "--model", help=f"open_clip model name or local-dir:PATH (images default: {DEFAULT_MODEL})"
    )
    model.add_argument(
        "--pretrained",
        help=f"pretrained tag or local checkpoint file (images default: {DEFAULT_PRETRAINED})",
    )
    model.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    model.add_argument("--batch-size", type=int, default=256, help="encoder batch size")
    model.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="encoder precision (fp16/bf16 need CUDA; part of the build's fingerprint)",
    )
    model.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="texts or images encoded per resumable chunk",
    )
    model.add_argument(
        "--dictionary", default="imagenet", help="imagenet | wordnet | file:PATH (images only)"
    )
    model.add_argument("--prompt-template", help="default: 'This is a photo of a {label}'")
    faiss = build.add_argument_group("FAISS index")
    faiss.add_argument("--index-kind", choices=[k.value for k in IndexKind], default="flat")
    faiss.add_argument("--nlist", type=int, help="IVF lists (default about 4*sqrt(t))")
    faiss.add_argument("--nprobe", type=int, default=32, help="IVF lists searched per query")
    faiss.add_argument("--hnsw-m", type=int, default=32)
    faiss.add_argument("--ef-search", type=int, default=128)
    faiss.add_argument("--pq-m", type=int, help="PQ sub-quantisers (default D/8)")
    faiss.add_argument(
        "--target-recall",
        type=float,
        metavar="R",
        help="tune nprobe/efSearch (and nlist when not given) so that recall@K against exact "
        "search on the normal images reaches R (ivf, hnsw, ivfpq)",
    )
    _register_dictionary_store(build)
    scoring = build.add_argument_group("statistics and scoring defaults")
    scoring.add_argument(
        "--statistics-mode",
        choices=["table", "moments"],
        help="table (default with FAISS): eq. 8 per (class, entry), O(N t) store; moments "
        "(default with Milvus): per-class mean and covariance, O(N D^2), computed for the K "
        "hits per request",
    )
    scoring.add_argument(
        "--statistics-path",
        choices=[p.value for p in StatisticsPath],
        default="auto",
        help="how table-mode statistics are computed (both exact)",
    )
    scoring.add_argument("--default-k", type=int, default=DEFAULT_K)
    scoring.add_argument("--default-lambda", type=float, default=DEFAULT_LAMBDA)
    scoring.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this share of each class's normal images to calibrate normal_quantile",
    )
    backend = build.add_argument_group("execution")
    backend.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="run encoding and statistics in this process, or on a Ray cluster",
    )
    backend.add_argument(
        "--ray-address",
        help="an existing Ray cluster: ray://HOST:10001 or auto (env RAY_ADDRESS; default: "
        "start a private local cluster that ends with the build)",
    )
    backend.add_argument(
        "--ray-gpus-per-encoder",
        type=float,
        default=0.0,
        help="GPUs each Ray encoder actor reserves (0: CPU encoders)",
    )
    backend.add_argument(
        "--ray-encoders",
        type=int,
        help="encoder actors (default: one per GPU when they use GPUs, else one per CPU of "
        "each node, at most 8 per node, sharing its CPUs; the choice is logged)",
    )
    backend.add_argument(
        "--ray-cpus-per-encoder",
        type=int,
        help="CPUs (and torch threads) each encoder actor reserves (with --ray-encoders or "
        "GPUs: default 1; else each node gets one CPU encoder per this many CPUs)",
    )
    build.add_argument("--activate", action="store_true", help="make the version active when ready")
    build.add_argument("--keep-workspace", action="store_true", help="keep intermediate files")
    _add_lifecycle_arguments(build)
    add_store_arguments(build)
    build.set_defaults(handler=run_build)


def _add_lifecycle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help="when the same build is already running elsewhere, wait for it (default: stop)",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="build a new version even when a finished one with intact files has these "
        "inputs (a rerun replaces one whose files are damaged by itself)",
    )


def _register_extend(actions: argparse._SubParsersAction) -> None:
    extend = actions.add_parser(
        "extend",
        help="a new version from an existing one plus new dictionary entries or normal images",
        description="Add dictionary entries and/or normal images to a version, doing only the "
        "new work; the result equals a build of the union. Re-running resumes or does nothing.",
    )
    extend.add_argument("name", help="NAME or NAME@VERSION (default: the active version)")
    extend.add_argument("--version", type=int, help="version to extend (default: the active one)")
    extend.add_argument(
        "--from-embeddings",
        type=Path,
        required=True,
        metavar="DIR",
        help="dictionary.txt + dictionary.npy to add, and/or classes.txt + normal.npy + "
        "normal_labels.npy of images to add to existing classes",
    )
    extend.add_argument(
        "--activate", action="store_true", help="make the version active when ready"
    )
    extend.add_argument("--keep-workspace", action="store_true", help="keep intermediate files")
    _add_lifecycle_arguments(extend)
    add_store_arguments(extend)
    extend.set_defaults(handler=run_extend)


def run_extend(args: argparse.Namespace) -> int:
    from bliss.embedding_bundle import load_extension
    from bliss.indexer.build_checks import disk_full_as_error
    from bliss.indexer.extend import extend_version

    settings = settings_from_args(StoreSettings, args)
    name, number = version_commands.version_ref(args.name, args.version)
    with version_commands.open_store(settings) as store, disk_full_as_error(settings.data_dir):
        base = store.get_version(name, number)
        classes = [record.name for record in store.load_classes(base.id)]
        extension = load_extension(args.from_embeddings, base.embedding_dim, classes)
        outcome = extend_version(
            store,
            settings.data_dir,
            base,
            extension,
            activate=args.activate,
            keep_workspace=args.keep_workspace,
            wait=args.wait,
            rebuild=args.rebuild,
        )
    _report(outcome, f"from {base.label}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from bliss.indexer.build_checks import disk_full_as_error
    from bliss.indexer.pipeline import build_version

    settings = settings_from_args(StoreSettings, args)
    _check_name(args.name)
    _check_numbers(args)
    executor = _executor(args)
    inputs, options = build_arguments.inputs_and_options(args, executor)
    with version_commands.open_store(settings) as store, disk_full_as_error(settings.data_dir):
        outcome = build_version(
            store,
            settings.data_dir,
            inputs,
            options,
            activate=args.activate,
            keep_workspace=args.keep_workspace,
            executor=executor,
            wait=args.wait,
            rebuild=args.rebuild,
        )
    _report(outcome, skipped_images=build_arguments.skipped_images(inputs))
    return 0


def _report(outcome: BuildOutcome, origin: str = "", skipped_images: int = 0) -> None:
    version = outcome.version
    print(
        f"{'built' if outcome.built else 'unchanged'} {version.label} ({version.state.value}"
        f"{', ' + origin if origin else ''}): {version.dictionary_size:,} dictionary entries, "
        f"dimension {version.embedding_dim}, {version.faiss_kind} index, "
        f"{version.statistics_mode.value} statistics, model {version.model_name} "
        f"{version.model_weights}".rstrip()
    )
    if skipped_images:
        print(f"  skipped {skipped_images:,} bad normal images (--skip-bad-images)")
    for stage, seconds in outcome.stage_seconds.items():
        print(f"  {stage:<34} {seconds:8.2f} s")
    if version.state.value != "active":
        print(f"activate it with: bliss index activate {version.label}")


def _executor(args: argparse.Namespace) -> Executor:
    from bliss.indexer.executors import LocalExecutor, RayExecutor

    if args.backend == "local":
        return LocalExecutor()
    return RayExecutor(
        args.ray_address,
        gpus_per_encoder=args.ray_gpus_per_encoder,
        encoders=args.ray_encoders,
        cpus_per_encoder=args.ray_cpus_per_encoder,
    )


def _register_dictionary_store(build: argparse.ArgumentParser) -> None:
    store = build.add_argument_group("dictionary store (see README, Beyond one machine)")
    store.add_argument(
        "--dictionary-store",
        default="faiss",
        metavar="STORE",
        help="faiss (a FAISS file in the data dir) or milvus:URI (a collection per version in "
        "a milvus-lite file or a Milvus server, e.g. milvus:http://milvus:19530; credentials "
        "from BLISS_MILVUS_TOKEN, TLS CA from BLISS_MILVUS_CA_CERT)",
    )
    store.add_argument(
        "--milvus-index-type", default="FLAT", help="FLAT (exact), IVF_FLAT, HNSW, GPU_CAGRA, ..."
    )
    store.add_argument(
        "--milvus-index-params", default="{}", metavar="JSON", help="e.g. '{\"nlist\": 1024}'"
    )
    store.add_argument(
        "--milvus-search-params",
        default="{}",
        metavar="JSON",
        help="recorded with the version, used by every server: e.g. '{\"nprobe\": 32}'",
    )


def _check_name(name: str) -> None:
    import re

    if len(name) > NAME_LIMIT:
        raise InvalidInputError(
            f"index name {name[:20]!r}... is {len(name)} characters long: the limit is {NAME_LIMIT}"
        )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise InvalidInputError(f"index name {name!r} is not allowed: {NAME_HELP}")


# (flag, attribute, smallest value); None means the option was not given.
_SMALLEST = (
    ("--batch-size", "batch_size", 1),
    ("--chunk-size", "chunk_size", 1),
    ("--nlist", "nlist", 1),
    ("--nprobe", "nprobe", 1),
    ("--hnsw-m", "hnsw_m", 2),  # faiss crashes on HNSW1
    ("--ef-search", "ef_search", 1),
    ("--pq-m", "pq_m", 1),
)


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric options that need no input to check, before anything is read."""
    for flag, attribute, smallest in _SMALLEST:
        value = getattr(args, attribute)
        if value is not None and value < smallest:
            raise InvalidInputError(f"{flag} must be at least {smallest}, got {value}")
    recall = args.target_recall
    if recall is not None and not (math.isfinite(recall) and 0 < recall <= 1):
        raise InvalidInputError(
            f"--target-recall must be in (0, 1], e.g. 0.95 (1 means exact), got {recall}"
        )
