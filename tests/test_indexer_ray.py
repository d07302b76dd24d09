"""`--backend ray` builds exactly what the local backend builds (on a local Ray cluster)."""

from __future__ import annotations

import numpy as np
import pytest

from bliss.encoders import TINY_TEST_MODEL
from bliss.store import Store
from bliss.synthetic_images import write_shape_folders
from tests.cli_runner import run_cli
from tests.synthetic_embeddings import synthetic_world
from tests.test_indexer_embeddings import bundle_from

ray = pytest.importorskip(
    "ray", reason="Ray is the `distributed` extra: pip install -e '.[distributed]'"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def stored_version(data):
    with Store.open(f"sqlite:///{data / 'bliss.sqlite3'}") as store:
        version = store.get_version("r", 1)
        classes = store.load_classes(version.id)
        mean, std = store.all_entry_statistics(version.id, len(classes), version.dictionary_size)
        return classes, mean, std, list(store.iter_entry_texts(version.id))


def assert_same_builds(*builds):
    """Equal up to float32 rounding: Ray workers run torch with another thread count."""
    (classes_a, mean_a, std_a, texts_a), (classes_b, mean_b, std_b, texts_b) = builds
    assert texts_a == texts_b
    assert [(c.name, c.sample_count) for c in classes_a] == [
        (c.name, c.sample_count) for c in classes_b
    ]
    for a, b in zip(classes_a, classes_b, strict=True):
        np.testing.assert_allclose(a.label_embedding, b.label_embedding, atol=1e-6)
        np.testing.assert_allclose(
            [a.label_mean, a.label_std], [b.label_mean, b.label_std], atol=1e-6
        )
    np.testing.assert_allclose(mean_a, mean_b, atol=1e-6)
    np.testing.assert_allclose(std_a, std_b, atol=1e-6)
    assert not np.allclose(mean_a, 0)


def test_ray_backend_builds_the_same_version_from_embeddings(tmp_path):
    folder = bundle_from(
        synthetic_world(classes=3, entries=200, per_class=20, tests=1), tmp_path / "b"
    )
    builds = []
    for backend in ("local", "ray"):
        data = tmp_path / backend
        result = run_cli(
            "index", "build", "--name", "r", "--from-embeddings", folder,
            "--calibration-fraction", "0.2", "--backend", backend, data_dir=data,
        )  # fmt: skip
        assert result.code == 0, result.stderr
        builds.append(stored_version(data))
    assert_same_builds(*builds)


def test_ray_backend_encodes_images_on_actors(tmp_path):
    write_shape_folders(tmp_path / "images", ["circle", "square"], 5, seed=4)
    words = tmp_path / "words.txt"
    words.write_text("".join(f"word {i}\n" for i in range(50)))
    builds = []
    for backend in ("local", "ray"):
        data = tmp_path / backend
        result = run_cli(
            "index", "build", "--name", "r", "--from-images", tmp_path / "images",
            "--model", TINY_TEST_MODEL, "--dictionary", f"file:{words}", "--chunk-size", "16",
            "--backend", backend, "--ray-encoders", "2", data_dir=data,
        )  # fmt: skip
        assert result.code == 0, result.stderr
        builds.append(stored_version(data))
    assert_same_builds(*builds)
