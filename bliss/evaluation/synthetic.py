"""A generated benchmark with a planted modality gap and similarity bias.

It lets the harness run end to end where no dataset or weights exist, and it is built so
the effect BLISS corrects is present by construction:

- **modality gap / text clustering**: every text embedding (class label or dictionary
  entry) is mostly one shared "text" direction plus a little concept, so texts are about
  0.75 similar to each other; images sit around a separate "image" direction.
- **similarity bias**: each image carries a random amount ``b`` of the text direction,
  drawn from one distribution for normal images and anomalies alike. It raises the
  image's similarity to *every* text at once, so under the raw label similarity
  (``ic_raw``) text-like anomalies look normal and text-unlike normal images look
  anomalous. The dictionary similarities reveal ``b``; BLISS's external text score
  subtracts it.
- class labels lean towards the image cluster by different amounts, so some labels are
  closer to *every* image: that hurts the unnormalised ``ic_raw`` (any anomaly looks like
  such a class), and the per-class normalisation of ``ic`` (eq. 5) removes it.
- images carry image-only variation (background, pose) that no text sees, which is what
  makes nearest-neighbour distances (DN2) imperfect.

Ten classes, so the CIFAR-10 protocol (1, 6 or 9 normal classes) applies unchanged. The
dictionary holds random concepts plus one entry per class name; the
``synthetic-minus-dataset`` variant drops those, like "ImageNet minus the dataset's labels".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bliss.evaluation.encoded_benchmark import EncodedBenchmark, EncodedDictionary

SYNTHETIC_DICTIONARY = "synthetic"
SYNTHETIC_MINUS_DATASET = "synthetic-minus-dataset"
CLASS_NAMES = (
    "anchor", "bell", "cactus", "drum", "eagle", "fern", "guitar", "harp", "igloo", "jellyfish",
)  # fmt: skip
TEXT_WEIGHT = 0.86  # cos of a text embedding to the text direction: texts are ~0.75 alike


@dataclass(frozen=True)
class SyntheticSpec:
    dim: int = 64
    train_per_class: int = 200
    test_per_class: int = 100
    random_entries: int = 400
    bias: float = 0.15  # std of the per-image text-direction component b
    bias_mean: float = 0.25
    noise: float = 0.35  # isotropic image noise, in the concept subspace
    nuisance: float = 1.0  # image-only variation (background, pose): no text sees it
    label_offset: float = 0.3  # labels lean towards the image cluster by up to this much
    seed: int = 0


def synthetic_benchmark(
    spec: SyntheticSpec = SyntheticSpec(),
) -> tuple[EncodedBenchmark, dict[str, EncodedDictionary]]:
    """The benchmark and its two dictionary variants."""
    rng = np.random.default_rng(spec.seed)
    basis, _ = np.linalg.qr(rng.normal(size=(spec.dim, spec.dim)))
    text_direction, image_direction = basis[:, 0], basis[:, 1]
    concept_basis, nuisance_basis = basis[:, 2 : spec.dim // 2 + 1], basis[:, spec.dim // 2 + 1 :]

    def concepts(count: int) -> np.ndarray:
        return _unit_rows(rng.normal(size=(count, concept_basis.shape[1]))) @ concept_basis.T

    def texts(concept_rows: np.ndarray, offsets: np.ndarray | float = 0.0) -> np.ndarray:
        side = np.sqrt(1.0 - TEXT_WEIGHT**2)
        lean = np.reshape(offsets, (-1, 1)) * image_direction
        return _unit_rows(TEXT_WEIGHT * text_direction + side * concept_rows + lean)

    class_count = len(CLASS_NAMES)
    class_concepts = concepts(class_count)
    strength = rng.uniform(0.3, 0.5, size=class_count)  # how well images match their label
    offsets = rng.uniform(0.0, spec.label_offset, size=class_count)

    def images(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(class_count), per_class)
        bias = rng.normal(spec.bias_mean, spec.bias, size=len(labels))
        noise = rng.normal(size=(len(labels), concept_basis.shape[1])) @ concept_basis.T
        noise *= spec.noise / np.sqrt(concept_basis.shape[1])
        nuisance = rng.normal(size=(len(labels), nuisance_basis.shape[1])) @ nuisance_basis.T
        nuisance *= spec.nuisance / np.sqrt(nuisance_basis.shape[1])
        rows = (
            0.9 * image_direction
            + strength[labels, None] * class_concepts[labels]
            + bias[:, None] * text_direction
            + noise
            + nuisance
        )
        return _unit_rows(rows).astype(np.float32), labels.astype(np.int64)

    train, train_labels = images(spec.train_per_class)
    test, test_labels = images(spec.test_per_class)
    class_text = texts(class_concepts, offsets).astype(np.float32)
    random_texts = [f"concept {i:03d}" for i in range(spec.random_entries)]
    random_embeddings = texts(concepts(spec.random_entries)).astype(np.float32)
    benchmark = EncodedBenchmark(
        name="synthetic",
        title="Synthetic",
        class_names=CLASS_NAMES,
        class_text=class_text,
        train=train,
        train_labels=train_labels,
        test=test,
        test_labels=test_labels,
    )
    dictionaries = {
        SYNTHETIC_DICTIONARY: EncodedDictionary(
            SYNTHETIC_DICTIONARY,
            f"synthetic:seed={spec.seed}",
            random_texts + list(CLASS_NAMES),
            np.concatenate([random_embeddings, class_text]),
        ),
        SYNTHETIC_MINUS_DATASET: EncodedDictionary(
            SYNTHETIC_MINUS_DATASET,
            f"synthetic-minus-dataset:seed={spec.seed}",
            random_texts,
            random_embeddings,
        ),
    }
    return benchmark, dictionaries


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)
