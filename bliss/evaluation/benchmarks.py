"""Benchmarks by name: their classes, images, trials and dictionaries, as embeddings.

``prepare_benchmark`` turns a request ('cifar10' with 1, 6 and 9 normal classes, a folder,
an embeddings bundle, the synthetic set) into an :class:`EncodedBenchmark`, its settings
(columns of the table) and its encoded dictionary variants. Images and texts go through
the embedding cache, so only the first run of a model on a dataset encodes anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bliss.encoders import DEFAULT_PROMPT_TEMPLATE
from bliss.errors import InvalidInputError
from bliss.evaluation.embedding_cache import EmbeddingCache
from bliss.evaluation.encoded_benchmark import (
    BUNDLE_DICTIONARY,
    EncodedBenchmark,
    EncodedDictionary,
    load_test_split,
)
from bliss.evaluation.image_datasets import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CifarImages,
    FolderImages,
    ImageSet,
    TinyImageNetImages,
    folder_class_names,
    imagenet_synonyms,
    prompt_label,
    tinyimagenet_classes,
)
from bliss.evaluation.splits import (
    CIFAR10_SETTINGS,
    TWENTY_CLASSES,
    Setting,
    cifar10_trials,
    named_trials,
    parse_counts,
    twenty_class_trials,
)
from bliss.evaluation.synthetic import SYNTHETIC_DICTIONARY, SyntheticSpec, synthetic_benchmark

logger = logging.getLogger(__name__)

BENCHMARKS = ("cifar10", "cifar100", "tinyimagenet", "folder", "synthetic")
IMAGENET_MINUS_DATASET = "imagenet-minus-dataset"
_TITLES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "tinyimagenet": "TinyImageNet",
    "folder": "Folder",
    "synthetic": "Synthetic",
}


@dataclass(frozen=True)
class BenchmarkRequest:
    benchmark: str
    data_root: Path
    normal_classes: str | None = None  # '1,6,9' or, for folders, 'cat,dog'
    download: bool = True
    train_dir: Path | None = None
    test_dir: Path | None = None
    embeddings_dir: Path | None = None
    dictionaries: tuple[str, ...] = ()  # empty: the benchmark's default
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    seed: int = 0


@dataclass(frozen=True)
class PreparedBenchmark:
    benchmark: EncodedBenchmark
    settings: tuple[Setting, ...]
    dictionaries: dict[str, EncodedDictionary]  # in the order asked; the first is the base


@dataclass(frozen=True)
class _Source:
    """A named benchmark before encoding."""

    name: str
    title: str
    class_names: tuple[str, ...]  # prompt labels
    train: ImageSet | None
    test: ImageSet | None
    own_labels: tuple[str, ...]  # what 'imagenet-minus-dataset' leaves out
    settings: tuple[Setting, ...]


def default_dictionary(request: BenchmarkRequest) -> str:
    if request.benchmark == "synthetic":
        return SYNTHETIC_DICTIONARY
    if request.embeddings_dir is not None:
        return BUNDLE_DICTIONARY
    return "imagenet"


def prepare_benchmark(request: BenchmarkRequest, cache: EmbeddingCache | None) -> PreparedBenchmark:
    """Encode (or load) everything the request needs; ``cache`` None means no model."""
    if request.benchmark not in BENCHMARKS:
        raise InvalidInputError(
            f"unknown benchmark {request.benchmark!r}: use one of {', '.join(BENCHMARKS)}"
        )
    names = request.dictionaries or (default_dictionary(request),)
    if request.benchmark == "synthetic":
        return _synthetic(request, names)
    if request.embeddings_dir is not None:
        return _bundle(request, names, cache)
    if cache is None:
        raise InvalidInputError(f"benchmark {request.benchmark} needs a model to encode it")
    source = _source(request, None)
    template = request.prompt_template
    assert source.train is not None and source.test is not None
    # Images first: when they and the weights are both missing, one error names both.
    train, train_labels = cache.images(source.train, f"{source.name} train")
    test, test_labels = cache.images(source.test, f"{source.name} test")
    class_text = cache.texts(source.class_names, template, f"{source.name} class prompts")
    benchmark = EncodedBenchmark(
        name=source.name,
        title=source.title,
        class_names=source.class_names,
        class_text=class_text,
        train=train,
        train_labels=train_labels,
        test=test,
        test_labels=test_labels,
    )
    dictionaries = {name: _dictionary(name, source, cache, template) for name in names}
    return PreparedBenchmark(benchmark, source.settings, dictionaries)


def _synthetic(request: BenchmarkRequest, names: tuple[str, ...]) -> PreparedBenchmark:
    benchmark, available = synthetic_benchmark(SyntheticSpec())
    unknown = [name for name in names if name not in available]
    if unknown:
        raise InvalidInputError(
            f"--dictionary {unknown[0]}: the synthetic benchmark has its own dictionaries: "
            f"{', '.join(available)}"
        )
    counts = parse_counts(request.normal_classes, CIFAR10_SETTINGS, 1)
    settings = tuple(
        Setting(f"synthetic-{n}", f"Synthetic, {_classes(n)}", cifar10_trials(n)) for n in counts
    )
    return PreparedBenchmark(benchmark, settings, {name: available[name] for name in names})


def _bundle(
    request: BenchmarkRequest, names: tuple[str, ...], cache: EmbeddingCache | None
) -> PreparedBenchmark:
    from bliss.embedding_bundle import load_bundle

    assert request.embeddings_dir is not None
    bundle = load_bundle(request.embeddings_dir)
    test, test_labels = load_test_split(request.embeddings_dir, bundle.dim, len(bundle.class_names))
    source = _source(request, tuple(bundle.class_names))
    benchmark = EncodedBenchmark(
        name=source.name,
        title=source.title,
        class_names=tuple(bundle.class_names),
        class_text=bundle.class_text,
        train=bundle.normal,
        train_labels=bundle.normal_labels,
        test=test,
        test_labels=test_labels,
    )
    dictionaries = {}
    for name in names:
        if name == BUNDLE_DICTIONARY:
            dictionaries[name] = EncodedDictionary(
                name,
                f"embeddings:{request.embeddings_dir.resolve()}",
                bundle.dictionary_texts,
                bundle.dictionary,
            )
        elif cache is None:
            raise InvalidInputError(
                f"--dictionary {name} must be encoded: pass the --model (and --pretrained) that "
                "made the bundle's embeddings, or use the bundle's own dictionary ('bundle')"
            )
        else:
            dictionaries[name] = _dictionary(name, source, cache, request.prompt_template)
    return PreparedBenchmark(benchmark, source.settings, dictionaries)


def _source(request: BenchmarkRequest, bundle_classes: tuple[str, ...] | None) -> _Source:
    name = request.benchmark
    title = _TITLES[name]
    root = request.data_root
    if name == "folder":
        return _folder_source(request, bundle_classes)
    if name == "tinyimagenet":
        wnids, labels = zip(*tinyimagenet_classes(), strict=True)
        classes = tuple(labels)
        train: ImageSet = TinyImageNetImages(root, "train")
        test: ImageSet = TinyImageNetImages(root, "val")
        own = classes + tuple(imagenet_synonyms(wnids))
    else:
        raw = CIFAR10_CLASSES if name == "cifar10" else CIFAR100_CLASSES
        classes = tuple(prompt_label(c) for c in raw)
        train = CifarImages(name, root, True, request.download)
        test = CifarImages(name, root, False, request.download)
        own = classes
    if name == "cifar10":
        counts = parse_counts(request.normal_classes, CIFAR10_SETTINGS, 1)
        settings = tuple(
            Setting(f"{name}-{n}", f"{title}, {_classes(n)}", cifar10_trials(n)) for n in counts
        )
    else:
        parse_counts(request.normal_classes, (TWENTY_CLASSES,), TWENTY_CLASSES)
        trials = twenty_class_trials(name, len(classes))
        settings = (
            Setting(f"{name}-{TWENTY_CLASSES}", f"{title}, {_classes(TWENTY_CLASSES)}", trials),
        )
    if bundle_classes is not None:
        _check_bundle_classes(bundle_classes, classes, title)
    return _Source(name, title, classes, train, test, own, settings)


def _folder_source(request: BenchmarkRequest, bundle_classes: tuple[str, ...] | None) -> _Source:
    train = test = None
    if bundle_classes is not None:
        classes = bundle_classes
        trainable = classes
    else:
        if request.train_dir is None or request.test_dir is None:
            raise InvalidInputError(
                "the folder benchmark needs --train DIR and --test DIR (one sub-folder of images "
                "per class in each), or --embeddings-dir"
            )
        classes = tuple(folder_class_names(request.train_dir, request.test_dir))
        trainable = tuple(c for c in classes if (request.train_dir / c).is_dir())
        train = FolderImages(request.train_dir, classes)
        test = FolderImages(request.test_dir, classes)
    normal = (
        [part.strip() for part in request.normal_classes.split(",") if part.strip()]
        if request.normal_classes is not None
        else list(trainable)
    )
    trials = named_trials(classes, normal)
    setting = Setting(f"folder-{len(normal)}", f"Folder, {_classes(len(normal))}", trials)
    return _Source("folder", "Folder", classes, train, test, tuple(classes), (setting,))


def own_labels(request: BenchmarkRequest) -> tuple[str, ...]:
    """What 'imagenet-minus-dataset' leaves out for the request's benchmark."""
    return _source(request, None).own_labels


def _check_bundle_classes(found: tuple[str, ...], expected: tuple[str, ...], title: str) -> None:
    if tuple(prompt_label(c) for c in found) != expected:
        raise InvalidInputError(
            f"the bundle's classes.txt does not list {title}'s {len(expected)} classes in the "
            f"standard order ({', '.join(expected[:3])}, ...): the trials index classes by "
            "position, so write them in that order (or evaluate it as the folder benchmark)"
        )


def _dictionary(
    name: str, source: _Source, cache: EmbeddingCache, template: str
) -> EncodedDictionary:
    from bliss.dictionaries import imagenet_dictionary, resolve_dictionary

    if name == IMAGENET_MINUS_DATASET:
        dictionary = imagenet_dictionary(exclude=source.own_labels)
    elif name in (BUNDLE_DICTIONARY, SYNTHETIC_DICTIONARY):
        raise InvalidInputError(f"--dictionary {name} only exists with its own benchmark")
    else:
        dictionary = resolve_dictionary(name)
    texts = list(dictionary.entries())
    if not texts:
        raise InvalidInputError(f"dictionary {name} has no entries")
    embeddings = cache.texts(texts, template, f"dictionary {name}")
    logger.info("dictionary %s: %d entries (%s)", name, len(texts), dictionary.source)
    return EncodedDictionary(name, dictionary.source, texts, embeddings)


def _classes(count: int) -> str:
    return f"{count} class" if count == 1 else f"{count} classes"
