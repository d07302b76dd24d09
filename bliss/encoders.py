"""CLIP image and text encoders: :class:`ClipEncoder`, loaded with open_clip.

Which model and weights (:mod:`bliss.model_specs`), where a pretrained tag's weights come
from (:mod:`bliss.weights`), the device (:mod:`bliss.devices`) and the prompt templates
(:mod:`bliss.prompts`) live in their own modules; the names callers use are importable
from here too.

torch and open_clip are imported inside the functions that need them: importing them takes
seconds, and the command line imports this module just to describe its options.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import numpy as np

from bliss.devices import check_precision, select_device
from bliss.errors import InvalidInputError
from bliss.model_specs import (
    LOCAL_DIR_PREFIX,
    TINY_TEST_MODEL,
    ModelSpec,
    clean_tag,
    existing_checkpoint,
    local_dir_weights,
)
from bliss.prompts import DEFAULT_PROMPT_TEMPLATE, check_template, format_prompt
from bliss.weights import tag_weights

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from bliss.indexer.image_sources import ImageItem

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "TINY_TEST_MODEL",
    "ClipEncoder",
    "ModelSpec",
    "format_prompt",
    "open_rgb",
    "select_device",
]

logger = logging.getLogger(__name__)

_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Any fixed value works; it only has to be the same in every process that loads the tiny model.
_TINY_MODEL_SEED = 0

_Item = TypeVar("_Item")


class _ClipModel(Protocol):
    """The encoders of an open_clip model (typed by torch as a plain Module)."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


class ClipEncoder:
    """A frozen CLIP model that turns texts and images into L2-normalised float32 embeddings."""

    def __init__(
        self,
        spec: ModelSpec,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        device: str,
        precision: str,
        embedding_dim: int,
        batch_size: int,
    ) -> None:
        import torch

        self.spec = spec
        self.model = model
        self.device = device
        self.precision = precision
        self.embedding_dim = embedding_dim
        self.batch_size = batch_size
        self._tokenizer = tokenizer
        self._transform = transform
        self._input_dtype = {
            "fp32": torch.float32,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
        }[precision]

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 256,
    ) -> ClipEncoder:
        """Load the model (weights from the cache, a file or a folder) in eval mode."""
        device = select_device(device)
        check_precision(precision, device)
        if batch_size < 1:
            raise InvalidInputError(f"batch size must be at least 1, got {batch_size}")
        import open_clip

        _register_model_configs()
        model, transform, config_name = _create_model(spec, device, precision)
        model.eval()
        return cls(
            spec,
            model,
            open_clip.get_tokenizer(config_name),
            transform,
            device=device,
            precision=precision,
            embedding_dim=int(open_clip.get_model_config(config_name)["embed_dim"]),
            batch_size=batch_size,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's eval transform: a PIL image to a [3, H, W] tensor (safe from any thread)."""
        return self._transform(image)

    def encode_texts(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """float32 [n, D] L2-normalised text embeddings, encoded ``batch_size`` at a time."""
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a sequence of strings, not one string")
        return self._encode_batched(list(texts), self._encode_text_batch, progress, "text")

    def encode_prompts(
        self,
        labels: Sequence[str],
        template: str = DEFAULT_PROMPT_TEMPLATE,
        *,
        progress: bool = False,
    ) -> np.ndarray:
        """Embeddings of ``template`` filled with each label (the paper's prompt by default)."""
        if isinstance(labels, str):
            raise InvalidInputError("encode_prompts takes a sequence of labels, not one string")
        check_template(template)
        prompts = [template.format(label=label) for label in labels]
        return self.encode_texts(prompts, progress=progress)

    def encode_images(
        self, images: Sequence[Image.Image | str | Path | ImageItem], *, progress: bool = False
    ) -> np.ndarray:
        """float32 [n, D] embeddings of PIL images or image files, ``batch_size`` at a time."""
        if isinstance(images, (str, Path)):
            raise InvalidInputError("encode_images takes a sequence of images, not one path")
        return self._encode_batched(list(images), self._encode_image_items, progress, "image")

    def encode_image_batch(self, pixels: torch.Tensor) -> np.ndarray:
        """Already-preprocessed pixels [B, 3, H, W] to float32 [B, D] L2-normalised embeddings."""
        import torch

        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise InvalidInputError(
                f"expected preprocessed pixels of shape [B, 3, H, W], got {list(pixels.shape)}"
            )
        with torch.inference_mode():
            model = cast(_ClipModel, self.model)
            features = model.encode_image(pixels.to(self.device, self._input_dtype))
        return _l2_normalised(features)

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self._tokenizer(texts).to(self.device)
        with torch.inference_mode():
            features = cast(_ClipModel, self.model).encode_text(tokens)
        return _l2_normalised(features)

    def _encode_image_items(self, items: list[Image.Image | str | Path | ImageItem]) -> np.ndarray:
        import torch

        pixels = torch.stack([self._transform(open_rgb(item)) for item in items])
        return self.encode_image_batch(pixels)

    def _encode_batched(
        self,
        items: list[_Item],
        encode_batch: Callable[[list[_Item]], np.ndarray],
        progress: bool,
        unit: str,
    ) -> np.ndarray:
        from tqdm import tqdm

        embeddings = np.empty((len(items), self.embedding_dim), dtype=np.float32)
        with tqdm(total=len(items), unit=unit, disable=not progress) as bar:
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                embeddings[start : start + len(batch)] = encode_batch(batch)
                bar.update(len(batch))
        return embeddings


def _l2_normalised(features: torch.Tensor) -> np.ndarray:
    import torch

    # Normalise in float32 even for fp16/bf16 models: unit norms are what the scores assume.
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def open_rgb(item: Image.Image | str | Path | ImageItem) -> Image.Image:
    """A PIL image in RGB from an image, a file or an ImageItem (an index build's inputs).

    Decoded files are turned upright per their EXIF orientation, as viewers show them.
    InvalidInputError names a file that cannot be read or decoded.
    """
    import io

    from PIL import Image, ImageOps

    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    name = item if isinstance(item, (str, Path)) else item.key
    try:
        source = item if isinstance(item, (str, Path)) else io.BytesIO(item.read())
        with Image.open(source) as image:
            ImageOps.exif_transpose(image, in_place=True)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidInputError(f"cannot open image {name}: {error}") from error


def _register_model_configs() -> None:
    import open_clip

    if TINY_TEST_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_MODEL_CONFIG_DIR)


def _create_model(
    spec: ModelSpec, device: str, precision: str
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], str]:
    """The model, its eval transform, and the name open_clip knows its config and tokenizer by."""
    if spec.local_dir is not None:
        weights = local_dir_weights(spec.local_dir)
        name = f"{LOCAL_DIR_PREFIX}{spec.local_dir}"
        return (*_load_weights(name, None, weights, device, precision, {}), name)
    if spec.model_name.startswith("hf-hub:"):
        raise InvalidInputError(
            f"{spec.model_name}: hf-hub: models are not supported, as they download at load "
            "time; download the repository and pass --model local-dir:/path/to/it"
        )
    architecture = _architecture(spec.model_name)
    if architecture == TINY_TEST_MODEL:
        logger.warning(
            "loading %s: a RANDOMLY initialised model for tests and offline smoke runs; its "
            "scores are meaningless for real anomaly detection",
            TINY_TEST_MODEL,
        )
    if spec.pretrained is None:
        if architecture != TINY_TEST_MODEL:
            raise InvalidInputError(
                f"model {architecture} needs --pretrained: one of its tags "
                f"({_tag_list(architecture)}) or a checkpoint file path"
            )
        return (*_create_tiny_model(device, precision), architecture)
    if spec.checkpoint_file is not None:
        weights = existing_checkpoint(spec.checkpoint_file)
        return (*_load_weights(architecture, weights, weights, device, precision, {}), architecture)
    from open_clip.pretrained import get_pretrained_cfg

    tag_cfg = get_pretrained_cfg(architecture, spec.pretrained)
    if not tag_cfg:
        raise InvalidInputError(_unknown_tag_message(architecture, spec.pretrained))
    weights = tag_weights(architecture, clean_tag(spec.pretrained), tag_cfg)
    # open_clip applies a tag's preprocessing and activation only when it resolves the tag
    # itself; we hand it the cached file, so we pass both on.
    tag_options = {
        "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False)),
        "image_mean": tag_cfg.get("mean"),
        "image_std": tag_cfg.get("std"),
        "image_interpolation": tag_cfg.get("interpolation"),
        "image_resize_mode": tag_cfg.get("resize_mode"),
    }
    return (
        *_load_weights(architecture, weights, weights, device, precision, tag_options),
        architecture,
    )


def _create_tiny_model(
    device: str, precision: str
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    import open_clip
    import torch

    # Seeded on the CPU generator (the model is built on the CPU before it moves), so every
    # process gets bit-identical weights without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_MODEL_SEED)
        model, _, transform = open_clip.create_model_and_transforms(
            TINY_TEST_MODEL, precision=precision, device=device
        )
    return model, transform


def _load_weights(
    name: str,
    pretrained: Path | None,
    weights: Path,
    device: str,
    precision: str,
    options: dict[str, Any],
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    import open_clip

    try:
        model, _, transform = open_clip.create_model_and_transforms(
            name,
            pretrained=None if pretrained is None else str(pretrained),
            precision=precision,
            device=device,
            **options,
        )
    except Exception as error:  # torch, safetensors and open_clip each raise their own types
        raise InvalidInputError(
            f"could not load the weights {weights} into model {name}: {error}. Check that "
            "--model names the architecture these weights were trained with"
        ) from error
    return model, transform


def _architecture(model_name: str) -> str:
    import open_clip

    architecture = model_name.replace("/", "-")  # 'ViT-B/16' is open_clip's 'ViT-B-16'
    known = open_clip.list_models()
    if architecture in known:
        return architecture
    suggestions = _close_matches(architecture, known)
    raise InvalidInputError(
        f"unknown model {model_name!r}"
        + (f"; did you mean {', '.join(suggestions)}?" if suggestions else "")
        + " open_clip.list_models() lists every architecture; for a model folder use "
        "--model local-dir:/path/to/folder"
    )


def _close_matches(word: str, options: Sequence[str]) -> list[str]:
    by_folded = {option.casefold(): option for option in options}
    folded = difflib.get_close_matches(word.casefold(), list(by_folded), n=5, cutoff=0.6)
    return [by_folded[match] for match in folded]


def _tag_list(architecture: str) -> str:
    from open_clip import list_pretrained_tags_by_model

    return ", ".join(list_pretrained_tags_by_model(architecture)) or "none"


def _unknown_tag_message(architecture: str, tag: str) -> str:
    from open_clip import list_pretrained_tags_by_model

    suggestions = _close_matches(clean_tag(tag), list_pretrained_tags_by_model(architecture))
    return (
        f"unknown pretrained tag {tag!r} for model {architecture}"
        + (f"; did you mean {', '.join(suggestions)}?" if suggestions else ".")
        + f" Its tags: {_tag_list(architecture)}. A checkpoint file is passed by its path "
        "(e.g. ./ckpt.pt)"
    )
