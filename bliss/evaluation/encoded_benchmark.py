"""A benchmark as embeddings: what every trial is evaluated on, whatever encoded it.

Filled by the embedding cache (real datasets), by an embeddings bundle folder, or by the
synthetic generator. A trial picks its normal classes out of it: their training images
are the normal bank (all of them, or ``shots`` per class drawn with a seeded generator),
and the whole test split is scored, every image of another class being an anomaly.

The evaluation bundle is the indexer's precomputed-embeddings folder (see
``bliss.embedding_bundle``) plus two files, so a plain indexer bundle stays valid::

    test.npy            float32 [m, D]  test image embeddings
    test_labels.npy     int [m]         index into classes.txt, or -1 for an image of a
                                        class outside classes.txt (always an anomaly)

``normal.npy``/``normal_labels.npy`` are then the training images of every class that
can be normal in some trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bliss.embedding_bundle import load_numeric_array
from bliss.errors import InvalidInputError, NotFoundError
from bliss.evaluation.splits import Trial

TEST_FILES = ("test.npy", "test_labels.npy")
BUNDLE_DICTIONARY = "bundle"


@dataclass(frozen=True)
class EncodedDictionary:
    name: str  # the variant as the table names it: 'imagenet', 'wordnet', 'file:words.txt'
    source: str  # where its entries came from, as bliss.dictionaries names it
    texts: list[str]
    embeddings: np.ndarray  # float32 [t, D], unit rows


@dataclass(frozen=True)
class TrialData:
    trial: Trial
    class_names: tuple[str, ...]  # the normal classes, in trial order
    label_embeddings: np.ndarray  # float32 [N, D]
    normal: np.ndarray  # float32 [n, D]
    normal_labels: np.ndarray  # int64 [n], 0..N-1
    test_is_anomaly: np.ndarray  # bool [m]


@dataclass(frozen=True)
class EncodedBenchmark:
    name: str  # 'cifar10'
    title: str  # 'CIFAR-10'
    class_names: tuple[str, ...]  # prompt labels, by class position
    class_text: np.ndarray  # float32 [C, D] prompt embeddings
    train: np.ndarray  # float32 [n, D]
    train_labels: np.ndarray  # int64 [n], class positions
    test: np.ndarray  # float32 [m, D]
    test_labels: np.ndarray  # int64 [m], class positions or -1

    def trial_data(self, trial: Trial, shots: int | None, seed: int) -> TrialData:
        """The normal bank and anomaly labels of ``trial`` (``shots`` images per class)."""
        normal = np.asarray(trial.normal, dtype=np.int64)
        rng = np.random.default_rng([seed, trial.index, shots or 0])
        rows, labels = [], []
        for position, class_position in enumerate(normal):
            members = np.flatnonzero(self.train_labels == class_position)
            if len(members) == 0:
                raise InvalidInputError(
                    f"normal class {self.class_names[class_position]!r} has no training images"
                )
            if shots is not None and shots < len(members):
                members = np.sort(rng.choice(members, size=shots, replace=False))
            rows.append(members)
            labels.append(np.full(len(members), position, dtype=np.int64))
        picked = np.concatenate(rows)
        return TrialData(
            trial=trial,
            class_names=tuple(self.class_names[c] for c in normal),
            label_embeddings=self.class_text[normal],
            normal=self.train[picked],
            normal_labels=np.concatenate(labels),
            test_is_anomaly=~np.isin(self.test_labels, normal),
        )


def load_test_split(folder: Path, dim: int, class_count: int) -> tuple[np.ndarray, np.ndarray]:
    """``test.npy`` (unit rows) and ``test_labels.npy`` of an evaluation bundle."""
    missing = [name for name in TEST_FILES if not (folder / name).is_file()]
    if missing:
        raise NotFoundError(
            f"embeddings folder {folder} lacks {', '.join(missing)}: evaluation needs the test "
            "images besides the indexer's files: test.npy (float32 [m, D]) and "
            "test_labels.npy (int [m], the index into classes.txt, or -1 for an image of a "
            "class not listed there)"
        )
    test = load_numeric_array(folder / "test.npy")
    labels = load_numeric_array(folder / "test_labels.npy")
    if test.ndim != 2 or test.shape[1] != dim or test.shape[0] == 0:
        raise InvalidInputError(
            f"{folder / 'test.npy'} has shape {test.shape}, expected a non-empty [m, {dim}] array"
        )
    if not np.issubdtype(test.dtype, np.floating):
        raise InvalidInputError(f"{folder / 'test.npy'} has dtype {test.dtype}, expected float32")
    if labels.shape != (test.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(
            f"{folder / 'test_labels.npy'} has shape {labels.shape} and dtype {labels.dtype}, "
            f"expected integers [{test.shape[0]}] (one per test.npy row)"
        )
    outside = np.flatnonzero((labels < -1) | (labels >= class_count))
    if len(outside):
        row = int(outside[0])
        raise InvalidInputError(
            f"{folder / 'test_labels.npy'} row {row} is {int(labels[row])}: use -1 or "
            f"0..{class_count - 1} (classes.txt)"
        )
    norms = np.linalg.norm(test.astype(np.float64), axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise InvalidInputError(
            f"{folder / 'test.npy'} row {int(bad[0])} contains NaN, inf or only zeros"
        )
    return (test / norms[:, None]).astype(np.float32), labels.astype(np.int64)
