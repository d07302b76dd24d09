"""Embeddings encoded once per model and dataset, kept on disk for every later evaluation.

An entry is keyed by everything that decides its numbers: the model, its weights (tag,
path and sha256 of a local file), the precision, the image preprocessing (read from
open_clip's configs, so a cache hit loads no model at all) and the dataset split, or for
texts the prompt template and the texts. Each entry is a folder written under a temporary
name and renamed into place, so a killed run never leaves half an entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from bliss.errors import InvalidInputError, NotFoundError, WeightsUnavailableError

if TYPE_CHECKING:
    from bliss.encoders import ClipEncoder, ModelSpec
    from bliss.evaluation.image_datasets import ImageSet

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class EncoderIdentity:
    """What, besides its input, decides an embedding."""

    model: str
    weights: str
    checksum: str | None
    precision: str
    preprocessing: dict[str, Any]

    def text_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["preprocessing"]  # texts are not preprocessed
        return fields


def encoder_identity(spec: ModelSpec, precision: str = "fp32") -> EncoderIdentity:
    """The identity of ``spec``'s embeddings, without loading the model."""
    return EncoderIdentity(
        model=spec.model_name,
        weights=spec.weights_id,
        checksum=spec.checksum(),
        precision=precision,
        preprocessing=preprocessing_config(spec),
    )


def preprocessing_config(spec: ModelSpec) -> dict[str, Any]:
    """Image size and the normalisation/resize settings open_clip's transform is built from."""
    import open_clip

    from bliss.encoders import TINY_TEST_MODEL

    preprocess: dict[str, Any] = {}
    if spec.local_dir is not None:
        config_file = spec.local_dir / "open_clip_config.json"
        config = json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
        model_config = config.get("model_cfg", {})
        preprocess = config.get("preprocess_cfg", {})
    elif spec.model_name == TINY_TEST_MODEL:
        from bliss import encoders

        config_file = Path(encoders.__file__).parent / "model_configs" / f"{TINY_TEST_MODEL}.json"
        model_config = json.loads(config_file.read_text("utf-8"))
    else:
        architecture = spec.model_name.replace("/", "-")
        model_config = open_clip.get_model_config(architecture) or {}
        if spec.pretrained is not None and spec.checkpoint_file is None:
            from open_clip.pretrained import get_pretrained_cfg

            tag = get_pretrained_cfg(architecture, spec.pretrained) or {}
            keys = ("mean", "std", "interpolation", "resize_mode")
            preprocess = {key: tag[key] for key in keys if key in tag}
    return {
        "image_size": model_config.get("vision_cfg", {}).get("image_size"),
        "preprocess": {key: _jsonable(value) for key, value in sorted(preprocess.items())},
        "open_clip": open_clip.__version__,
    }


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class CacheEvent:
    kind: str  # 'images' | 'texts'
    what: str  # 'cifar10/train', 'class prompts', 'dictionary imagenet'
    hit: bool
    rows: int
    folder: str


@dataclass
class EmbeddingCache:
    """Image and text embeddings by key; ``encoder`` is called only on a miss, at most once."""

    root: Path
    identity: EncoderIdentity
    load_encoder: Callable[[], ClipEncoder]
    progress: bool = True
    events: list[CacheEvent] = field(default_factory=list)
    _encoder: ClipEncoder | None = None

    @property
    def encoder(self) -> ClipEncoder:
        if self._encoder is None:
            self._encoder = self.load_encoder()
        return self._encoder

    def images(self, image_set: ImageSet, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings float32 [n, D] and labels int64 [n] of one dataset split.

        When the images are needed but missing, the error also says whether the weights
        are missing, so one run tells everything that has to be supplied.
        """
        try:
            identity = image_set.identity
        except NotFoundError as missing:
            self._fail_for_missing_images(str(missing))
        key = {
            "kind": "images",
            "format": CACHE_FORMAT,
            **asdict(self.identity),
            "dataset": identity,
        }
        arrays = self._read(key, what)
        if arrays is None:
            from bliss.evaluation.image_encoding import encode_image_items

            problem = image_set.problem()
            if problem is not None:
                self._fail_for_missing_images(problem)
            encoder = self.encoder
            images = image_set.load()
            logger.info("encoding %s: %d images", what, len(images.items))
            embeddings = encode_image_items(
                encoder, images.items, description=f"encoding {what}", progress=self.progress
            )
            arrays = self._write(key, what, {"embeddings": embeddings, "labels": images.labels})
        return arrays["embeddings"], arrays["labels"]

    def _fail_for_missing_images(self, problem: str) -> NoReturn:
        try:
            self.encoder  # noqa: B018 (loading it is how we learn whether the weights exist)
        except WeightsUnavailableError as error:
            raise WeightsUnavailableError(
                f"{error}. The images are missing too: {problem}"
            ) from None
        raise NotFoundError(problem)

    def texts(self, texts: Sequence[str], template: str, what: str) -> np.ndarray:
        """Prompt embeddings float32 [n, D] of ``texts`` filled into ``template``."""
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        key = {
            "kind": "texts",
            "format": CACHE_FORMAT,
            **self.identity.text_fields(),
            "template": template,
            "texts": digest,
            "count": len(texts),
        }
        arrays = self._read(key, what)
        if arrays is None:
            logger.info("encoding %s: %d texts", what, len(texts))
            embeddings = self.encoder.encode_prompts(list(texts), template, progress=self.progress)
            arrays = self._write(key, what, {"embeddings": embeddings})
        return arrays["embeddings"]

    def _folder(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / key["kind"] / digest[:32]

    def _read(self, key: dict[str, Any], what: str) -> dict[str, np.ndarray] | None:
        folder = self._folder(key)
        manifest = folder / _MANIFEST
        if not manifest.is_file():
            return None
        stored = json.loads(manifest.read_text("utf-8"))
        if stored.get("key") != key:
            logger.warning("%s: cache entry %s belongs to another key; re-encoding", what, folder)
            return None
        arrays = {name: np.load(folder / f"{name}.npy") for name in stored["arrays"]}
        logger.info("%s: %d embeddings from the cache (%s)", what, stored["rows"], folder)
        self.events.append(CacheEvent(key["kind"], what, True, stored["rows"], str(folder)))
        return arrays

    def _write(
        self, key: dict[str, Any], what: str, arrays: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        folder = self._folder(key)
        rows = int(next(iter(arrays.values())).shape[0])
        temporary = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir(parents=True)
        try:
            for name, array in arrays.items():
                _write_synced(temporary / f"{name}.npy", _array_writer(array))
            manifest = {"key": key, "what": what, "rows": rows, "arrays": sorted(arrays)}
            text = json.dumps(manifest, indent=2, sort_keys=True)
            _write_synced(temporary / _MANIFEST, lambda f: f.write(text.encode()))
            _move_into_place(temporary, folder)
        except OSError as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise InvalidInputError(
                f"cannot write the embedding cache under {self.root} ({error}): free some space "
                "or pass a writable --cache-dir"
            ) from error
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        self.events.append(CacheEvent(key["kind"], what, False, rows, str(folder)))
        return arrays


def _array_writer(array: np.ndarray) -> Callable[[Any], object]:
    return lambda stream: np.save(stream, array)


def _write_synced(path: Path, write: Callable[[Any], object]) -> None:
    with open(path, "wb") as stream:
        write(stream)
        stream.flush()
        os.fsync(stream.fileno())


def _move_into_place(temporary: Path, folder: Path) -> None:
    if folder.exists() and not (folder / _MANIFEST).is_file():
        shutil.rmtree(folder)  # not an entry: left by something else
    try:
        os.rename(temporary, folder)
    except OSError:
        if not (folder / _MANIFEST).is_file():
            raise
        # Another run wrote this key first (or a colliding key's entry is there, which
        # _read rejects); keep the one in place.
        shutil.rmtree(temporary, ignore_errors=True)
