"""Which CLIP model to load: :class:`ModelSpec`, its weights' identity and local files.

A model is an open_clip architecture with a pretrained tag or a checkpoint file, a
'local-dir:' folder in open_clip's Hugging Face layout, or the tiny random test model.
Nothing here imports torch or open_clip.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from bliss.checksums import file_sha256
from bliss.errors import InvalidInputError

TINY_TEST_MODEL = "bliss-tiny-random-TEST-ONLY"
LOCAL_DIR_PREFIX = "local-dir:"

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".npy")
# open_clip's own preference order for the weights file of a local-dir: folder
# (open_clip.factory._find_checkpoint_in_dir); kept equal so checksum() names the file it loads.
_LOCAL_DIR_PREFERRED_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_LOCAL_DIR_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP model to load and with which weights.

    ``model_name`` is an open_clip architecture ('ViT-B-16'), 'local-dir:/folder' (an
    open_clip_config.json plus a weights file) or TINY_TEST_MODEL. ``pretrained`` is an
    open_clip tag ('openai') or a checkpoint file; None only for the tiny model or local-dir.
    """

    model_name: str
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise InvalidInputError("the model name is empty: pass e.g. --model ViT-B-16")
        if self.local_dir is not None and self.pretrained is not None:
            raise InvalidInputError(
                f"{self.model_name} reads its weights from the folder, so --pretrained "
                f"{self.pretrained!r} would be ignored: drop --pretrained, or name an "
                "architecture (e.g. --model ViT-B-16) to load that checkpoint file"
            )

    @property
    def local_dir(self) -> Path | None:
        """The absolute folder of a 'local-dir:' model, else None."""
        if not self.model_name.startswith(LOCAL_DIR_PREFIX):
            return None
        return Path(os.path.abspath(Path(self.model_name[len(LOCAL_DIR_PREFIX) :]).expanduser()))

    @property
    def checkpoint_file(self) -> Path | None:
        """The absolute path when ``pretrained`` names a file rather than an open_clip tag.

        Tags are bare identifiers ('laion2b_s34b_b88k'); anything with a folder separator or a
        checkpoint suffix is a path, so the answer never depends on the current folder.
        """
        if self.pretrained is None:
            return None
        looks_like_path = (
            os.sep in self.pretrained
            or "/" in self.pretrained
            or self.pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)
        )
        if not looks_like_path:
            return None
        return Path(os.path.abspath(Path(self.pretrained).expanduser()))

    @property
    def weights_id(self) -> str:
        """What the store records: the tag, the absolute checkpoint or local-dir path, or ''."""
        if self.local_dir is not None:
            return str(self.local_dir)
        if self.checkpoint_file is not None:
            return str(self.checkpoint_file)
        if self.pretrained is None:
            return ""
        return clean_tag(self.pretrained)

    def checksum(self) -> str | None:
        """sha256 of the local weights file (a checkpoint or a local-dir's); None for tags."""
        if self.local_dir is not None:
            path = local_dir_weights(self.local_dir)
        elif self.checkpoint_file is not None:
            path = existing_checkpoint(self.checkpoint_file)
        else:
            return None
        stat = path.stat()
        return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def clean_tag(tag: str) -> str:
    """A pretrained tag as open_clip matches it: 'LAION2B-s34b-b88k' is 'laion2b_s34b_b88k'."""
    return tag.lower().replace("-", "_")


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so a replaced file is hashed again.
    return file_sha256(path)


def existing_checkpoint(path: Path) -> Path:
    """``path``, or InvalidInputError when it is not a file."""
    if not path.is_file():
        raise InvalidInputError(f"checkpoint file not found: {path}")
    return path


def local_dir_weights(folder: Path) -> Path:
    """The weights file open_clip loads from a 'local-dir:' folder."""
    if not folder.is_dir():
        raise InvalidInputError(f"model folder not found: {folder} (from --model local-dir:...)")
    if not (folder / "open_clip_config.json").is_file():
        raise InvalidInputError(
            f"{folder} has no open_clip_config.json: a local-dir: model folder holds "
            "open_clip_config.json and the weights, as in an open_clip Hugging Face repository"
        )
    for name in _LOCAL_DIR_PREFERRED_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(
        (p for p in folder.iterdir() if p.suffix in _LOCAL_DIR_WEIGHT_SUFFIXES and p.is_file()),
        key=lambda p: (p.suffix != ".safetensors", p.name),
    )
    if not candidates:
        raise InvalidInputError(
            f"{folder} has no weights file (*.safetensors, *.bin or *.pth) beside its "
            "open_clip_config.json"
        )
    return candidates[0]
