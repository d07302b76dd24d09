"""One class's statistics as a self-contained task: file paths in, arrays out.

A plain function of a picklable task, so the local backend calls it in-process and the
Ray backend ships it to a worker; both write the same workspace file afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bliss.calibration import holdout_split
from bliss.class_statistics import ClassMoments, StatisticsPath, class_statistics


@dataclass(frozen=True)
class ClassStatisticsTask:
    position: int
    label_embedding: np.ndarray  # float32 [D]
    dictionary_file: Path  # .npy float32 [t, D]
    normal_file: Path  # .npy float32 [n_i, D]
    calibration_fraction: float
    path: StatisticsPath


def run_class_statistics(task: ClassStatisticsTask) -> dict[str, np.ndarray]:
    """Eqs. 4 and 8 for one class, with its calibration hold-out set aside."""
    dictionary = np.load(task.dictionary_file, mmap_mode="r")
    normal = np.load(task.normal_file)
    kept, held_out = holdout_split(len(normal), task.calibration_fraction, task.position)
    moments = ClassMoments.of(normal[kept])
    stats = class_statistics(
        task.label_embedding, dictionary, moments, normal[kept], path=task.path
    )
    return {
        "label_mean": np.float64(stats.label_mean),
        "label_std": np.float64(stats.label_std),
        "entry_mean": stats.entry_mean,
        "entry_std": stats.entry_std,
        "count": np.int64(moments.count),
        "moment_sum": moments.total,
        "moment_outer": moments.outer,
        "held_out": normal[held_out],
        "path": np.array(stats.path.value),
    }
