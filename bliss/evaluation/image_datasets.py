"""Where a benchmark's images come from: CIFAR via torchvision, TinyImageNet and plain folders.

An :class:`ImageSet` is one split of one dataset. It names itself (``identity``, part of
the embedding cache key), says why it cannot be read (``problem``) without reading it,
and loads lazily: nothing is decoded unless the embeddings are not cached yet.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

import numpy as np

from bliss.errors import InvalidInputError, NotFoundError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_FOLDER = "tiny-imagenet-200"
_CONNECT_TIMEOUT_S = 3.0

# torchvision's class names (the order of the labels in the CIFAR files).
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


def prompt_label(name: str) -> str:
    """A dataset's class name as the prompt says it: 'aquarium_fish' -> 'aquarium fish'."""
    return name.replace("_", " ")


@dataclass(frozen=True)
class LabelledImages:
    items: Sequence[Image.Image | Path]  # decoded on access
    labels: np.ndarray  # int64 [n], positions in the benchmark's class list


class ImageSet(Protocol):
    @property
    def identity(self) -> str:
        """A stable description of the content: part of the embedding cache key."""
        ...

    def problem(self) -> str | None:
        """Why the images cannot be loaded from here, or None when they can."""
        ...

    def load(self) -> LabelledImages: ...


class ArrayImages(Sequence):
    """uint8 [n, H, W, 3] pixels as a sequence of PIL images, made on access."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __getitem__(self, index: int) -> Image.Image:  # type: ignore[override]
        from PIL import Image

        return Image.fromarray(self.pixels[index])


# ---------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class CifarImages:
    """The train or test split of CIFAR-10 or CIFAR-100, read by torchvision from ``root``."""

    variant: str  # 'cifar10' | 'cifar100'
    root: Path
    train: bool
    download: bool

    @property
    def identity(self) -> str:
        # The files are fixed and md5-checked by torchvision: the name is the content.
        return f"{self.variant}/{'train' if self.train else 'test'}"

    @property
    def _layout(self) -> tuple[str, tuple[str, ...], str]:
        """The extracted folder, its files, and the archive they come from."""
        if self.variant == "cifar10":
            files = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
            return "cifar-10-batches-py", files, "cifar-10-python.tar.gz"
        return "cifar-100-python", ("train", "test", "meta"), "cifar-100-python.tar.gz"

    def _present(self) -> bool:
        folder, files, _ = self._layout
        return all((self.root / folder / name).is_file() for name in files)

    def problem(self) -> str | None:
        if self._present():
            return None
        folder, files, archive = self._layout
        title = "CIFAR-10" if self.variant == "cifar10" else "CIFAR-100"
        why = "--no-download was given" if not self.download else _unreachable(CIFAR_URL)
        if why is None:
            return None
        return (
            f"{title} was not found in {self.root} and cannot be downloaded from here ({why}). "
            f"Expected {self.root / folder}/ holding {', '.join(files)} (the extracted "
            f"{archive} from {CIFAR_URL}): copy it there, or point --data-root at the folder "
            f"that holds {folder}/"
        )

    def load(self) -> LabelledImages:
        from torchvision import datasets

        problem = self.problem()
        if problem is not None:
            raise NotFoundError(problem)
        dataset_type = datasets.CIFAR10 if self.variant == "cifar10" else datasets.CIFAR100
        try:
            dataset = dataset_type(
                str(self.root), train=self.train, download=self.download and not self._present()
            )
        except RuntimeError as error:  # torchvision's "not found or corrupted"
            folder = self.root / self._layout[0]
            raise InvalidInputError(
                f"{folder} is incomplete or corrupt ({error}): delete it and download the "
                f"dataset again ({CIFAR_URL})"
            ) from error
        expected = CIFAR10_CLASSES if self.variant == "cifar10" else CIFAR100_CLASSES
        if tuple(dataset.classes) != expected:
            raise InvalidInputError(
                f"{self.root}: the {self.variant} class list differs from torchvision's "
                "standard one; the files are not the standard dataset"
            )
        return LabelledImages(
            ArrayImages(np.asarray(dataset.data)), np.asarray(dataset.targets, dtype=np.int64)
        )


def _unreachable(url: str) -> str | None:
    """Why ``url`` cannot be reached from here (through the proxy, if any), or None."""
    from urllib.request import getproxies, proxy_bypass

    target = urlparse(url)
    proxy = getproxies().get(target.scheme)
    if proxy and not proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"{target.hostname}:{port} is not reachable ({error})"
    return None


# --------------------------------------------------------------------- TinyImageNet


def tinyimagenet_classes() -> list[tuple[str, str]]:
    """(wnid, label) of the 200 TinyImageNet classes, sorted by wnid (the splits' order)."""
    text = resources.files("bliss").joinpath("data/tinyimagenet_labels_to_wnids.txt")
    pairs = []
    for line in text.read_text("utf-8").splitlines():
        label, _, wnid = line.strip().rpartition(" ")
        pairs.append((wnid, prompt_label(label)))
    return sorted(pairs)


def imagenet_synonyms(wnids: Sequence[str]) -> list[str]:
    """Every ImageNet-1k dictionary name of the synsets ``wnids`` (class index = wnid rank)."""
    package = resources.files("bliss")
    all_wnids = sorted(
        line.split()[0]
        for line in package.joinpath("data/imagenet_wnid_index_label.txt")
        .read_text("utf-8")
        .splitlines()
        if line.strip()
    )
    wanted = {all_wnids.index(wnid) for wnid in wnids if wnid in all_wnids}
    names = []
    for line in package.joinpath("data/imagenet_classes.tsv").read_text("utf-8").splitlines():
        if line.startswith("#"):
            continue
        index, _, synonyms = line.partition("\t")
        if int(index) in wanted:
            names += [name.strip() for name in synonyms.split(",")]
    return names


@dataclass(frozen=True)
class TinyImageNetImages:
    """TinyImageNet's train or val split in its standard folder layout under ``root``."""

    root: Path
    split: str  # 'train' | 'val'

    @property
    def folder(self) -> Path:
        nested = self.root / TINYIMAGENET_FOLDER
        return nested if nested.is_dir() else self.root

    @property
    def identity(self) -> str:
        problem = self.problem()
        if problem is not None:
            raise NotFoundError(problem)
        digest = hashlib.sha256()
        for path, _ in self._labelled_files():
            digest.update(f"{path.relative_to(self.folder)}\0{path.stat().st_size}\n".encode())
        return f"tinyimagenet/{self.split}:{digest.hexdigest()[:16]}"

    def problem(self) -> str | None:
        folder = self.folder
        expected = (
            f"Expected {self.root / TINYIMAGENET_FOLDER}/ with train/<wnid>/images/*.JPEG, "
            "val/images/*.JPEG and val/val_annotations.txt (the extracted "
            f"{TINYIMAGENET_URL}): put it there or point --data-root at the folder that holds "
            f"{TINYIMAGENET_FOLDER}/"
        )
        if self.split == "val" and not (folder / "val" / "val_annotations.txt").is_file():
            return f"TinyImageNet's val split was not found under {self.root}. {expected}"
        if self.split == "train" and not (folder / "train").is_dir():
            return f"TinyImageNet's train split was not found under {self.root}. {expected}"
        return None

    def load(self) -> LabelledImages:
        problem = self.problem()
        if problem is not None:
            raise NotFoundError(problem)
        positions = {wnid: i for i, (wnid, _) in enumerate(tinyimagenet_classes())}
        files, labels = [], []
        for path, wnid in self._labelled_files():
            if wnid not in positions:
                raise InvalidInputError(
                    f"{path}: wnid {wnid} is not one of TinyImageNet's 200 classes"
                )
            files.append(path)
            labels.append(positions[wnid])
        if not files:
            raise InvalidInputError(f"no TinyImageNet {self.split} images under {self.folder}")
        return LabelledImages(files, np.asarray(labels, dtype=np.int64))

    def _labelled_files(self) -> Iterator[tuple[Path, str]]:
        folder = self.folder
        if self.split == "train":
            for class_folder in sorted(p for p in (folder / "train").iterdir() if p.is_dir()):
                for path in sorted((class_folder / "images").glob("*")):
                    if path.suffix.lower() in IMAGE_SUFFIXES:
                        yield path, class_folder.name
            return
        annotations = (folder / "val" / "val_annotations.txt").read_text("utf-8")
        for line in sorted(annotations.splitlines()):
            if line.strip():
                name, wnid = line.split("\t")[:2]
                yield folder / "val" / "images" / name, wnid


# --------------------------------------------------------------------------- folders


def folder_class_names(*roots: Path) -> list[str]:
    """The sorted union of the class sub-folder names of ``roots``."""
    names: set[str] = set()
    for root in roots:
        if not root.is_dir():
            raise NotFoundError(f"image folder {root} does not exist")
        names |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if not names:
        raise InvalidInputError(
            f"{', '.join(map(str, roots))} has no class sub-folders: put each class's images "
            "in <folder>/<class>/"
        )
    return sorted(names)


@dataclass(frozen=True)
class FolderImages:
    """``root/<class>/**/*.png|jpg|...``; labels are positions in ``class_names``."""

    root: Path
    class_names: tuple[str, ...]

    @property
    def identity(self) -> str:
        problem = self.problem()
        if problem is not None:
            raise NotFoundError(problem)
        digest = hashlib.sha256()
        for path, label in self._labelled_files():
            stat = path.stat()
            relative = path.relative_to(self.root)
            digest.update(f"{relative}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"folder:{self.root.resolve()}:{digest.hexdigest()[:16]}"

    def problem(self) -> str | None:
        if not self.root.is_dir():
            return f"image folder {self.root} does not exist"
        return None

    def load(self) -> LabelledImages:
        problem = self.problem()
        if problem is not None:
            raise NotFoundError(problem)
        pairs = list(self._labelled_files())
        if not pairs:
            raise InvalidInputError(f"{self.root} holds no images in class sub-folders")
        return LabelledImages(
            [path for path, _ in pairs], np.asarray([label for _, label in pairs], dtype=np.int64)
        )

    def _labelled_files(self) -> Iterator[tuple[Path, int]]:
        for label, name in enumerate(self.class_names):
            folder = self.root / name
            if folder.is_dir():
                for path in sorted(folder.rglob("*")):
                    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                        yield path, label
