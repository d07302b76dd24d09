"""What the arguments of `bliss index build` mean: the build's inputs and options.

Turns the parsed command line into ``BuildInputs`` (embeddings, or images from folders,
webdataset shards, parquet files) and ``BuildOptions``, checking each option on the way.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import TYPE_CHECKING

from bliss.class_statistics import StatisticsPath
from bliss.dictionary_index import IndexKind, IndexOptions
from bliss.errors import InvalidInputError
from bliss.scoring import MAX_LAMBDA

if TYPE_CHECKING:
    from bliss.encoders import ModelSpec
    from bliss.indexer.build_inputs import BuildInputs
    from bliss.indexer.build_options import BuildOptions
    from bliss.indexer.executors import Executor
    from bliss.indexer.image_sources import ImageClass
    from bliss.milvus_dictionary import MilvusDictionaryOptions

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"


def inputs_and_options(
    args: argparse.Namespace, executor: Executor
) -> tuple[BuildInputs, BuildOptions]:
    from bliss.encoders import DEFAULT_PROMPT_TEMPLATE, format_prompt
    from bliss.indexer.build_options import BuildOptions
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
    dictionary_store = _dictionary_store(args)
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
        statistics_mode=StatisticsMode(
            args.statistics_mode or ("table" if dictionary_store is None else "moments")
        ),
        target_recall=args.target_recall,
        default_k=args.default_k,
        default_lambda=args.default_lambda,
        calibration_fraction=args.calibration_fraction,
        encode_precision="fp32" if args.from_embeddings else args.precision,
        dictionary_store=dictionary_store,
    )
    return inputs, options


def _dictionary_store(args: argparse.Namespace) -> MilvusDictionaryOptions | None:
    """None for FAISS; else where and how the version's Milvus collection is made."""
    from bliss.milvus_dictionary import MilvusDictionaryOptions

    if args.dictionary_store == "faiss":
        return None
    for flag, value in (
        ("--index-kind", args.index_kind != "flat"),
        ("--target-recall", args.target_recall),
    ):
        if value:
            raise InvalidInputError(
                f"{flag} applies to FAISS indexes: with --dictionary-store milvus:URI choose "
                "--milvus-index-type and --milvus-search-params instead"
            )
    return MilvusDictionaryOptions.parse(
        args.dictionary_store,
        index_type=args.milvus_index_type,
        index_params=_json_object("--milvus-index-params", args.milvus_index_params),
        search_params=_json_object("--milvus-search-params", args.milvus_search_params),
    )


def _json_object(flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(
            f"{flag} is not valid JSON ({error}): e.g. '{{\"nprobe\": 32}}'"
        ) from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _embedding_inputs(args: argparse.Namespace) -> tuple:
    from bliss.embedding_bundle import load_bundle
    from bliss.indexer.build_inputs import BundleInputs
    from bliss.indexer.build_options import ModelIdentity
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
    from bliss.indexer.build_options import ModelIdentity
    from bliss.indexer.executors import EncoderSettings

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


def skipped_images(inputs: BuildInputs) -> int:
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
