"""The results as the paper prints them (markdown) and as a JSON file with every number.

Markdown: one table per metric, one row per method, one column per setting, cells
"mean ± std" in percent; for the paper's benchmarks, the paper's own AUROC numbers follow
for comparison. JSON: fractions in [0, 1], per trial and summarised, with the trials'
normal classes, the sweep, the model and the dictionaries.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bliss.evaluation.diagnostics import TextClustering
from bliss.evaluation.metrics import METRIC_NAMES, MetricSummary
from bliss.evaluation.runner import RowResult, SettingResult
from bliss.evaluation.sweeps import SweepConfig, format_shots

METRIC_TITLES = {
    "auroc": "AUROC (%), higher is better",
    "aupr": "AUPR (%, anomalies positive), higher is better",
    "fpr95": "FPR at 95% TPR (%), lower is better",
}
MISSING = "–"

# The paper's AUROC (%) with ViT-B/16 and OpenAI weights: Table 1 (mean ± std) and, for
# the un-normalised score, Table 3's "w/o (5)" column (means only).
PAPER_AUROC: dict[str, dict[str, tuple[float, float | None] | None]] = {
    "cifar10-1": {
        "ic_raw": (94.69, None), "ic": (97.8, 0.9), "bliss": (99.1, 0.4),
        "mcm": None, "dn2": (96.2, 1.9),
    },
    "cifar10-6": {
        "ic_raw": (86.17, None), "ic": (93.2, 2.0), "bliss": (97.3, 0.8),
        "mcm": (89.8, 6.8), "dn2": (87.6, 5.2),
    },
    "cifar10-9": {
        "ic_raw": (82.16, None), "ic": (91.2, 3.3), "bliss": (96.0, 1.9),
        "mcm": (87.4, 13.6), "dn2": (83.7, 11.5),
    },
    "cifar100-20": {
        "ic_raw": None, "ic": (82.6, 2.6), "bliss": (89.4, 0.6),
        "mcm": (82.7, 1.2), "dn2": (78.2, 2.8),
    },
    "tinyimagenet-20": {
        "ic_raw": None, "ic": (81.3, 6.2), "bliss": (91.1, 1.8),
        "mcm": (82.6, 1.2), "dn2": (79.4, 2.4),
    },
}  # fmt: skip
PAPER_TITLES = {
    "ic_raw": "paper: w/o eq. 5 (Table 3)",
    "ic": "paper: Biased-CLIP",
    "bliss": "paper: BLISS (λ=0.5, K=10)",
    "mcm": "paper: MCM",
    "dn2": "paper: DN2 (CLIP features)",
}


@dataclass
class EvaluationReport:
    benchmark: str
    title: str
    model: dict[str, Any]
    dictionaries: dict[str, dict[str, Any]]
    config: SweepConfig
    seed: int
    settings: list[SettingResult]
    text_clustering: TextClustering | None
    cache: list[dict[str, Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # the command's parsed options


def markdown(report: EvaluationReport) -> str:
    model = report.model.get("description", "")
    lines = [
        f"# BLISS evaluation: {report.title}",
        "",
        f"Model: {model}. Dictionaries: "
        + ", ".join(f"{name} ({d['size']:,} entries)" for name, d in report.dictionaries.items())
        + f". Seed {report.seed}. Mean ± population std (ddof = 0) over trials; anomalies are "
        "the positive class.",
    ]
    for metric in METRIC_NAMES:
        lines += ["", f"## {METRIC_TITLES[metric]}", "", *_metric_table(report, metric)]
    notes = _notes(report)
    if notes:
        lines += ["", *notes]
    if report.text_clustering is not None:
        lines += ["", "## Text clustering (paper, Fig. 2)", "", *_clustering_table(report)]
    reference = _paper_table(report)
    if reference:
        lines += ["", "## The paper's AUROC (%), ViT-B/16 with OpenAI weights", "", *reference]
    return "\n".join(lines) + "\n"


def _metric_table(report: EvaluationReport, metric: str) -> list[str]:
    header = ["Method"] + [
        f"{r.setting.title} ({len(r.trials)} trial{'s' if len(r.trials) != 1 else ''})"
        for r in report.settings
    ]
    lines = [_table_line(header), _table_line(["---"] * len(header))]
    for position, row in enumerate(report.settings[0].rows):
        cells = [row.row.label]
        for result in report.settings:
            cells.append(_cell(result.rows[position], metric))
        lines.append(_table_line(cells))
    return lines


def _cell(row: RowResult, metric: str) -> str:
    summary = row.summary()
    if summary is None:
        return MISSING
    return _percent(summary[metric])


def _percent(value: MetricSummary) -> str:
    return f"{100 * value.mean:.1f} ± {100 * value.std:.1f}"


def _notes(report: EvaluationReport) -> list[str]:
    notes = []
    for result in report.settings:
        for row in result.rows:
            if row.note is not None:
                notes.append(f"- {row.row.label}, {result.setting.title}: {row.note}.")
    return notes


def _clustering_table(report: EvaluationReport) -> list[str]:
    clustering = report.text_clustering
    assert clustering is not None
    return [
        "| mean similarity | value |",
        "|---|---|",
        f"| class labels to dictionary entries (text-text) | {clustering.text_text:.3f} |",
        f"| normal images to their class label (image-label) | {clustering.image_label:.3f} |",
        f"| gap | {clustering.gap:+.3f} |",
    ]


def _paper_table(report: EvaluationReport) -> list[str]:
    results = [r for r in report.settings if r.setting.key in PAPER_AUROC]
    if not results:
        return []
    header = ["Method"] + [r.setting.title for r in results]
    lines = [_table_line(header), _table_line(["---"] * len(header))]
    for method, title in PAPER_TITLES.items():
        cells = [title]
        for result in results:
            value = PAPER_AUROC[result.setting.key][method]
            if value is None:
                cells.append(MISSING)
            else:
                mean, std = value
                cells.append(f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}"))
        lines.append(_table_line(cells))
    return lines


def _table_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def as_json(report: EvaluationReport) -> dict[str, Any]:
    return {
        "benchmark": report.benchmark,
        "title": report.title,
        "options": report.options,
        "model": report.model,
        "dictionaries": report.dictionaries,
        "seed": report.seed,
        "metrics": {
            "names": list(METRIC_NAMES),
            "scale": "fractions in [0, 1]",
            "positive_class": "anomaly (higher score = more anomalous)",
            "std": "population (ddof = 0) over trials",
        },
        "sweep": {
            "methods": [m.value for m in report.config.methods],
            "lambdas": list(report.config.lambdas),
            "ks": list(report.config.ks),
            "shots": [format_shots(s) for s in report.config.shots],
            "dictionaries": list(report.config.dictionaries),
            "grid": report.config.grid,
            "dn2_k": report.config.dn2_k,
            "mcm_temperature": report.config.mcm_temperature,
        },
        "settings": [_setting_json(result) for result in report.settings],
        "text_clustering": (
            None if report.text_clustering is None else report.text_clustering.as_dict()
        ),
        "paper_auroc_percent": {
            r.setting.key: PAPER_AUROC[r.setting.key]
            for r in report.settings
            if r.setting.key in PAPER_AUROC
        },
        "cache": report.cache,
        "plots": report.plots,
    }


def _setting_json(result: SettingResult) -> dict[str, Any]:
    return {
        "key": result.setting.key,
        "title": result.setting.title,
        "seconds": result.seconds,
        "trials": [
            {
                "index": t.index,
                "normal_classes": list(t.normal),
                "normal_images": t.normal_images,
                "test_normal": t.test_normal,
                "test_anomalies": t.test_anomalies,
            }
            for t in result.trials
        ],
        "rows": [_row_json(row) for row in result.rows],
    }


def _row_json(row: RowResult) -> dict[str, Any]:
    summary = row.summary()
    return {
        "label": row.row.label,
        "method": row.row.method.value,
        "lambda": row.row.lam,
        "k": row.row.k,
        "shots": format_shots(row.row.shots) if row.row.method.uses_normal_images else None,
        "dictionary": row.row.dictionary,
        "base": row.row.base,
        "note": row.note,
        "per_trial": [None if m is None else m.as_dict() for m in row.per_trial],
        "mean": None if summary is None else {k: v.mean for k, v in summary.items()},
        "std": None if summary is None else {k: v.std for k, v in summary.items()},
    }


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, "utf-8")
    os.replace(temporary, path)


def write_report(report: EvaluationReport, folder: Path) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.json`` into ``folder``; returns their paths."""
    markdown_path = folder / "results.md"
    json_path = folder / "results.json"
    write_text_atomically(markdown_path, markdown(report))
    write_text_atomically(json_path, json.dumps(as_json(report), indent=2) + "\n")
    return markdown_path, json_path
