"""`bliss index build --target-recall R`: tuned on the normal images, recorded, reached."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bliss.recall_tuning import exact_neighbours, recall_at_k
from bliss.store import Store
from bliss.version_loader import load_scorer
from tests.cli_runner import run_cli
from tests.serving_fixtures import build_from_embeddings
from tests.synthetic_embeddings import SyntheticWorld


def clustered_world(seed: int = 0) -> SyntheticWorld:
    """Dictionary entries in tight clusters; normal images near some of them."""
    rng = np.random.default_rng(seed)
    dim, clusters = 32, 60
    centres = rng.standard_normal((clusters, dim))
    dictionary = centres[rng.integers(clusters, size=6000)] + 0.35 * rng.standard_normal(
        (6000, dim)
    )
    labels = rng.integers(3, size=300)
    normal = centres[rng.integers(clusters, size=300)] + 0.35 * rng.standard_normal((300, dim))

    def unit(rows: np.ndarray) -> np.ndarray:
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    return SyntheticWorld(
        dictionary=unit(dictionary),
        label_embeddings=unit(rng.standard_normal((3, dim))),
        normal=unit(normal),
        normal_labels=labels,
        test=unit(rng.standard_normal((10, dim))),
    )


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_target_recall_is_reached_and_recorded(tmp_path, kind):
    world = clustered_world()
    data = tmp_path / "data"
    build_from_embeddings(
        world, tmp_path / "bundle", data,
        extra=("--index-kind", kind, "--target-recall", "0.97", "--hnsw-m", "8",
               "--ef-search", "10", "--nprobe", "1"),
    )  # fmt: skip
    shown = run_cli("index", "describe", "demo", "--json", data_dir=data)
    tuning = json.loads(shown.stdout)["search_tuning"]
    assert tuning["parameter"] == ("efSearch" if kind == "hnsw" else "nprobe")
    assert tuning["target_recall"] == 0.97 and tuning["measured_recall"] >= 0.97
    assert tuning["max_bliss_score_change"] >= 0.0

    # Measured again, independently, through what the server runs.
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        scorer = load_scorer(store, store.get_version("demo"), data)
    queries = world.normal.astype(np.float32)
    similarities, served = scorer.index.search(queries, 10)
    assert recall_at_k(served, exact_neighbours(world.dictionary, queries, 10)) >= 0.96
    # The similarities of what is returned are exact, IVF-PQ's included (re-ranked).
    exact = np.einsum("bd,bkd->bk", queries.astype(np.float64), world.dictionary[served])
    np.testing.assert_allclose(similarities, exact, rtol=1e-6)
