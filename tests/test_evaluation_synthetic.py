"""The runner on synthetic embeddings with a planted modality gap and similarity bias."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from bliss.class_statistics import statistics_table
from bliss.dictionary_index import build_index
from bliss.evaluation.baselines import knn_distance_scores, mcm_scores, nearest_similarities
from bliss.evaluation.diagnostics import embeddings_text_clustering
from bliss.evaluation.runner import SettingResult, run_setting, search_test_split
from bliss.evaluation.splits import Setting, cifar10_trials
from bliss.evaluation.sweeps import Method, SweepConfig
from bliss.evaluation.synthetic import (
    CLASS_NAMES,
    SYNTHETIC_DICTIONARY,
    SyntheticSpec,
    synthetic_benchmark,
)
from bliss.scorer import Scorer, ScoringDefaults
from bliss.scoring import ScoringMode
from tests.cli_runner import run_cli

SMALL = SyntheticSpec(train_per_class=60, test_per_class=40)


def evaluate(spec: SyntheticSpec, normal_classes: int, config: SweepConfig, keep=False):
    benchmark, dictionaries = synthetic_benchmark(spec)
    searches = {
        name: search_test_split(benchmark.test, dictionaries[name], max(config.ks))
        for name in config.dictionary_names
    }
    setting = Setting("s", "S", cifar10_trials(normal_classes))
    result = run_setting(
        benchmark, dictionaries, searches, setting, config, seed=0, keep_all_scores=keep
    )
    return benchmark, dictionaries, result


def mean_auroc(result: SettingResult, method: Method) -> float:
    row = next(r for r in result.rows if r.row.base and r.row.method is method)
    return row.summary()["auroc"].mean


CONFIG = SweepConfig(dictionaries=(SYNTHETIC_DICTIONARY,))


@pytest.mark.parametrize("normal_classes", [1, 6, 9])
def test_bliss_beats_the_raw_similarity_on_the_planted_bias(normal_classes):
    _, _, result = evaluate(SMALL, normal_classes, CONFIG)
    bliss = mean_auroc(result, Method.BLISS)
    raw = mean_auroc(result, Method.IC_RAW)
    assert bliss > raw + 0.08, (bliss, raw)
    fpr = {r.row.method: r.summary()["fpr95"].mean for r in result.rows if r.per_trial[0]}
    assert fpr[Method.BLISS] < fpr[Method.IC_RAW] - 0.15


def test_the_gain_comes_from_the_planted_bias():
    _, _, biased = evaluate(SMALL, 6, CONFIG)
    _, _, unbiased = evaluate(
        SyntheticSpec(train_per_class=60, test_per_class=40, bias=0.0), 6, CONFIG
    )
    gain_with_bias = mean_auroc(biased, Method.BLISS) - mean_auroc(biased, Method.IC)
    gain_without = mean_auroc(unbiased, Method.BLISS) - mean_auroc(unbiased, Method.IC)
    assert gain_with_bias > 0.1
    assert abs(gain_without) < 0.03


def test_runner_scores_equal_the_scorer_with_a_real_index():
    config = SweepConfig(
        methods=(Method.IC_RAW, Method.IC, Method.BLISS),
        lambdas=(0.5, 0.75),
        ks=(10, 3),
        dictionaries=(SYNTHETIC_DICTIONARY,),
    )
    benchmark, dictionaries, result = evaluate(SMALL, 6, config, keep=True)
    trial = cifar10_trials(6)[1]
    data = benchmark.trial_data(trial, None, seed=0)
    dictionary = dictionaries[SYNTHETIC_DICTIONARY]
    scorer = Scorer.from_arrays(
        index=build_index(dictionary.embeddings),
        entry_texts=dictionary.texts,
        class_names=list(data.class_names),
        label_embeddings=data.label_embeddings,
        table=statistics_table(
            data.normal, data.normal_labels, data.label_embeddings, dictionary.embeddings
        ),
        defaults=ScoringDefaults(),
    )
    for number, row in enumerate(result.rows):
        mode = ScoringMode(row.row.method.value)
        expected = scorer.score(
            benchmark.test, mode=mode, k=row.row.k or 10, lam=row.row.lam or 0.5
        )
        kept = result.all_scores[f"{number}/{trial.index}"]
        np.testing.assert_allclose(kept, expected.score.astype(np.float32), rtol=1e-6)
        auroc = roc_auc_score(data.test_is_anomaly, expected.score)
        assert row.per_trial[1].auroc == pytest.approx(auroc, abs=1e-9)
        ap = average_precision_score(data.test_is_anomaly, expected.score)
        assert row.per_trial[1].aupr == pytest.approx(ap, abs=1e-9)


def test_rows_of_one_sweep_axis_vary_alone():
    config = SweepConfig(lambdas=(0.1, 0.5, 2.0), ks=(1, 10), shots=(1, None))
    labels = [row.label for row in config.rows()]
    assert labels[:5] == [
        "Raw label similarity (ic_raw)",
        "Biased-CLIP (ic, shots=all)",
        "BLISS (λ=0.5, K=10, shots=all)",
        "MCM (T=1)",
        "DN2 (k=5, shots=all)",
    ]
    assert "BLISS (λ=2, K=10, shots=all)" in labels
    assert "BLISS (λ=0.5, K=1, shots=all)" in labels
    assert "DN2 (k=5, shots=1)" in labels
    assert "BLISS (λ=2, K=1, shots=all)" not in labels  # not a grid
    grid = SweepConfig(lambdas=(0.1, 0.5), ks=(1, 10), grid=True).rows()
    assert sum(r.method is Method.BLISS for r in grid) == 4


def test_mcm_is_undefined_for_one_class_and_dn2_matches_a_naive_knn():
    config = SweepConfig(methods=(Method.MCM, Method.DN2), dictionaries=(SYNTHETIC_DICTIONARY,))
    benchmark, _, result = evaluate(SMALL, 1, config, keep=True)
    mcm, _ = result.rows
    assert mcm.per_trial == [None] * 10 and mcm.summary() is None and "one normal class" in mcm.note
    data = benchmark.trial_data(cifar10_trials(1)[4], None, seed=0)
    distances = np.linalg.norm(benchmark.test[:, None, :] - data.normal[None, :, :], axis=2)
    naive = np.sort(distances, axis=1)[:, :5].mean(axis=1)
    np.testing.assert_allclose(result.all_scores["1/4"], naive, rtol=1e-4, atol=1e-5)


def test_mcm_is_the_negative_max_softmax():
    rng = np.random.default_rng(1)
    test = rng.normal(size=(6, 8))
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    labels = rng.normal(size=(3, 8))
    logits = test @ labels.T / 0.5
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(mcm_scores(test, labels, 0.5), -softmax.max(axis=1))
    candidates = nearest_similarities(test, test[:2], k=5)
    assert candidates.shape == (6, 2)  # k capped at 2 images
    np.testing.assert_allclose(knn_distance_scores(candidates, 1)[:2], [0.0, 0.0], atol=1e-3)


def test_synthetic_set_shows_the_text_clustering_effect():
    benchmark, dictionaries, _ = evaluate(SMALL, 1, CONFIG)
    dictionary = dictionaries[SYNTHETIC_DICTIONARY].embeddings
    clustering = embeddings_text_clustering(
        benchmark.class_names,
        benchmark.class_text,
        benchmark.train,
        benchmark.train_labels,
        dictionary,
    )
    naive_text_text = (benchmark.class_text @ dictionary.T).mean()
    own = benchmark.class_text[benchmark.train_labels]
    naive_image_label = np.einsum("nd,nd->n", benchmark.train, own).mean()
    assert clustering.text_text == pytest.approx(naive_text_text, abs=1e-6)
    assert clustering.image_label == pytest.approx(naive_image_label, abs=1e-6)
    assert clustering.text_text > 0.65 and clustering.gap > 0.2


def test_synthetic_command_runs_the_paper_layout(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "eval", "synthetic", "--normal-classes", "1,9", "--trials", "0,3",
        "--lambda", "0.5,1", "--out", out, data_dir=tmp_path / "data",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    assert [s["key"] for s in report["settings"]] == ["synthetic-1", "synthetic-9"]
    assert [t["index"] for t in report["settings"][1]["trials"]] == [0, 3]
    assert report["settings"][1]["trials"][1]["normal_classes"] == [
        n for i, n in enumerate(CLASS_NAMES) if i != 3
    ]
    assert "| BLISS (λ=1, K=10) |" in result.stdout
    assert report["text_clustering"]["gap"] > 0.2
    assert report["cache"] == []  # generated embeddings: nothing encoded


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--normal-classes", "2"], "1, 6, 9"),
        (["--lambda", "0.5,nan"], "finite"),
        (["--k", "0"], "at least 1"),
        (["--k", "500"], "larger than dictionary"),
        (["--shots", "0"], "positive"),
        (["--methods", "bliss,knn"], "ic_raw"),
        (["--dictionary", "imagenet"], "own dictionaries"),
        (["--trials", "12"], "trials 0..9"),
    ],
)
def test_bad_options_fail_with_a_message(tmp_path, options, message):
    result = run_cli("eval", "synthetic", *options, data_dir=tmp_path)
    assert result.code == 2
    assert message in result.stderr
