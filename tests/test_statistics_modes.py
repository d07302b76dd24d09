"""Moments mode (per-class mean and covariance) scores like table mode (per-entry rows)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bliss.scoring import ScoringMode
from bliss.store import StatisticsMode, Store
from bliss.version_loader import load_scorer
from tests.cli_runner import run_cli
from tests.naive_bliss import naive_reference
from tests.serving_fixtures import build_from_embeddings
from tests.synthetic_embeddings import synthetic_world


@pytest.mark.parametrize(
    ("kind", "per_class"),
    [("flat", 20), ("flat", 70), ("ivf", 20), ("ivfpq", 70)],
    ids=["flat-direct", "flat-moments-path", "ivf", "ivfpq"],
)
def test_moments_mode_scores_equal_table_mode(tmp_path, kind, per_class):
    # per_class 20 < D = 48: table mode takes the direct path, so the two modes share no
    # arithmetic; 70 > D: both evaluate the moments, one per entry, one per hit.
    world = synthetic_world(classes=3, entries=400, per_class=per_class, tests=24, dim=48)
    data = tmp_path / "data"
    extra = ("--index-kind", kind, "--nlist", "8", "--pq-m", "8")
    for name, mode in (("table", "table"), ("moments", "moments")):
        build_from_embeddings(
            world, tmp_path / name, data, name=name, extra=(*extra, "--statistics-mode", mode)
        )
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        table, moments = (store.get_version(name) for name in ("table", "moments"))
        assert moments.statistics_mode is StatisticsMode.MOMENTS
        assert store.count_entry_statistics(moments.id) == 0
        assert store.count_entry_statistics(table.id) == 3 * 400
        scorers = [load_scorer(store, version, data) for version in (table, moments)]
    assert [s.statistics.source for s in scorers] == ["mapped", "moments"]
    for mode, k, lam in [(ScoringMode.BLISS, 10, 0.5), (ScoringMode.BLISS, 3, 0.9)]:
        table_batch, moments_batch = (s.score(world.test, mode=mode, k=k, lam=lam) for s in scorers)
        np.testing.assert_array_equal(table_batch.top_entry_ids, moments_batch.top_entry_ids)
        np.testing.assert_allclose(moments_batch.score, table_batch.score, rtol=1e-9, atol=0)
        np.testing.assert_allclose(
            moments_batch.class_scores, table_batch.class_scores, rtol=1e-9, atol=1e-12
        )
        if kind == "flat":
            expected = [item["score"] for item in naive_reference(world, k, lam, mode.value)]
            np.testing.assert_allclose(moments_batch.score, expected, atol=1e-6)


def test_describe_names_the_statistics_mode(tmp_path):
    world = synthetic_world(classes=2, entries=80, per_class=6, tests=2, dim=16)
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "b", data, extra=("--statistics-mode", "moments"))
    shown = run_cli("index", "describe", "demo", "--json", data_dir=data)
    assert shown.code == 0, shown.stderr
    description = json.loads(shown.stdout)
    assert description["statistics_mode"] == "moments"
    assert description["serving_artifacts"] == "yes"
    text = run_cli("index", "describe", "demo", data_dir=data).stdout
    assert "statistics_mode      moments" in text
