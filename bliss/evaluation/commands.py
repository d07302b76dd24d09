"""``bliss eval`` (reproduce the paper's benchmarks) and ``bliss diagnose`` (text clustering)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bliss.errors import InvalidInputError
from bliss.settings import StoreSettings, add_store_arguments, settings_from_args

if TYPE_CHECKING:
    from bliss.encoders import ModelSpec
    from bliss.evaluation.benchmarks import BenchmarkRequest, PreparedBenchmark
    from bliss.evaluation.embedding_cache import EmbeddingCache
    from bliss.evaluation.runner import SettingResult
    from bliss.evaluation.sweeps import SweepConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
BENCHMARK_NAMES = ("cifar10", "cifar100", "tinyimagenet", "folder", "synthetic")
EVAL_EPILOG = """\
examples:
  bliss eval cifar10 --normal-classes 1 --model ViT-B-16 --pretrained openai
  bliss eval cifar10 --normal-classes 1,6,9 --lambda 0.1,0.25,0.5,0.75,1,2 --plots
  bliss eval cifar100 --shots 1,5,10,all --dictionary imagenet,imagenet-minus-dataset,wordnet
  bliss eval folder --train DIR --test DIR --normal-classes cat,dog --model local-dir:/models/clip
  bliss eval folder --embeddings-dir BUNDLE            (indexer bundle + test.npy, test_labels.npy)
  bliss eval synthetic --normal-classes 1,6,9 --plots  (no data or weights needed)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bliss eval`` and ``bliss diagnose``."""
    _register_eval(subparsers)
    _register_diagnose(subparsers)


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate BLISS and baselines on a benchmark (AUROC, AUPR, FPR95)",
        description="Encode a benchmark once per model (cached), score every trial with "
        "ic_raw, ic, bliss, MCM and DN2, and write a markdown table, a JSON file with every "
        "number and, with --plots, the paper's diagnostic figures.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("benchmark", choices=BENCHMARK_NAMES)
    data = parser.add_argument_group("benchmark")
    data.add_argument(
        "--normal-classes",
        metavar="LIST",
        help="cifar10/synthetic: 1, 6 or 9, or a list such as 1,6,9 (default 1); "
        "cifar100/tinyimagenet: 20; folder: class names, comma-separated (default: every "
        "class with training images)",
    )
    data.add_argument("--train", type=Path, metavar="DIR", help="folder: train/<class>/images")
    data.add_argument("--test", type=Path, metavar="DIR", help="folder: test/<class>/images")
    data.add_argument(
        "--data-root",
        type=Path,
        metavar="DIR",
        help="where datasets are read from and downloaded to (default: DATA_DIR/datasets): "
        "cifar-10-batches-py/, cifar-100-python/, tiny-imagenet-200/",
    )
    data.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    data.add_argument(
        "--embeddings-dir",
        type=Path,
        metavar="DIR",
        help="precomputed embeddings instead of images: the indexer's bundle (classes.txt, "
        "class_text.npy, normal.npy, normal_labels.npy, dictionary.txt/.npy) plus test.npy "
        "and test_labels.npy (-1 = anomaly of an unlisted class)",
    )
    data.add_argument("--trials", metavar="LIST", help="run only these trial numbers, e.g. 0,3")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        metavar="NAME",
        help=f"open_clip model or local-dir:PATH (default {DEFAULT_MODEL})",
    )
    model.add_argument(
        "--pretrained",
        metavar="TAG|FILE",
        help=f"pretrained tag or checkpoint file (default {DEFAULT_PRETRAINED} with "
        f"{DEFAULT_MODEL})",
    )
    model.add_argument(
        "--device", metavar="DEVICE", help="torch device (default: cuda when present, else cpu)"
    )
    model.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    model.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    model.add_argument(
        "--prompt-template", metavar="TEXT", help="default: 'This is a photo of a {label}'"
    )
    sweep = parser.add_argument_group("methods and sweeps (comma-separated lists)")
    sweep.add_argument(
        "--methods", metavar="LIST", help="some of ic_raw,ic,bliss,mcm,dn2 (default: all)"
    )
    sweep.add_argument(
        "--lambda", dest="lambdas", metavar="LIST", help="e.g. 0.1,0.25,0.5,0.75,1,2"
    )
    sweep.add_argument("--k", dest="ks", metavar="LIST", help="top-K entries, e.g. 1,5,10,20,50")
    sweep.add_argument(
        "--shots", metavar="LIST", help="normal images per class, e.g. 1,5,10,all (default all)"
    )
    sweep.add_argument(
        "--dictionary",
        dest="dictionaries",
        metavar="LIST",
        help="imagenet, imagenet-minus-dataset, wordnet, wordnet:DIR, file:PATH (first = base; "
        "default imagenet; 'bundle' with --embeddings-dir)",
    )
    sweep.add_argument("--grid", action="store_true", help="cross every swept axis")
    sweep.add_argument("--dn2-k", type=int, default=5, help="DN2 neighbours (default 5)")
    sweep.add_argument("--mcm-temperature", type=float, default=1.0, help="MCM softmax T")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the shots sampling")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default DATA_DIR/eval-results/BENCHMARK-TIME)",
    )
    output.add_argument("--plots", action="store_true", help="write the paper's figures as PNG")
    output.add_argument(
        "--save-scores", action="store_true", help="also write every score to scores.npz"
    )
    output.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="embedding cache (default DATA_DIR/eval-cache)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="data directory (env BLISS_DATA_DIR; default $XDG_DATA_HOME/bliss)",
    )
    parser.set_defaults(handler=run_eval)


def _register_diagnose(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diagnose",
        help="measure the text clustering effect of a stored index version",
        description="Print, per normal class and overall, the mean similarity of the class "
        "label to the dictionary entries (text-text), of the normal images to their label "
        "(image-label, the stored eq. 4 means) and the gap: whether the backbone shows the "
        "bias BLISS corrects.",
    )
    parser.add_argument("--index", required=True, help="index name")
    parser.add_argument("--version", type=int, help="version number (default: the active one)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_store_arguments(parser)
    parser.set_defaults(handler=run_diagnose)


# ------------------------------------------------------------------------------- eval


def run_eval(args: argparse.Namespace) -> int:
    from bliss.evaluation.benchmarks import prepare_benchmark

    settings = settings_from_args(StoreSettings, args)
    request = _request(args, settings.data_dir)
    config = _sweep_config(args, request)
    cache = _cache(args, settings.data_dir)
    prepared = _selected_trials(prepare_benchmark(request, cache), args.trials)
    results = _run(prepared, config, request.seed, args.save_scores)
    out = args.out or settings.data_dir / "eval-results" / f"{request.benchmark}-{_timestamp()}"
    report = _report(args, prepared, config, results, cache)
    if args.plots:
        from bliss.evaluation.plots import write_plots

        base = prepared.dictionaries[config.base_dictionary]
        written = write_plots(out / "plots", prepared.benchmark, base, results, config)
        report.plots = [str(path) for path in written]
    from bliss.evaluation.report import markdown, write_report

    markdown_path, json_path = write_report(report, out)
    if args.save_scores:
        _save_scores(out / "scores.npz", results)
    print(markdown(report))
    print(f"wrote {markdown_path} and {json_path}")
    for path in report.plots:
        print(f"wrote {path}")
    return 0


def _request(args: argparse.Namespace, data_dir: Path) -> BenchmarkRequest:
    from bliss.encoders import DEFAULT_PROMPT_TEMPLATE, format_prompt
    from bliss.evaluation.benchmarks import BenchmarkRequest

    template = args.prompt_template or DEFAULT_PROMPT_TEMPLATE
    format_prompt(template, "check")
    if args.seed < 0:
        raise InvalidInputError(f"--seed must be >= 0, got {args.seed}")
    if args.benchmark != "folder" and (args.train or args.test):
        raise InvalidInputError("--train and --test belong to the folder benchmark")
    dictionaries = ()
    if args.dictionaries:
        dictionaries = tuple(
            dict.fromkeys(p.strip() for p in args.dictionaries.split(",") if p.strip())
        )
    return BenchmarkRequest(
        benchmark=args.benchmark,
        data_root=args.data_root or data_dir / "datasets",
        normal_classes=args.normal_classes,
        download=not args.no_download,
        train_dir=args.train,
        test_dir=args.test,
        embeddings_dir=args.embeddings_dir,
        dictionaries=dictionaries,
        prompt_template=template,
        seed=args.seed,
    )


def _sweep_config(args: argparse.Namespace, request: BenchmarkRequest) -> SweepConfig:
    from bliss.evaluation.benchmarks import default_dictionary
    from bliss.evaluation.sweeps import (
        SweepConfig,
        parse_list,
        parse_methods,
        parse_shots,
    )

    config = SweepConfig(
        methods=parse_methods(args.methods),
        shots=parse_shots(args.shots),
        dictionaries=request.dictionaries or (default_dictionary(request),),
        grid=args.grid,
        dn2_k=args.dn2_k,
        mcm_temperature=args.mcm_temperature,
    )
    lambdas = parse_list(args.lambdas, float, "--lambda")
    if any(not math.isfinite(v) for v in lambdas):
        raise InvalidInputError(f"--lambda {args.lambdas!r}: every value must be finite")
    ks = parse_list(args.ks, int, "--k")
    if any(k < 1 for k in ks):
        raise InvalidInputError(f"--k {args.ks!r}: every K must be at least 1")
    if args.dn2_k < 1:
        raise InvalidInputError(f"--dn2-k must be at least 1, got {args.dn2_k}")
    if not args.mcm_temperature > 0:
        raise InvalidInputError(f"--mcm-temperature must be positive, got {args.mcm_temperature}")
    return replace(config, lambdas=lambdas or config.lambdas, ks=ks or config.ks)


def _model_spec(args: argparse.Namespace) -> ModelSpec:
    from bliss.encoders import ModelSpec

    name = args.model or DEFAULT_MODEL
    pretrained = args.pretrained
    if pretrained is None and name == DEFAULT_MODEL:
        pretrained = DEFAULT_PRETRAINED
    return ModelSpec(model_name=name, pretrained=pretrained)


def _cache(args: argparse.Namespace, data_dir: Path) -> EmbeddingCache | None:
    """The embedding cache of the model, or None where no model is involved."""
    if args.benchmark == "synthetic":
        if args.model or args.pretrained or args.embeddings_dir:
            logger.warning("the synthetic benchmark is generated embeddings: model options ignored")
        return None
    if args.embeddings_dir is not None and not args.model:
        return None
    from bliss.encoders import ClipEncoder
    from bliss.evaluation.embedding_cache import EmbeddingCache, encoder_identity

    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    spec = _model_spec(args)
    return EmbeddingCache(
        root=args.cache_dir or data_dir / "eval-cache",
        identity=encoder_identity(spec, args.precision),
        load_encoder=lambda: ClipEncoder.load(
            spec, device=args.device, precision=args.precision, batch_size=args.batch_size
        ),
    )


def _selected_trials(prepared: PreparedBenchmark, text: str | None) -> PreparedBenchmark:
    if text is None:
        return prepared
    from bliss.evaluation.sweeps import parse_list

    wanted = set(parse_list(text, int, "--trials"))
    settings = []
    for setting in prepared.settings:
        trials = tuple(t for t in setting.trials if t.index in wanted)
        if not trials:
            raise InvalidInputError(
                f"--trials {text}: {setting.title} has trials 0..{len(setting.trials) - 1}"
            )
        settings.append(replace(setting, trials=trials))
    return replace(prepared, settings=tuple(settings))


def _run(
    prepared: PreparedBenchmark, config: SweepConfig, seed: int, keep_scores: bool
) -> list[SettingResult]:
    from bliss.evaluation.runner import ClassWork, run_setting, search_test_split
    from bliss.evaluation.sweeps import Method

    scorer_methods = {Method.IC_RAW, Method.IC, Method.BLISS}
    searches = {}
    if scorer_methods & set(config.methods):
        k_max = max(config.ks)
        for name in config.dictionary_names:
            searches[name] = search_test_split(
                prepared.benchmark.test, prepared.dictionaries[name], k_max
            )
    class_work = ClassWork(prepared.benchmark, prepared.dictionaries)
    return [
        run_setting(
            prepared.benchmark,
            prepared.dictionaries,
            searches,
            setting,
            config,
            seed=seed,
            keep_all_scores=keep_scores,
            class_work=class_work,
        )
        for setting in prepared.settings
    ]


def _report(
    args: argparse.Namespace,
    prepared: PreparedBenchmark,
    config: SweepConfig,
    results: list[SettingResult],
    cache: EmbeddingCache | None,
) -> Any:
    from dataclasses import asdict

    from bliss.evaluation.report import EvaluationReport

    benchmark = prepared.benchmark
    return EvaluationReport(
        benchmark=benchmark.name,
        title=benchmark.title,
        model=_model_json(args, cache),
        dictionaries={
            name: {"source": d.source, "size": len(d.texts)}
            for name, d in prepared.dictionaries.items()
        },
        config=config,
        seed=args.seed,
        settings=results,
        text_clustering=_text_clustering(prepared, config),
        cache=[asdict(event) for event in cache.events] if cache is not None else [],
        options={
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if key != "handler"
        },
    )


def _model_json(args: argparse.Namespace, cache: EmbeddingCache | None) -> dict[str, Any]:
    from dataclasses import asdict

    if cache is not None:
        identity = asdict(cache.identity)
        weights = identity["weights"] or "no weights"
        return {"description": f"{identity['model']} ({weights})", **identity}
    if args.benchmark == "synthetic":
        return {"description": "generated embeddings with a planted bias (no model)"}
    return {"description": f"precomputed embeddings from {args.embeddings_dir}"}


def _text_clustering(prepared: PreparedBenchmark, config: SweepConfig) -> Any:
    import numpy as np

    from bliss.evaluation.diagnostics import embeddings_text_clustering

    benchmark = prepared.benchmark
    present = np.unique(benchmark.train_labels)
    return embeddings_text_clustering(
        tuple(benchmark.class_names[p] for p in present),
        benchmark.class_text[present],
        benchmark.train,
        np.searchsorted(present, benchmark.train_labels),
        prepared.dictionaries[config.base_dictionary].embeddings,
    )


def _save_scores(path: Path, results: list[SettingResult]) -> None:
    """scores.npz: '<setting>/<row>/<trial>' -> scores and '<setting>/<trial>/is_anomaly'."""
    import os

    import numpy as np

    arrays = {}
    for result in results:
        for name, scores in (result.all_scores or {}).items():
            arrays[f"{result.setting.key}/{name}"] = scores
        for trial, kept in zip(result.trials, result.trial_scores, strict=True):
            arrays[f"{result.setting.key}/{trial.index}/is_anomaly"] = kept.is_anomaly
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as stream:
        # numpy types savez(**kwds) as arrays, but mypy also matches a str-keyed dict
        # against its allow_pickle: bool keyword; the keys here are array names.
        np.savez(stream, **arrays)  # type: ignore[arg-type]
    os.replace(temporary, path)


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


# --------------------------------------------------------------------------- diagnose


def run_diagnose(args: argparse.Namespace) -> int:
    from bliss.evaluation.diagnostics import format_text_clustering, stored_text_clustering
    from bliss.store import Store

    settings = settings_from_args(StoreSettings, args)
    with Store.open(settings.resolved_store_url) as store:
        version = store.get_version(args.index, args.version)
        clustering, exact = stored_text_clustering(store, version, settings.data_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "index": version.label,
                    "model": version.model_name,
                    "exact_dictionary_vectors": exact,
                    **clustering.as_dict(),
                },
                indent=2,
            )
        )
        return 0
    title = (
        f"{version.label}: model {version.model_name} {version.model_weights}".rstrip()
        + f", dictionary {version.dictionary_source}, {len(clustering.class_names)} classes"
    )
    print(format_text_clustering(clustering, title))
    if not exact:
        print(
            f"(the {version.faiss_kind} index stores compressed vectors: the text-text figures "
            "use their approximations)"
        )
    return 0
