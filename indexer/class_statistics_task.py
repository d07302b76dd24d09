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
from bliss.npy_files import NpyRows


@dataclass(frozen=True)
class ClassStatisticsTask:
    position: int
    label_embedding: np.ndarray  # float32 [D]
    dictionary_file: Path  # .npy float32 [t, D]
    normal_file: Path  # .npy float32 [n_i, D]
    calibration_fraction: float
    path: StatisticsPath
    entry_statistics: bool = True  # False in moments mode: no pass over the dictionary


def run_class_statistics(task: ClassStatisticsTask) -> dict[str, np.ndarray]:
    """Eqs. 4 and 8 for one class, with its calibration hold-out set aside.

    Without ``entry_statistics`` only eq. 4 and the class's moments are computed.
    """
    normal = np.load(task.normal_file)
    kept, held_out = holdout_split(len(normal), task.calibration_fraction, task.position)
    moments = ClassMoments.of(normal[kept])
    dictionary: np.ndarray | NpyRows
    if task.entry_statistics:
        # Read block by block: a memory map's pages would pile up in the resident set.
        dictionary = NpyRows(task.dictionary_file)
    else:
        dictionary = np.zeros((0, moments.dim), dtype=np.float32)
    stats = class_statistics(
        task.label_embedding, dictionary, moments, normal[kept], path=task.path
    )
    arrays = {
        "label_mean": np.float64(stats.label_mean),
        "label_std": np.float64(stats.label_std),
        "count": np.int64(moments.count),
        "moment_mean": moments.mean,
        "moment_covariance": moments.covariance,
        "held_out": normal[held_out],
        "path": np.array(stats.path.value),
    }
    if task.entry_statistics:
        arrays |= {"entry_mean": stats.entry_mean, "entry_std": stats.entry_std}
    return arrays
