"""The scorer against a deliberately naive, per-class, per-image reference of the spec."""

from __future__ import annotations

import numpy as np
import pytest

from bliss.class_statistics import statistics_table
from bliss.dictionary_index import IndexKind, IndexOptions, build_index
from bliss.errors import InvalidInputError
from bliss.scorer import Scorer, ScoringDefaults
from bliss.scoring import ScoringMode
from tests.naive_bliss import EPS, naive_reference
from tests.synthetic_embeddings import SyntheticWorld, synthetic_world


def scorer_for(world: SyntheticWorld, kind: IndexKind = IndexKind.FLAT) -> Scorer:
    table = statistics_table(
        world.normal, world.normal_labels, world.label_embeddings, world.dictionary
    )
    return Scorer.from_arrays(
        index=build_index(world.dictionary, IndexOptions(kind=kind)),
        entry_texts=[f"entry {i}" for i in range(len(world.dictionary))],
        class_names=[f"class {i}" for i in range(len(world.label_embeddings))],
        label_embeddings=world.label_embeddings,
        table=table,
        defaults=ScoringDefaults(eps=EPS),
    )


@pytest.mark.parametrize(
    ("classes", "entries", "k", "lam"),
    [(1, 40, 1, 0.5), (3, 200, 10, 0.5), (10, 300, 20, 0.75), (4, 60, 60, 2.0), (6, 150, 5, 0.0)],
)
@pytest.mark.parametrize("mode", ["bliss", "ic", "ic_raw"])
def test_scores_match_naive_reference(classes, entries, k, lam, mode):
    world = synthetic_world(classes=classes, entries=entries, per_class=25, tests=12, seed=classes)
    expected = naive_reference(world, k, lam, mode)
    batch = scorer_for(world).score(world.test, mode=ScoringMode(mode), k=k, lam=lam)

    assert np.max(np.abs(batch.score - [e["score"] for e in expected])) <= 1e-5
    assert np.max(np.abs(batch.internal_class_score - [e["ic"] for e in expected])) <= 1e-5
    assert np.max(np.abs(batch.external_text_score - [e["et"] for e in expected])) <= 1e-5
    assert np.max(np.abs(batch.class_scores - [e["class_scores"] for e in expected])) <= 1e-5
    assert batch.nearest_class.tolist() == [e["nearest"] for e in expected]
    assert batch.top_entry_ids.tolist() == [e["top"] for e in expected]


def test_modality_gap_is_present_in_the_synthetic_world():
    """The reference above is only meaningful if text and images really are apart."""
    world = synthetic_world(classes=5, entries=300, per_class=25, tests=10)
    text_text = (world.dictionary @ world.dictionary.T).mean()
    image_text = (world.normal @ world.dictionary.T).mean()
    assert text_text > 0.7
    assert image_text < text_text - 0.5


def test_external_term_is_reported_in_every_mode_and_added_only_by_bliss():
    world = synthetic_world(classes=3, entries=300, per_class=40, tests=6)
    scorer = scorer_for(world)
    ic = scorer.score(world.test, mode=ScoringMode.IC, k=10)
    for lam in (0.5, 2.0):
        bliss = scorer.score(world.test, mode=ScoringMode.BLISS, k=10, lam=lam)
        same = bliss.nearest_class == ic.nearest_class
        np.testing.assert_array_equal(bliss.external_text_score[same], ic.external_text_score[same])
        assert not np.allclose(bliss.class_scores, ic.class_scores)
        per_class_et = (bliss.class_scores - ic.class_scores) / lam
        chosen = per_class_et[np.arange(len(world.test)), bliss.nearest_class]
        np.testing.assert_allclose(chosen, bliss.external_text_score, atol=1e-12)


def test_unnormalised_embeddings_are_normalised():
    world = synthetic_world(classes=2, entries=50, per_class=10, tests=5)
    scorer = scorer_for(world)
    np.testing.assert_allclose(
        scorer.score(world.test * 4.0).score, scorer.score(world.test).score, atol=1e-9
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x: x[:, :-1], r"expected \[B, 32\]"),
        (lambda x: np.where(np.arange(len(x))[:, None] == 2, np.nan, x), "position 2 contains NaN"),
        (lambda x: np.where(np.arange(len(x))[:, None] == 1, 0.0, x), "position 1 is all zeros"),
        (lambda x: x[:0], "batch is empty"),
    ],
)
def test_bad_embeddings_are_rejected_with_the_position(mutate, message):
    world = synthetic_world(classes=2, entries=50, per_class=10, tests=5)
    with pytest.raises(InvalidInputError, match=message):
        scorer_for(world).score(mutate(world.test))


def test_k_larger_than_dictionary_is_rejected():
    world = synthetic_world(classes=2, entries=50, per_class=10, tests=5)
    with pytest.raises(InvalidInputError, match="between 1 and the dictionary size 50"):
        scorer_for(world).score(world.test, k=51)


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(InvalidInputError, match="ic_raw, ic, bliss"):
        ScoringMode.parse("biased")


@pytest.mark.parametrize("kind", [IndexKind.IVF, IndexKind.HNSW])
def test_approximate_indexes_agree_on_a_small_dictionary(kind):
    """With every list probed, IVF is exact; HNSW at this size finds the true top-K too."""
    world = synthetic_world(classes=3, entries=400, per_class=20, tests=10)
    exact = scorer_for(world).score(world.test)
    approximate = scorer_for(world, kind).score(world.test)
    np.testing.assert_allclose(approximate.score, exact.score, atol=1e-9)
