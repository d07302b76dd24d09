"""The rows of an evaluation: methods at a base setting, then the swept variations.

The base setting takes each axis's default when it is listed (lambda 0.5, K 10, all
normal images, the benchmark's default dictionary), else the first value given. By
default each axis is swept alone with the others at base, as in the paper's ablations;
``grid`` crosses them all.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import TypeVar

from bliss.errors import InvalidInputError
from bliss.scoring import DEFAULT_K, DEFAULT_LAMBDA, ScoringMode

DEFAULT_DN2_K = 5
DEFAULT_MCM_TEMPERATURE = 1.0
ALL_SHOTS = None  # every normal training image of a class

_Value = TypeVar("_Value")


class Method(str, Enum):
    # The scorer's own modes under their ScoringMode names, then the paper's baselines.
    IC_RAW = ScoringMode.IC_RAW.value
    IC = ScoringMode.IC.value
    BLISS = ScoringMode.BLISS.value
    MCM = "mcm"
    DN2 = "dn2"

    @property
    def uses_normal_images(self) -> bool:
        return self in (Method.IC, Method.BLISS, Method.DN2)


# The paper's "Biased-CLIP" is the internal class score of eq. 5 (Table 1 equals Table 3's
# "w (5)" column); the un-normalised similarity is Table 3's "w/o (5)".
METHOD_TITLES = {
    Method.IC_RAW: "Raw label similarity",
    Method.IC: "Biased-CLIP",
    Method.BLISS: "BLISS",
    Method.MCM: "MCM",
    Method.DN2: "DN2",
}


@dataclass(frozen=True)
class Row:
    """One line of the table: a method at one setting of the parameters it uses."""

    method: Method
    lam: float | None = None
    k: int | None = None
    shots: int | None = ALL_SHOTS
    dictionary: str | None = None
    label: str = ""
    base: bool = True


@dataclass(frozen=True)
class SweepConfig:
    methods: tuple[Method, ...] = tuple(Method)
    lambdas: tuple[float, ...] = (DEFAULT_LAMBDA,)
    ks: tuple[int, ...] = (DEFAULT_K,)
    shots: tuple[int | None, ...] = (ALL_SHOTS,)
    dictionaries: tuple[str, ...] = ("imagenet",)
    grid: bool = False
    dn2_k: int = DEFAULT_DN2_K
    mcm_temperature: float = DEFAULT_MCM_TEMPERATURE

    @property
    def base_lambda(self) -> float:
        return _base(self.lambdas, DEFAULT_LAMBDA)

    @property
    def base_k(self) -> int:
        return _base(self.ks, DEFAULT_K)

    @property
    def base_shots(self) -> int | None:
        return _base(self.shots, ALL_SHOTS)

    @property
    def base_dictionary(self) -> str:
        return self.dictionaries[0]

    @property
    def dictionary_names(self) -> tuple[str, ...]:
        """The dictionaries some row needs (the base one always: it serves IC too)."""
        return self.dictionaries if Method.BLISS in self.methods else (self.base_dictionary,)

    def rows(self) -> list[Row]:
        base = [self._base_row(method) for method in self.methods]
        return [self._labelled(row) for row in base + self._swept_rows()]

    def _base_row(self, method: Method) -> Row:
        row = Row(method)
        if method.uses_normal_images:
            row = replace(row, shots=self.base_shots)
        if method is Method.BLISS:
            row = replace(row, lam=self.base_lambda, k=self.base_k, dictionary=self.base_dictionary)
        if method is Method.DN2:
            row = replace(row, k=self.dn2_k)
        return row

    def _swept_rows(self) -> list[Row]:
        rows: list[Row] = []
        bliss = self._base_row(Method.BLISS)
        if Method.BLISS in self.methods:
            if self.grid:
                for lam, k, shots, dictionary in itertools.product(
                    self.lambdas, self.ks, self.shots, self.dictionaries
                ):
                    row = replace(bliss, lam=lam, k=k, shots=shots, dictionary=dictionary)
                    if row != bliss:
                        rows.append(replace(row, base=False))
            else:
                rows += [replace(bliss, lam=v, base=False) for v in self.lambdas if v != bliss.lam]
                rows += [replace(bliss, k=v, base=False) for v in self.ks if v != bliss.k]
                rows += [
                    replace(bliss, dictionary=v, base=False)
                    for v in self.dictionaries
                    if v != bliss.dictionary
                ]
        for shots in self.shots:
            if shots == self.base_shots:
                continue
            for method in self.methods:
                grid_covered = self.grid and method is Method.BLISS
                if method.uses_normal_images and not grid_covered:
                    rows.append(replace(self._base_row(method), shots=shots, base=False))
        return rows

    def _labelled(self, row: Row) -> Row:
        parts = [row.method.value] if row.method in (Method.IC_RAW, Method.IC) else []
        if row.method is Method.BLISS:
            parts += [f"λ={row.lam:g}", f"K={row.k}"]
        if row.method is Method.DN2:
            parts.append(f"k={row.k}")
        if row.method is Method.MCM:
            parts.append(f"T={self.mcm_temperature:g}")
        if row.method.uses_normal_images and (len(self.shots) > 1 or row.shots is not ALL_SHOTS):
            parts.append(f"shots={format_shots(row.shots)}")
        if row.method is Method.BLISS and len(self.dictionaries) > 1:
            parts.append(f"dictionary={row.dictionary}")
        return replace(row, label=f"{METHOD_TITLES[row.method]} ({', '.join(parts)})")


def format_shots(shots: int | None) -> str:
    return "all" if shots is ALL_SHOTS else str(shots)


def _base(values: Sequence[_Value], default: _Value) -> _Value:
    return default if default in values else values[0]


def parse_list(text: str | None, parse: type, flag: str) -> tuple:
    """A comma-separated option value ('0.1,0.5') parsed item by item; None stays None."""
    if text is None:
        return ()
    try:
        values = tuple(parse(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidInputError(f"{flag} {text!r}: expected a comma-separated list") from None
    if not values:
        raise InvalidInputError(f"{flag} is empty")
    return tuple(dict.fromkeys(values))


def parse_shots(text: str | None) -> tuple[int | None, ...]:
    """'1,5,10,all' -> (1, 5, 10, None)."""
    if text is None:
        return (ALL_SHOTS,)
    values: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            values.append(ALL_SHOTS)
            continue
        if not part.isdigit() or int(part) < 1:
            raise InvalidInputError(
                f"--shots {text!r}: use positive numbers of images per class, or 'all'"
            )
        values.append(int(part))
    return tuple(dict.fromkeys(values))


def parse_methods(text: str | None) -> tuple[Method, ...]:
    if text is None:
        return tuple(Method)
    names = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(dict.fromkeys(Method(name) for name in names))
    except ValueError:
        valid = ", ".join(m.value for m in Method)
        raise InvalidInputError(f"--methods {text!r}: use some of {valid}") from None
