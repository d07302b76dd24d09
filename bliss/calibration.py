"""Calibration: turn a score into the share of held-out normal images that scored lower.

At build time (``--calibration-fraction F``) the indexer holds out a share of each
class's normal images, builds the statistics without them, scores them, and keeps their
sorted scores per mode. A later score s maps to ``normal_quantile`` = #{held-out < s} / n:
0.5 is a typical normal image, 0.999 is stranger than all but 0.1% of them.

``ic_raw`` and ``ic`` do not depend on K or lambda; ``bliss`` does, so its quantile is
only reported when a request uses the version's default K and lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bliss.errors import InvalidInputError
from bliss.scoring import ScoringMode


@dataclass(frozen=True)
class Calibration:
    k: int  # the K and lambda the bliss scores were computed with
    lam: float
    sorted_scores: dict[ScoringMode, np.ndarray]  # ascending float64, per mode

    @property
    def sample_count(self) -> int:
        return min(len(scores) for scores in self.sorted_scores.values())

    def applies_to(self, mode: ScoringMode, k: int, lam: float) -> bool:
        if mode not in self.sorted_scores:
            return False
        if mode is ScoringMode.BLISS:
            return k == self.k and math.isclose(lam, self.lam, rel_tol=0, abs_tol=1e-12)
        return True

    def normal_quantiles(
        self, scores: np.ndarray, *, mode: ScoringMode, k: int, lam: float
    ) -> np.ndarray | None:
        """Share of held-out normal scores strictly below each score, or None if n/a."""
        if not self.applies_to(mode, k, lam):
            return None
        reference = self.sorted_scores[mode]
        return np.searchsorted(reference, scores, side="left") / len(reference)


def holdout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (kept, held-out) row indices of one class's ``count`` normal images.

    At least one image is always kept for the statistics; a class too small to spare one
    gives none to calibration.
    """
    if not 0.0 <= fraction < 1.0:
        raise InvalidInputError(f"the calibration fraction must be in [0, 1), got {fraction}")
    held = min(round(count * fraction), count - 1)
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])
