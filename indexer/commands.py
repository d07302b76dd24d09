"""``bliss index``: build, list, show, activate and delete index versions."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bliss.class_statistics import StatisticsPath
from bliss.dictionary_index import IndexKind, IndexOptions
from bliss.errors import InvalidInputError
from bliss.indexer import version_commands
from bliss.indexer.build_inputs import DEFAULT_CHUNK_SIZE
from bliss.scoring import DEFAULT_K, DEFAULT_LAMBDA
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

if TYPE_CHECKING:
    from bliss.encoders import ModelSpec
    from bliss.indexer.build_inputs import BuildInputs
    from bliss.indexer.executors import Executor
    from bliss.indexer.pipeline import BuildOptions, BuildOutcome

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
NAME_HELP = "index name: letters, digits, '.', '_' or '-' (a version number is added per build)"


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
        "--from-images", type=Path, metavar="DIR", help="one sub-folder of images per normal class"
    )
    source.add_argument(
        "--from-embeddings",
        type=Path,
        metavar="DIR",
        help="dictionary.txt/.npy, classes.txt, class_text.npy, normal.npy, normal_labels.npy",
    )
    build.add_argument(
        "--class-map", type=Path, help="JSON {folder: label} or 'folder<TAB>label' lines"
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
    scoring = build.add_argument_group("statistics and scoring defaults")
    scoring.add_argument(
        "--statistics-mode",
        choices=["table", "moments"],
        default="table",
        help="table: eq. 8 per (class, entry), O(N t) store; moments: per-class mean and "
        "covariance, O(N D^2), computed for the K hits per request",
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
        "--ray-address", help="Ray cluster address (env RAY_ADDRESS; default: start a local one)"
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
        help="encoder actors (default: one per GPU when they use GPUs, else one per node)",
    )
    build.add_argument("--activate", action="store_true", help="make the version active when ready")
    build.add_argument("--keep-workspace", action="store_true", help="keep intermediate files")
    add_store_arguments(build)
    build.set_defaults(handler=run_build)


def _register_extend(actions: argparse._SubParsersAction) -> None:
    extend = actions.add_parser(
        "extend",
        help="a new version from an existing one plus new dictionary entries or normal images",
        description="Add dictionary entries and/or normal images to a version, doing only the "
        "new work; the result equals a build of the union. Re-running resumes or does nothing.",
    )
    extend.add_argument("name")
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
    add_store_arguments(extend)
    extend.set_defaults(handler=run_extend)


def run_extend(args: argparse.Namespace) -> int:
    from bliss.embedding_bundle import load_extension
    from bliss.indexer.extend import extend_version

    settings = settings_from_args(StoreSettings, args)
    with version_commands.open_store(settings) as store:
        base = store.get_version(args.name, args.version)
        classes = [record.name for record in store.load_classes(base.id)]
        extension = load_extension(args.from_embeddings, base.embedding_dim, classes)
        outcome = extend_version(
            store,
            settings.data_dir,
            base,
            extension,
            activate=args.activate,
            keep_workspace=args.keep_workspace,
        )
    _report(outcome, f"from {base.label}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from bliss.indexer.pipeline import build_version

    settings = settings_from_args(StoreSettings, args)
    _check_name(args.name)
    executor = _executor(args)
    inputs, options = _inputs_and_options(args, executor)
    with version_commands.open_store(settings) as store:
        outcome = build_version(
            store,
            settings.data_dir,
            inputs,
            options,
            activate=args.activate,
            keep_workspace=args.keep_workspace,
            executor=executor,
        )
    _report(outcome)
    return 0


def _report(outcome: BuildOutcome, origin: str = "") -> None:
    version = outcome.version
    print(
        f"{'built' if outcome.built else 'unchanged'} {version.label} ({version.state.value}"
        f"{', ' + origin if origin else ''}): {version.dictionary_size:,} dictionary entries, "
        f"dimension {version.embedding_dim}, {version.faiss_kind} index, "
        f"{version.statistics_mode.value} statistics, model {version.model_name} "
        f"{version.model_weights}".rstrip()
    )
    for stage, seconds in outcome.stage_seconds.items():
        print(f"  {stage:<34} {seconds:8.2f} s")
    if version.state.value != "active":
        print(f"activate it with: bliss index activate {version.name} --version {version.version}")


def _executor(args: argparse.Namespace) -> Executor:
    from bliss.indexer.executors import LocalExecutor, RayExecutor

    if args.backend == "local":
        return LocalExecutor()
    return RayExecutor(
        args.ray_address, gpus_per_encoder=args.ray_gpus_per_encoder, encoders=args.ray_encoders
    )


def _inputs_and_options(
    args: argparse.Namespace, executor: Executor
) -> tuple[BuildInputs, BuildOptions]:
    from bliss.encoders import DEFAULT_PROMPT_TEMPLATE, format_prompt
    from bliss.indexer.pipeline import BuildOptions
    from bliss.store import StatisticsMode

    template = args.prompt_template or DEFAULT_PROMPT_TEMPLATE
    format_prompt(template, "check")
    index = IndexOptions(
        kind=IndexKind(args.index_kind),
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_search=args.ef_search,
        pq_m=args.pq_m,
    )
    if args.default_k < 1:
        raise InvalidInputError(f"--default-k must be at least 1, got {args.default_k}")
    inputs, model, dictionary_source = (
        _embedding_inputs(args) if args.from_embeddings else _image_inputs(args, template, executor)
    )
    options = BuildOptions(
        name=args.name,
        model=model,
        dictionary_source=dictionary_source,
        prompt_template=template,
        index=index,
        statistics_path=StatisticsPath(args.statistics_path),
        statistics_mode=StatisticsMode(args.statistics_mode),
        target_recall=args.target_recall,
        default_k=args.default_k,
        default_lambda=args.default_lambda,
        calibration_fraction=args.calibration_fraction,
        encode_precision=args.precision if args.from_images else "fp32",
    )
    return inputs, options


def _embedding_inputs(args: argparse.Namespace) -> tuple:
    from bliss.embedding_bundle import load_bundle
    from bliss.indexer.build_inputs import BundleInputs
    from bliss.indexer.pipeline import ModelIdentity
    from bliss.version_loader import PRECOMPUTED_MODEL

    bundle = load_bundle(args.from_embeddings)
    model = ModelIdentity(name=PRECOMPUTED_MODEL)
    if args.model:
        spec = _model_spec(args)
        model = ModelIdentity(spec.model_name, spec.weights_id, spec.checksum())
    source = f"embeddings:{args.from_embeddings.resolve()}"
    return BundleInputs(bundle), model, source


def _image_inputs(args: argparse.Namespace, template: str, executor: Executor) -> tuple:
    from bliss.dictionaries import resolve_dictionary
    from bliss.indexer.build_inputs import ImageFolderInputs, scan_image_folder
    from bliss.indexer.executors import EncoderSettings
    from bliss.indexer.pipeline import ModelIdentity

    classes = scan_image_folder(args.from_images, args.class_map)
    dictionary = resolve_dictionary(args.dictionary)
    spec = _model_spec(args)
    inputs = ImageFolderInputs(
        classes,
        dictionary,
        lambda: executor.encoder(
            EncoderSettings(spec, args.device, args.batch_size, args.precision)
        ),
        template,
        chunk_size=args.chunk_size,
    )
    return (
        inputs,
        ModelIdentity(spec.model_name, spec.weights_id, spec.checksum()),
        dictionary.source,
    )


def _model_spec(args: argparse.Namespace) -> ModelSpec:
    from bliss.encoders import TINY_TEST_MODEL, ModelSpec

    name = args.model or DEFAULT_MODEL
    pretrained = args.pretrained
    if pretrained is None and name == DEFAULT_MODEL:
        pretrained = DEFAULT_PRETRAINED
    if name == TINY_TEST_MODEL:
        logger.warning("%s is randomly initialised: its scores are meaningless", TINY_TEST_MODEL)
    return ModelSpec(model_name=name, pretrained=pretrained)


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise InvalidInputError(f"index name {name!r} is not allowed: {NAME_HELP}")
