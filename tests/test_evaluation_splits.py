"""The paper's protocol: which classes are normal in each trial, and what the trial scores."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from bliss.errors import InvalidInputError
from bliss.evaluation.encoded_benchmark import EncodedBenchmark
from bliss.evaluation.image_datasets import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CifarImages,
    TinyImageNetImages,
    imagenet_synonyms,
    tinyimagenet_classes,
)
from bliss.evaluation.splits import (
    Trial,
    benchmark_splits,
    cifar10_trials,
    named_trials,
    twenty_class_trials,
)

# Copied by hand from ../shared/data/benchmark_splits.json: the packaged copy must match.
SIX_CLASS_SPLITS = [
    [0, 1, 9, 7, 3, 2],
    [0, 2, 4, 3, 7, 5],
    [5, 1, 9, 8, 7, 0],
    [5, 7, 1, 8, 4, 6],
    [8, 1, 5, 3, 4, 6],
]
TINYIMAGENET_FIRST_SPLIT_START = [192, 112, 145, 107, 91]


def fake_benchmark(classes: int, train_per_class: int, test_per_class: int) -> EncodedBenchmark:
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(classes), train_per_class)
    test_labels = np.repeat(np.arange(classes), test_per_class)
    return EncodedBenchmark(
        name="fake",
        title="Fake",
        class_names=tuple(f"c{i}" for i in range(classes)),
        class_text=rng.normal(size=(classes, 4)).astype(np.float32),
        # Row i of train is the vector (i, 0, 0, 0): the bank's rows name themselves.
        train=np.eye(4, dtype=np.float32)[[0] * len(train_labels)]
        * np.arange(len(train_labels))[:, None].astype(np.float32),
        train_labels=train_labels,
        test=rng.normal(size=(len(test_labels), 4)).astype(np.float32),
        test_labels=test_labels,
    )


def bank_rows(data) -> set[int]:
    return {int(v) for v in data.normal[:, 0]}


def test_cifar10_one_class_is_ten_trials_of_each_class_alone():
    trials = cifar10_trials(1)
    assert [t.normal for t in trials] == [(i,) for i in range(10)]
    benchmark = fake_benchmark(10, 5, 3)
    for trial in trials:
        data = benchmark.trial_data(trial, None, seed=0)
        (normal_class,) = trial.normal
        assert bank_rows(data) == set(np.flatnonzero(benchmark.train_labels == normal_class))
        assert data.class_names == (f"c{normal_class}",)
        assert set(benchmark.test_labels[data.test_is_anomaly]) == set(range(10)) - {normal_class}
        assert data.test_is_anomaly.sum() == 27


def test_cifar10_nine_classes_is_ten_trials_leaving_one_out():
    trials = cifar10_trials(9)
    assert len(trials) == 10
    benchmark = fake_benchmark(10, 5, 3)
    for left_out, trial in enumerate(trials):
        assert sorted(trial.normal) == [c for c in range(10) if c != left_out]
        data = benchmark.trial_data(trial, None, seed=0)
        assert set(benchmark.test_labels[data.test_is_anomaly]) == {left_out}
        assert len(data.normal) == 45


def test_cifar10_six_classes_follow_the_splits_file():
    trials = cifar10_trials(6)
    assert [list(t.normal) for t in trials] == SIX_CLASS_SPLITS
    benchmark = fake_benchmark(10, 4, 2)
    data = benchmark.trial_data(trials[2], None, seed=0)
    # Labels follow the split's order: class 5 is position 0, class 1 position 1, ...
    for position, class_position in enumerate(SIX_CLASS_SPLITS[2]):
        rows = data.normal[data.normal_labels == position][:, 0].astype(int)
        assert set(rows) == set(np.flatnonzero(benchmark.train_labels == class_position))
        assert np.array_equal(data.label_embeddings[position], benchmark.class_text[class_position])
    assert set(benchmark.test_labels[data.test_is_anomaly]) == {2, 3, 4, 6}


def test_other_cifar10_settings_are_refused():
    with pytest.raises(InvalidInputError, match="1, 6 or 9"):
        cifar10_trials(3)


def test_cifar100_is_five_blocks_of_twenty_fine_classes():
    trials = twenty_class_trials("cifar100", 100)
    assert [list(t.normal) for t in trials] == [list(range(20 * i, 20 * i + 20)) for i in range(5)]
    benchmark = fake_benchmark(100, 2, 1)
    data = benchmark.trial_data(trials[3], None, seed=0)
    assert set(benchmark.test_labels[~data.test_is_anomaly]) == set(range(60, 80))
    assert data.test_is_anomaly.sum() == 80


def test_tinyimagenet_is_five_splits_of_twenty_distinct_classes():
    trials = twenty_class_trials("tinyimagenet", 200)
    assert len(trials) == 5
    assert list(trials[0].normal[:5]) == TINYIMAGENET_FIRST_SPLIT_START
    for trial in trials:
        assert len(set(trial.normal)) == 20
        assert all(0 <= c < 200 for c in trial.normal)
    benchmark = fake_benchmark(200, 1, 1)
    data = benchmark.trial_data(trials[1], None, seed=0)
    assert (~data.test_is_anomaly).sum() == 20 and data.test_is_anomaly.sum() == 180


def test_splits_file_is_packaged_with_the_library():
    splits = benchmark_splits()
    assert set(splits) == {"cifar10", "cifar100", "tinyimagenet"}
    coarse = splits["cifar100"]["coarse_label_of_fine_label"]
    assert np.bincount(coarse).tolist() == [5] * 20


def test_images_of_unlisted_classes_are_anomalies():
    benchmark = fake_benchmark(3, 2, 2)
    labels = benchmark.test_labels.copy()
    labels[:2] = -1
    benchmark = EncodedBenchmark(**{**benchmark.__dict__, "test_labels": labels})
    data = benchmark.trial_data(Trial(0, (0, 1, 2)), None, seed=0)
    assert data.test_is_anomaly.tolist() == [True, True] + [False] * 4


def test_shots_sample_per_class_reproducibly():
    benchmark = fake_benchmark(4, 30, 2)
    trial = Trial(0, (2, 0))
    data = benchmark.trial_data(trial, 5, seed=7)
    for position, class_position in enumerate(trial.normal):
        rows = data.normal[data.normal_labels == position][:, 0].astype(int)
        assert len(rows) == 5
        assert set(rows) <= set(np.flatnonzero(benchmark.train_labels == class_position))
    again = benchmark.trial_data(trial, 5, seed=7)
    assert np.array_equal(data.normal, again.normal)
    other_seed = benchmark.trial_data(trial, 5, seed=8)
    assert not np.array_equal(data.normal, other_seed.normal)
    # More shots than images: all of them.
    assert len(benchmark.trial_data(trial, 100, seed=7).normal) == 60


def test_named_trials_check_the_names():
    assert named_trials(["a", "b", "c"], ["c", "a"]) == (Trial(0, (2, 0)),)
    with pytest.raises(InvalidInputError, match="'d'"):
        named_trials(["a", "b"], ["d"])
    with pytest.raises(InvalidInputError, match="twice"):
        named_trials(["a", "b"], ["a", "a"])


def test_class_lists():
    assert CIFAR10_CLASSES[:3] == ("airplane", "automobile", "bird")
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)  # torchvision's order
    classes = tinyimagenet_classes()
    assert len(classes) == 200 and [w for w, _ in classes] == sorted(w for w, _ in classes)
    assert dict(classes)["n02124075"] == "Egyptian cat"
    assert imagenet_synonyms(["n01443537"]) == ["goldfish", "Carassius auratus"]


def write_fake_cifar10(root, per_batch: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            "labels": list(rng.integers(0, 10, size=per_batch)),
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))


def test_cifar_is_read_through_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    write_fake_cifar10(tmp_path, per_batch=4)
    # torchvision checks the real files' md5 sums; these are stand-ins.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    images = CifarImages("cifar10", tmp_path, train=True, download=False)
    assert images.problem() is None
    loaded = images.load()
    assert len(loaded.items) == 20 and loaded.labels.shape == (20,)
    assert loaded.items[3].size == (32, 32)
    assert CifarImages("cifar10", tmp_path, train=False, download=False).load().labels.shape == (4,)


def test_missing_cifar_names_the_expected_layout(tmp_path):
    images = CifarImages("cifar10", tmp_path, train=True, download=False)
    problem = images.problem()
    assert problem is not None
    assert str(tmp_path / "cifar-10-batches-py") in problem
    assert "data_batch_1" in problem and "--data-root" in problem


def test_corrupt_cifar_files_are_reported(tmp_path):
    write_fake_cifar10(tmp_path, per_batch=2)  # md5 sums differ from the real files'
    with pytest.raises(InvalidInputError, match="corrupt"):
        CifarImages("cifar10", tmp_path, train=True, download=False).load()


def test_tinyimagenet_is_read_from_its_standard_layout(tmp_path):
    from PIL import Image

    folder = tmp_path / "tiny-imagenet-200"
    wnids = [wnid for wnid, _ in tinyimagenet_classes()]
    for wnid in (wnids[3], wnids[150]):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for number in range(2):
            Image.new("L", (64, 64)).save(images / f"{wnid}_{number}.JPEG")  # grey, as some are
    (folder / "val" / "images").mkdir(parents=True)
    annotations = []
    for number, wnid in enumerate([wnids[150], wnids[3], wnids[150]]):
        Image.new("RGB", (64, 64)).save(folder / "val" / "images" / f"val_{number}.JPEG")
        annotations.append(f"val_{number}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")

    train = TinyImageNetImages(tmp_path, "train").load()
    assert train.labels.tolist() == [3, 3, 150, 150]
    val = TinyImageNetImages(tmp_path, "val")
    assert val.load().labels.tolist() == [150, 3, 150]
    assert val.identity.startswith("tinyimagenet/val:")
    missing = TinyImageNetImages(tmp_path / "elsewhere", "val").problem()
    assert "val_annotations.txt" in missing and "tiny-imagenet-200" in missing


def test_imagenet_minus_dataset_drops_every_name_of_the_datasets_classes(tmp_path):
    from bliss.dictionaries import imagenet_dictionary
    from bliss.evaluation.benchmarks import BenchmarkRequest, own_labels

    full = set(imagenet_dictionary().entries())
    tiny = own_labels(BenchmarkRequest("tinyimagenet", tmp_path))
    remaining = set(imagenet_dictionary(exclude=tiny).entries())
    assert {"Egyptian cat", "goldfish", "Carassius auratus"} <= full - remaining
    assert "tench" in remaining  # not a TinyImageNet class
    cifar = own_labels(BenchmarkRequest("cifar100", tmp_path))
    assert "aquarium fish" in cifar and "maple tree" in cifar
