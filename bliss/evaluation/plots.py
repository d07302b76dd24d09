"""The paper's diagnostic figures for an evaluation run, as PNG files (matplotlib, Agg).

- Fig. 2, text clustering: similarities of class labels to dictionary entries versus of
  normal images to their own label.
- Fig. 3, similarity bias: error rates along the test images' mean similarity to the
  dictionary (deciles). Images are flagged at the threshold that flags as many images as
  there are anomalies; per decile, the bars are the share of its anomalies missed (false
  negatives) and of its normal images flagged (false positives), pooled over trials. A
  biased score misses text-like anomalies (right) and flags text-unlike normals (left).
- Fig. 4: internal class score versus external text score of BLISS, first trial, with the
  decision line IC + lambda * ET = threshold.
- ROC curves of the base methods, first trial.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bliss.errors import InvalidInputError
from bliss.evaluation.metrics import roc_curve
from bliss.evaluation.sweeps import Method, SweepConfig

if TYPE_CHECKING:
    from bliss.evaluation.encoded_benchmark import EncodedBenchmark, EncodedDictionary
    from bliss.evaluation.runner import SettingResult, TrialScores

QUANTILES = 10
SCATTER_POINTS = 4000
NORMAL_COLOUR = "tab:blue"
ANOMALY_COLOUR = "tab:orange"
_TITLES = {
    Method.IC_RAW: "raw label similarity",
    Method.IC: "Biased-CLIP (IC)",
    Method.BLISS: "BLISS",
    Method.MCM: "MCM",
    Method.DN2: "DN2",
}


def write_plots(
    folder: Path,
    benchmark: EncodedBenchmark,
    dictionary: EncodedDictionary,
    results: list[SettingResult],
    config: SweepConfig,
) -> list[Path]:
    """Every figure for ``results``; returns the files written."""
    pyplot = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = [_text_clustering(pyplot, folder, benchmark, dictionary)]
    for result in results:
        key = result.setting.key
        written.append(_error_share(pyplot, folder / f"{key}-fig3-error-share.png", result))
        first = result.trial_scores[0]
        if first.internal is not None and first.external is not None:
            path = folder / f"{key}-fig4-ic-vs-et.png"
            written.append(_scatter(pyplot, path, result, first, config.base_lambda))
        written.append(_roc(pyplot, folder / f"{key}-roc.png", result, first))
    return written


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InvalidInputError(
            "--plots needs matplotlib: pip install 'bliss-anomaly[eval]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _text_clustering(
    pyplot: Any, folder: Path, benchmark: EncodedBenchmark, dictionary: EncodedDictionary
) -> Path:
    label_dictionary = (benchmark.class_text @ dictionary.embeddings.T).ravel()
    has_label = benchmark.train_labels >= 0
    own_labels = benchmark.class_text[benchmark.train_labels[has_label]]
    image_label = np.einsum("nd,nd->n", benchmark.train[has_label], own_labels)
    figure, axes = pyplot.subplots(figsize=(7, 4))
    low = min(label_dictionary.min(), image_label.min())
    high = max(label_dictionary.max(), image_label.max())
    bins = np.linspace(low, high, 80)
    axes.hist(
        label_dictionary,
        bins=bins,
        density=True,
        alpha=0.6,
        color=NORMAL_COLOUR,
        label=f"class label to dictionary entry (mean {label_dictionary.mean():.2f})",
    )
    axes.hist(
        image_label,
        bins=bins,
        density=True,
        alpha=0.6,
        color=ANOMALY_COLOUR,
        label=f"image to its class label (mean {image_label.mean():.2f})",
    )
    axes.set_xlabel("cosine similarity")
    axes.set_ylabel("density")
    axes.set_title(f"{benchmark.title}: text clustering (dictionary: {dictionary.name})")
    axes.legend(fontsize=8)
    return _save(pyplot, figure, folder / f"{benchmark.name}-fig2-text-clustering.png")


def _error_share(pyplot: Any, path: Path, result: SettingResult) -> Path:
    present = result.trial_scores[0].scores
    methods = [m for m in (Method.IC_RAW, Method.IC, Method.BLISS) if m in present]
    decile = _deciles(result.dictionary_similarity)
    panels = max(1, len(methods))
    figure, axes = pyplot.subplots(
        1, panels, figsize=(4.2 * panels, 3.8), squeeze=False, sharey=True
    )
    positions = np.arange(QUANTILES)
    for axis, method in zip(axes[0], methods, strict=False):
        missed, anomalies = np.zeros(QUANTILES), np.zeros(QUANTILES)
        flagged_normal, normal = np.zeros(QUANTILES), np.zeros(QUANTILES)
        for trial in result.trial_scores:
            flagged = _flagged(trial.scores[method], trial.is_anomaly)
            anomalies += np.bincount(decile[trial.is_anomaly], minlength=QUANTILES)
            missed += np.bincount(decile[trial.is_anomaly & ~flagged], minlength=QUANTILES)
            normal += np.bincount(decile[~trial.is_anomaly], minlength=QUANTILES)
            flagged_normal += np.bincount(decile[~trial.is_anomaly & flagged], minlength=QUANTILES)
        axis.bar(
            positions - 0.2,
            _rates(missed, anomalies),
            0.4,
            color=NORMAL_COLOUR,
            label="false negatives (share of the decile's anomalies)",
        )
        axis.bar(
            positions + 0.2,
            _rates(flagged_normal, normal),
            0.4,
            color=ANOMALY_COLOUR,
            label="false positives (share of the decile's normal images)",
        )
        axis.set_xticks(positions, [str(q + 1) for q in positions])
        axis.set_xlabel("decile of mean similarity to the dictionary")
        axis.set_title(_TITLES[method])
    axes[0][0].set_ylabel("error rate")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(
        f"{result.setting.title}: errors by similarity to general text "
        "(threshold flags as many images as there are anomalies)",
        fontsize=10,
    )
    return _save(pyplot, figure, path)


def _deciles(values: np.ndarray) -> np.ndarray:
    edges = np.quantile(values, np.linspace(0, 1, QUANTILES + 1))
    return np.clip(np.searchsorted(edges, values, "right") - 1, 0, QUANTILES - 1)


def _flagged(scores: np.ndarray, is_anomaly: np.ndarray) -> np.ndarray:
    """The images flagged when as many are flagged as there are anomalies."""
    flagged = np.zeros(len(scores), dtype=bool)
    flagged[np.argsort(-scores, kind="stable")[: int(is_anomaly.sum())]] = True
    return flagged


def _rates(errors: np.ndarray, totals: np.ndarray) -> np.ndarray:
    return np.divide(errors, totals, out=np.zeros_like(errors), where=totals > 0)


def _scatter(
    pyplot: Any, path: Path, result: SettingResult, trial: TrialScores, lam: float
) -> Path:
    assert trial.internal is not None and trial.external is not None
    rng = np.random.default_rng(0)
    shown = rng.permutation(len(trial.is_anomaly))[:SCATTER_POINTS]
    figure, axes = pyplot.subplots(figsize=(5.5, 5))
    for anomalous, colour, label in (
        (False, NORMAL_COLOUR, "normal"),
        (True, ANOMALY_COLOUR, "anomaly"),
    ):
        picked = shown[trial.is_anomaly[shown] == anomalous]
        axes.scatter(
            trial.internal[picked],
            trial.external[picked],
            s=4,
            alpha=0.5,
            color=colour,
            label=label,
        )
    threshold = np.sort(trial.scores[Method.BLISS])[::-1][int(trial.is_anomaly.sum()) - 1]
    if lam != 0:
        xs, ys = np.array(axes.get_xlim()), axes.get_ylim()
        axes.set_ylim(*ys)  # the line must not stretch the axes
        axes.plot(
            xs,
            (threshold - xs) / lam,
            color="black",
            linewidth=1,
            linestyle="--",
            label=f"IC + {lam:g}·ET = threshold",
        )
    axes.set_xlabel("internal class score IC (eq. 5)")
    axes.set_ylabel("external text score ET (eq. 9)")
    normal = ", ".join(result.trials[0].normal)
    axes.set_title(f"{result.setting.title}, trial 0\nnormal: {_shorten(normal)}", fontsize=9)
    axes.legend(fontsize=8)
    return _save(pyplot, figure, path)


def _roc(pyplot: Any, path: Path, result: SettingResult, trial: TrialScores) -> Path:
    figure, axes = pyplot.subplots(figsize=(5.5, 5))
    for method, scores in trial.scores.items():
        curve = roc_curve(scores, trial.is_anomaly)
        row = next(r for r in result.rows if r.row.base and r.row.method is method)
        auroc = row.per_trial[0].auroc if row.per_trial[0] is not None else float("nan")
        axes.plot(curve.fpr, curve.tpr, label=f"{row.row.label}: {100 * auroc:.1f}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate (anomalies caught)")
    normal = ", ".join(result.trials[0].normal)
    axes.set_title(
        f"{result.setting.title}, trial 0 (AUROC %)\nnormal: {_shorten(normal)}", fontsize=9
    )
    axes.legend(fontsize=7, loc="lower right")
    return _save(pyplot, figure, path)


def _shorten(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _save(pyplot: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(temporary, format="png", dpi=120)
    pyplot.close(figure)
    os.replace(temporary, path)
    return path
