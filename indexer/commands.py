"""``bliss index``: build, list, show, activate and delete index versions."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from bliss.class_statistics import StatisticsPath
from bliss.dictionary_index import IndexKind, IndexOptions
from bliss.errors import InvalidInputError
from bliss.indexer import version_commands
from bliss.indexer.build_inputs import DEFAULT_CHUNK_SIZE
from bliss.indexer.image_checks import DEFAULT_MAX_IMAGE_PIXELS
from bliss.scoring import DEFAULT_K, DEFAULT_LAMBDA, MAX_LAMBDA
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

if TYPE_CHECKING:
    from bliss.encoders import ModelSpec
    from bliss.indexer.build_inputs import BuildInputs
    from bliss.indexer.executors import Executor
    from bliss.indexer.image_sources import ImageClass
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
    _report(outcome, skipped_images=_skipped_images(inputs))
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
        print(f"activate it with: bliss index activate {version.name} --version {version.version}")


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
    if not (math.isfinite(args.default_lambda) and 0 <= args.default_lambda <= MAX_LAMBDA):
        raise InvalidInputError(
            f"--default-lambda must be a finite number between 0 and {MAX_LAMBDA:g}, "
            f"got {args.default_lambda}"
        )
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
        encode_precision="fp32" if args.from_embeddings else args.precision,
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
    from bliss.indexer.build_inputs import ImageFolderInputs
    from bliss.indexer.executors import EncoderSettings
    from bliss.indexer.pipeline import ModelIdentity

    # The dictionary and model are checked first: the image check can take minutes.
    dictionary = resolve_dictionary(args.dictionary)
    spec = _model_spec(args)
    classes = _image_classes(args)
    inputs = ImageFolderInputs(
        classes,
        dictionary,
        lambda: executor.encoder(
            EncoderSettings(spec, args.device, args.batch_size, args.precision)
        ),
        template,
        chunk_size=args.chunk_size,
        # Not part of the build's identity, but they change the embeddings' rounding:
        # resumed chunks are reused only under the same ones.
        encoding={"batch_size": args.batch_size, "device": args.device, "backend": args.backend},
    )
    return (
        inputs,
        ModelIdentity(spec.model_name, spec.weights_id, spec.checksum()),
        dictionary.source,
    )


# Options that only one image source reads: (flag, the source's argument).
_SOURCE_OPTIONS = {
    "class_from": ("--class-from", "from_webdataset"),
    "image_column": ("--image-column", "from_parquet"),
    "label_column": ("--label-column", "from_parquet"),
}


def _image_classes(args: argparse.Namespace) -> list[ImageClass]:
    """The normal images of the chosen source, every one checked before any encoding."""
    from bliss.indexer.dataset_sources import scan_parquet, scan_webdataset
    from bliss.indexer.image_checks import check_images
    from bliss.indexer.image_sources import scan_image_folder

    for option, (flag, source) in _SOURCE_OPTIONS.items():
        if getattr(args, option) is not None and not getattr(args, source):
            raise InvalidInputError(f"{flag} applies to --{source.replace('_', '-')} only")
    if args.from_webdataset:
        classes = scan_webdataset(args.from_webdataset, args.class_from or "cls", args.class_map)
    elif args.from_parquet:
        classes = scan_parquet(
            args.from_parquet,
            args.image_column or "image",
            args.label_column or "label",
            args.class_map,
        )
    else:
        classes = scan_image_folder(args.from_images, args.class_map)
    return check_images(classes, max_pixels=args.max_image_pixels, skip_bad=args.skip_bad_images)


def _skipped_images(inputs: BuildInputs) -> int:
    from bliss.indexer.build_inputs import ImageFolderInputs

    if not isinstance(inputs, ImageFolderInputs):
        return 0
    return sum(image_class.skipped for image_class in inputs.classes)


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
