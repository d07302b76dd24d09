"""``bliss eval folder`` on generated images with the tiny model: cache, report, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from bliss.encoders import TINY_TEST_MODEL, ClipEncoder, ModelSpec
from bliss.evaluation.embedding_cache import EmbeddingCache, encoder_identity
from bliss.evaluation.image_datasets import FolderImages
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import run_cli

NORMAL = ["circle", "square", "triangle"]
ANOMALOUS = ["cross", "ring"]
WORDS = ["cat", "dog", "circle", "box", "star", "tree", "wheel", "line", "dot", "cloud", "sun"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shape_folders(root / "train", NORMAL, 8, seed=1)
    write_shape_folders(root / "test", NORMAL + ANOMALOUS, 4, seed=2)
    words = root / "words.txt"
    words.write_text("".join(f"{w}\n" for w in WORDS))
    return root, words


@pytest.fixture
def encoder_loads(monkeypatch):
    """Counts ClipEncoder.load calls (each one is a model load for encoding)."""
    calls = []
    original = ClipEncoder.load.__func__

    def counting_load(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ClipEncoder, "load", classmethod(counting_load))
    return calls


def folder_eval(root, words, out, *extra):
    return [
        "eval",
        "folder",
        "--train",
        root / "train",
        "--test",
        root / "test",
        "--model",
        TINY_TEST_MODEL,
        "--dictionary",
        f"file:{words}",
        "--k",
        "3,5",
        "--out",
        out,
        *extra,
    ]


def auroc_table_rows(markdown: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## AUROC"))
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append(line)
    return [line.split("|")[1].strip() for line in table[2:]]  # past header and rule


def test_first_run_encodes_and_the_second_reads_the_cache(dataset, tmp_path, encoder_loads):
    root, words = dataset
    data = tmp_path / "data"
    first = run_cli(
        *folder_eval(root, words, tmp_path / "one", "--plots", "--save-scores"), data_dir=data
    )
    assert first.code == 0, first.stderr
    assert len(encoder_loads) == 1
    report = json.loads((tmp_path / "one" / "results.json").read_text())
    assert {(e["what"], e["hit"]) for e in report["cache"]} == {
        ("folder train", False),
        ("folder test", False),
        ("folder class prompts", False),
        (f"dictionary file:{words}", False),
    }
    assert (data / "eval-cache" / "images").is_dir()

    second = run_cli(*folder_eval(root, words, tmp_path / "two"), data_dir=data)
    assert second.code == 0, second.stderr
    assert len(encoder_loads) == 1  # no model was even loaded
    again = json.loads((tmp_path / "two" / "results.json").read_text())
    assert all(event["hit"] for event in again["cache"]) and len(again["cache"]) == 4
    assert again["settings"][0]["rows"] == report["settings"][0]["rows"]


def test_report_scores_plots_and_table(dataset, tmp_path):
    root, words = dataset
    out = tmp_path / "out"
    result = run_cli(
        *folder_eval(root, words, out, "--plots", "--save-scores"), data_dir=tmp_path / "data"
    )
    assert result.code == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    (setting,) = report["settings"]
    assert setting["key"] == "folder-3"
    (trial,) = setting["trials"]
    assert trial["normal_classes"] == NORMAL
    assert (trial["normal_images"], trial["test_normal"], trial["test_anomalies"]) == (24, 12, 8)

    # Every AUROC and FPR95 in the JSON equals scikit-learn's on the saved scores.
    scores = np.load(out / "scores.npz")
    is_anomaly = scores["folder-3/0/is_anomaly"]
    # Classes in name order: circle, cross, ring, square, triangle.
    assert is_anomaly.tolist() == [False] * 4 + [True] * 8 + [False] * 8
    for number, row in enumerate(setting["rows"]):
        row_scores = scores[f"folder-3/{number}/0"]
        assert row["per_trial"][0]["auroc"] == pytest.approx(
            roc_auc_score(is_anomaly, row_scores), abs=1e-6
        )
        fpr, tpr, _ = roc_curve(is_anomaly, row_scores, drop_intermediate=False)
        assert row["per_trial"][0]["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])

    markdown = (out / "results.md").read_text()
    methods = [row["label"] for row in setting["rows"]]
    assert auroc_table_rows(markdown) == methods
    assert methods[:5] == [
        "Raw label similarity (ic_raw)",
        "Biased-CLIP (ic)",
        "BLISS (λ=0.5, K=3)",  # the default K=10 is not listed: the first value is the base
        "MCM (T=1)",
        "DN2 (k=5)",
    ]
    assert methods[5:] == ["BLISS (λ=0.5, K=5)"]
    assert markdown in result.stdout

    plots = sorted((out / "plots").iterdir())
    assert [p.name for p in plots] == [
        "folder-3-fig3-error-share.png",
        "folder-3-fig4-ic-vs-et.png",
        "folder-3-roc.png",
        "folder-fig2-text-clustering.png",
    ]
    for plot in plots:
        content = plot.read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 5000
        width, height = int.from_bytes(content[16:20], "big"), int.from_bytes(content[20:24], "big")
        assert width > 300 and height > 300
    assert report["plots"] == [str(out / "plots" / p) for p in report_plot_order()]


def report_plot_order():
    return [
        "folder-fig2-text-clustering.png",
        "folder-3-fig3-error-share.png",
        "folder-3-fig4-ic-vs-et.png",
        "folder-3-roc.png",
    ]


def test_cache_keys_separate_models_preprocessing_and_datasets(dataset, tmp_path):
    root, _ = dataset
    tiny = encoder_identity(ModelSpec(TINY_TEST_MODEL))
    assert tiny.preprocessing["image_size"] == 32
    vit = encoder_identity(ModelSpec("ViT-B-16", "openai"))  # configs only: no weights needed
    assert vit.preprocessing["image_size"] == 224
    assert vit.preprocessing["preprocess"]["interpolation"] == "bicubic"
    assert vit.weights == "openai"

    def folder_of(identity, images) -> str:
        cache = EmbeddingCache(tmp_path, identity, lambda: None)
        key = {"kind": "images", "identity": identity.__dict__, "dataset": images.identity}
        return cache._folder(key).name

    train = FolderImages(root / "train", tuple(NORMAL))
    test = FolderImages(root / "test", tuple(NORMAL))
    assert folder_of(tiny, train) != folder_of(vit, train)
    assert folder_of(tiny, train) != folder_of(tiny, test)
    before = train.identity
    (root / "train" / "circle" / "circle_000.png").touch()  # a changed file, a new key
    assert FolderImages(root / "train", tuple(NORMAL)).identity != before


def test_a_crash_while_writing_leaves_no_entry(dataset, tmp_path, monkeypatch):
    root, words = dataset
    data = tmp_path / "data"
    real_save = np.save

    def failing_save(file, array, *args, **kwargs):
        if getattr(array, "dtype", None) == np.int64:  # the labels, after the embeddings
            raise KeyboardInterrupt
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    interrupted = run_cli(*folder_eval(root, words, tmp_path / "out"), data_dir=data)
    assert interrupted.code == 130  # the command line's exit status for an interrupt
    images = data / "eval-cache" / "images"
    assert list(images.iterdir()) == []  # neither an entry nor a temporary folder
    monkeypatch.setattr(np, "save", real_save)
    result = run_cli(*folder_eval(root, words, tmp_path / "out"), data_dir=data)
    assert result.code == 0, result.stderr
    assert len(list(images.iterdir())) == 2


def test_the_paper_command_fails_fast_without_weights_or_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network attempt at all
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run_cli(
        "eval",
        "cifar10",
        "--normal-classes",
        "1",
        "--model",
        "ViT-B-16",
        "--pretrained",
        "openai",
        "--no-download",
        data_dir=tmp_path / "data",
    )
    assert result.code == 2
    message = result.stderr.strip()
    assert message.count("\n") == 0 and message.startswith("error: the weights of model ViT-B-16")
    assert "--pretrained /path/to/that/file" in message and "local-dir:" in message
    assert "cifar-10-batches-py" in message and "--data-root" in message
