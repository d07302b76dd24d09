"""Which classes are normal in each trial: the paper's protocol for every benchmark.

- CIFAR-10, 1 normal class: each class alone (10 trials); 9 classes: all but one (10
  trials); 6 classes: the 5 splits of ``benchmark_splits.json``.
- CIFAR-100 and TinyImageNet: 20 normal classes, the 5 splits of the same file
  (TinyImageNet indices are into the sorted list of its 200 wnids).
- A folder or an embeddings bundle: one trial with the named normal classes.

Every other class of the test split is anomalous. Class positions index the benchmark's
class list, and a trial lists its normal classes in split order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from bliss.errors import InvalidInputError

_SPLITS_RESOURCE = "data/benchmark_splits.json"
CIFAR10_SETTINGS = (1, 6, 9)
TWENTY_CLASSES = 20


@dataclass(frozen=True)
class Trial:
    index: int
    normal: tuple[int, ...]  # class positions, in split order


@dataclass(frozen=True)
class Setting:
    """One column of the paper's table: a benchmark with a number of normal classes."""

    key: str  # 'cifar10-6': file names and JSON
    title: str  # 'CIFAR-10, 6 classes': the table header
    trials: tuple[Trial, ...]


@functools.cache
def benchmark_splits() -> dict[str, Any]:
    """The packaged ``benchmark_splits.json``."""
    text = resources.files("bliss").joinpath(_SPLITS_RESOURCE).read_text("utf-8")
    return json.loads(text)


def cifar10_trials(normal_classes: int, class_count: int = 10) -> tuple[Trial, ...]:
    """The CIFAR-10 protocol for 1, 6 or 9 normal classes (also used by the synthetic set)."""
    if normal_classes == 1:
        return tuple(Trial(i, (i,)) for i in range(class_count))
    if normal_classes == class_count - 1:
        return tuple(
            Trial(i, tuple(c for c in range(class_count) if c != i)) for i in range(class_count)
        )
    if normal_classes == 6:
        splits = benchmark_splits()["cifar10"]["six_class_normal_splits"]
        return _listed_trials(splits, class_count)
    raise InvalidInputError(
        f"--normal-classes {normal_classes}: the CIFAR-10 protocol has 1, 6 or 9 normal classes"
    )


def twenty_class_trials(benchmark: str, class_count: int) -> tuple[Trial, ...]:
    """The 5 splits of 20 normal classes of 'cifar100' or 'tinyimagenet'."""
    return _listed_trials(benchmark_splits()[benchmark]["twenty_class_normal_splits"], class_count)


def named_trials(class_names: Sequence[str], normal: Sequence[str]) -> tuple[Trial, ...]:
    """One trial whose normal classes are ``normal`` (names from ``class_names``)."""
    positions = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in normal if name not in positions]
    if unknown:
        raise InvalidInputError(
            f"--normal-classes names {unknown[0]!r}, which is not a class here; the classes "
            f"are: {', '.join(class_names)}"
        )
    if len(set(normal)) != len(normal):
        raise InvalidInputError("--normal-classes lists a class twice")
    if not normal:
        raise InvalidInputError("--normal-classes is empty: name at least one normal class")
    return (Trial(0, tuple(positions[name] for name in normal)),)


def _listed_trials(splits: list[list[int]], class_count: int) -> tuple[Trial, ...]:
    for split in splits:
        if not all(0 <= c < class_count for c in split):
            raise InvalidInputError(
                f"a split in {_SPLITS_RESOURCE} names a class outside 0..{class_count - 1}"
            )
    return tuple(Trial(i, tuple(split)) for i, split in enumerate(splits))


def parse_counts(text: str | None, allowed: Sequence[int], default: int) -> tuple[int, ...]:
    """A comma-separated ``--normal-classes`` list of class counts ('1,6,9')."""
    if text is None:
        return (default,)
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidInputError(
            f"--normal-classes {text!r}: use a comma-separated list of "
            f"{', '.join(map(str, allowed))}"
        ) from None
    bad = [c for c in counts if c not in allowed]
    if bad:
        raise InvalidInputError(
            f"--normal-classes {bad[0]}: this benchmark has settings "
            f"{', '.join(map(str, allowed))} (the paper's protocol)"
        )
    return tuple(dict.fromkeys(counts))
