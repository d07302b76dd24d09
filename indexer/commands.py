"""``bliss index``: build, list, show, activate and delete index versions."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bliss.class_statistics import StatisticsPath
from bliss.dictionary_index import IndexKind, IndexOptions
from bliss.errors import InvalidInputError
from bliss.indexer.build_inputs import DEFAULT_CHUNK_SIZE
from bliss.scoring import DEFAULT_K, DEFAULT_LAMBDA
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

if TYPE_CHECKING:
    from bliss.encoders import ModelSpec
    from bliss.indexer.build_inputs import BuildInputs
    from bliss.indexer.executors import Executor
    from bliss.indexer.pipeline import BuildOptions
    from bliss.store import Store, VersionRecord

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
NAME_HELP = "index name: letters, digits, '.', '_' or '-' (a version number is added per build)"


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="build and manage index versions")
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    _register_build(actions)

    listing = actions.add_parser("list", help="list index versions")
    listing.add_argument("--name", help="only this index name")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_store_arguments(listing)
    listing.set_defaults(handler=run_list)

    show = actions.add_parser("show", help="describe one index version and its classes")
    show.add_argument("name")
    show.add_argument("--version", type=int, help="version number (default: the active one)")
    show.add_argument("--json", action="store_true", help="print JSON")
    add_store_arguments(show)
    show.set_defaults(handler=run_show)

    activate = actions.add_parser("activate", help="make a ready version the active one")
    activate.add_argument("name")
    activate.add_argument("--version", type=int, required=True)
    add_store_arguments(activate)
    activate.set_defaults(handler=run_activate)

    delete = actions.add_parser("delete", help="delete a version that is not active")
    delete.add_argument("name")
    delete.add_argument("--version", type=int, required=True)
    add_store_arguments(delete)
    delete.set_defaults(handler=run_delete)


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
    scoring = build.add_argument_group("statistics and scoring defaults")
    scoring.add_argument(
        "--statistics-path", choices=[p.value for p in StatisticsPath], default="auto"
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


def run_build(args: argparse.Namespace) -> int:
    from bliss.indexer.pipeline import build_version

    settings = settings_from_args(StoreSettings, args)
    _check_name(args.name)
    executor = _executor(args)
    inputs, options = _inputs_and_options(args, executor)
    with _open_store(settings) as store:
        outcome = build_version(
            store,
            settings.data_dir,
            inputs,
            options,
            activate=args.activate,
            keep_workspace=args.keep_workspace,
            executor=executor,
        )
    version = outcome.version
    print(
        f"{'built' if outcome.built else 'unchanged'} {version.label} ({version.state.value}): "
        f"{version.dictionary_size:,} dictionary entries, dimension {version.embedding_dim}, "
        f"{version.faiss_kind} index, model {version.model_name} {version.model_weights}".rstrip()
    )
    for stage, seconds in outcome.stage_seconds.items():
        print(f"  {stage:<34} {seconds:8.2f} s")
    if version.state.value != "active":
        print(f"activate it with: bliss index activate {version.name} --version {version.version}")
    return 0


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
        default_k=args.default_k,
        default_lambda=args.default_lambda,
        calibration_fraction=args.calibration_fraction,
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
        lambda: executor.encoder(EncoderSettings(spec, args.device, args.batch_size)),
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


def run_list(args: argparse.Namespace) -> int:
    with _open_store(settings_from_args(StoreSettings, args)) as store:
        versions = store.list_versions(args.name)
    if args.json:
        print(json.dumps([_version_json(v) for v in versions], indent=2))
        return 0
    if not versions:
        print(
            "no index versions yet: build one with `bliss index build` (or try `bliss quickstart`)"
        )
        return 0
    print(
        f"{'NAME':<24} {'VER':>4} {'STATE':<9} {'DIM':>5} {'ENTRIES':>10} {'KIND':<6} "
        f"{'MODEL':<32} CREATED"
    )
    for v in versions:
        model = f"{v.model_name} {v.model_weights}".strip()
        print(
            f"{v.name:<24} {v.version:>4} {v.state.value:<9} {v.embedding_dim:>5} "
            f"{v.dictionary_size:>10,} {v.faiss_kind:<6} {model[:32]:<32} "
            f"{v.created_at:%Y-%m-%d %H:%M}"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    with _open_store(settings_from_args(StoreSettings, args)) as store:
        version = store.get_version(args.name, args.version)
        classes = store.load_classes(version.id)
    description = _version_json(version)
    description["classes"] = [
        {
            "position": c.position,
            "name": c.name,
            "prompt": c.prompt,
            "normal_images": c.sample_count,
            "label_mean": c.label_mean,
            "label_std": c.label_std,
        }
        for c in classes
    ]
    if args.json:
        print(json.dumps(description, indent=2))
        return 0
    for key, value in description.items():
        if key != "classes":
            print(f"{key:<20} {value}")
    print(f"classes ({len(classes)}):")
    for c in classes:
        print(
            f"  {c.position:>4}  {c.name:<30} {c.sample_count:>7} images  "
            f"label sim {c.label_mean:.4f} +- {c.label_std:.4f}"
        )
    return 0


def run_activate(args: argparse.Namespace) -> int:
    with _open_store(settings_from_args(StoreSettings, args)) as store:
        version = store.activate(store.get_version(args.name, args.version).id)
    print(f"{version.label} is active")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    settings = settings_from_args(StoreSettings, args)
    with _open_store(settings) as store:
        version = store.get_version(args.name, args.version)
        store.delete_version(version.id)
    if version.faiss_path:
        (settings.data_dir / version.faiss_path).unlink(missing_ok=True)
    print(f"deleted {version.label}")
    return 0


def _open_store(settings: StoreSettings) -> Store:
    from bliss.store import Store

    return Store.open(settings.resolved_store_url, migrate=True)


def _version_json(version: VersionRecord) -> dict:
    return {
        "name": version.name,
        "version": version.version,
        "label": version.label,
        "state": version.state.value,
        "model": version.model_name,
        "weights": version.model_weights,
        "embedding_dim": version.embedding_dim,
        "prompt_template": version.prompt_template,
        "dictionary_source": version.dictionary_source,
        "dictionary_size": version.dictionary_size,
        "faiss_kind": version.faiss_kind,
        "faiss_path": version.faiss_path,
        "default_k": version.default_k,
        "default_lambda": version.default_lambda,
        "created_at": version.created_at.isoformat(),
        "activated_at": version.activated_at.isoformat() if version.activated_at else None,
    }


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise InvalidInputError(f"index name {name!r} is not allowed: {NAME_HELP}")
