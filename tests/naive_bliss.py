"""A deliberately naive BLISS, loop by loop, straight from the spec's equations.

The one place outside ``bliss.scoring`` where the equations are written out: tests
compare every scoring path (library, local CLI, server) against it.
"""

from __future__ import annotations

import numpy as np

from tests.synthetic_embeddings import SyntheticWorld

EPS = 1e-8


def naive_reference(world: SyntheticWorld, k: int, lam: float, mode: str) -> list[dict]:
    """BLISS written out loop by loop, straight from the spec's equations, in float64."""
    normal = world.normal.astype(np.float64)
    labels = world.label_embeddings.astype(np.float64)
    dictionary = world.dictionary.astype(np.float64)
    results = []
    for z in world.test.astype(np.float64):
        z = z / np.linalg.norm(z)
        entry_sims = [float(z @ d) for d in dictionary]
        top = sorted(range(len(dictionary)), key=lambda j: -entry_sims[j])[:k]  # eq. 7
        per_class = []
        for i in range(len(labels)):
            members = normal[world.normal_labels == i]
            label_sims = members @ labels[i]
            mu, sigma = label_sims.mean(), label_sims.std()  # eq. 4, ddof = 0
            ic = -(float(z @ labels[i]) - mu) / (sigma + EPS)  # eq. 5
            terms = []
            for j in top:
                sims_j = members @ dictionary[j]
                terms.append((entry_sims[j] - sims_j.mean()) / (sims_j.std() + EPS))  # eq. 8
            et = sum(terms) / len(terms)  # eq. 9
            if mode == "ic_raw":
                ic = -float(z @ labels[i])
                s = ic
            elif mode == "ic":
                s = ic
            else:
                s = ic + lam * et  # eq. 10
            per_class.append((s, ic, et))
        best = min(range(len(per_class)), key=lambda i: per_class[i][0])  # eq. 11
        results.append(
            {
                "score": per_class[best][0],
                "ic": per_class[best][1],
                "et": per_class[best][2],
                "nearest": best,
                "class_scores": [c[0] for c in per_class],
                "top": top,
            }
        )
    return results
