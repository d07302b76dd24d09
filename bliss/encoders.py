"""open_clip image and text encoders: pretrained tags, local checkpoints, the tiny test model.

torch and open_clip are imported inside the functions that need them: importing them takes
seconds, and the command line imports this module just to describe its options.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import socket
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import numpy as np

from bliss.checksums import file_sha256
from bliss.errors import InvalidInputError, WeightsUnavailableError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from bliss.indexer.image_sources import ImageItem

logger = logging.getLogger(__name__)

TINY_TEST_MODEL = "bliss-tiny-random-TEST-ONLY"
DEFAULT_PROMPT_TEMPLATE = "This is a photo of a {label}"

LOCAL_DIR_PREFIX = "local-dir:"
PRECISIONS = ("fp32", "fp16", "bf16")

_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Any fixed value works; it only has to be the same in every process that loads the tiny model.
_TINY_MODEL_SEED = 0
_CONNECT_TIMEOUT_S = 3.0
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".npy")
_HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
_HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
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
_TRUE_ENV_VALUES = ("1", "ON", "YES", "TRUE")

_Item = TypeVar("_Item")


def format_prompt(template: str, label: str) -> str:
    """Fill ``{label}`` in a prompt template; the template must have exactly that one field."""
    _check_template(template)
    return template.format(label=label)


def _check_template(template: str) -> None:
    usage = (
        "a prompt template must contain the field {label} exactly once and no other "
        "{...} field (write {{ and }} for literal braces), e.g. " + repr(DEFAULT_PROMPT_TEMPLATE)
    )
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as error:
        raise InvalidInputError(f"bad prompt template {template!r} ({error}): {usage}") from error
    if fields != [("label", "", None)]:
        raise InvalidInputError(f"bad prompt template {template!r}: {usage}")


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
        return _clean_tag(self.pretrained)

    def checksum(self) -> str | None:
        """sha256 of the local weights file (a checkpoint or a local-dir's); None for tags."""
        if self.local_dir is not None:
            path = _local_dir_weights(self.local_dir)
        elif self.checkpoint_file is not None:
            path = _existing_checkpoint(self.checkpoint_file)
        else:
            return None
        stat = path.stat()
        return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def _clean_tag(tag: str) -> str:
    # open_clip matches tags this way (pretrained._clean_tag), so 'LAION2B-s34b-b88k' is a hit.
    return tag.lower().replace("-", "_")


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so a replaced file is hashed again.
    return file_sha256(path)


def _existing_checkpoint(path: Path) -> Path:
    if not path.is_file():
        raise InvalidInputError(f"checkpoint file not found: {path}")
    return path


def _local_dir_weights(folder: Path) -> Path:
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


def select_device(requested: str | None = None) -> str:
    """``requested``, else $BLISS_DEVICE, else 'cuda' when available, else 'cpu'."""
    import torch

    choice = requested or os.environ.get("BLISS_DEVICE")
    if not choice:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError) as error:
        raise InvalidInputError(
            f"unknown device {choice!r} (from --device or BLISS_DEVICE): use cpu, cuda or cuda:N"
        ) from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {choice!r} was requested (by --device or BLISS_DEVICE) but CUDA is not "
                "available here: use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"device {choice!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return str(device)


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
        _check_precision(precision, device)
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
        _check_template(template)
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
            features = self.model.encode_image(pixels.to(self.device, self._input_dtype))
        return _l2_normalised(features)

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self._tokenizer(texts).to(self.device)
        with torch.inference_mode():
            features = self.model.encode_text(tokens)
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
    local = isinstance(item, (str, Path))
    name = item if local else item.key
    try:
        with Image.open(item if local else io.BytesIO(item.read())) as image:
            ImageOps.exif_transpose(image, in_place=True)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidInputError(f"cannot open image {name}: {error}") from error


def _check_precision(precision: str, device: str) -> None:
    if precision not in PRECISIONS:
        raise InvalidInputError(
            f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}"
        )
    if precision != "fp32" and not device.startswith("cuda"):
        raise InvalidInputError(
            f"precision {precision} is supported on CUDA only, and the device is {device}: "
            "use --precision fp32"
        )


def _register_model_configs() -> None:
    import open_clip

    if TINY_TEST_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_MODEL_CONFIG_DIR)


def _create_model(
    spec: ModelSpec, device: str, precision: str
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], str]:
    """The model, its eval transform, and the name open_clip knows its config and tokenizer by."""
    if spec.local_dir is not None:
        weights = _local_dir_weights(spec.local_dir)
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
        weights = _existing_checkpoint(spec.checkpoint_file)
        return (*_load_weights(architecture, weights, weights, device, precision, {}), architecture)
    from open_clip.pretrained import get_pretrained_cfg

    tag_cfg = get_pretrained_cfg(architecture, spec.pretrained)
    if not tag_cfg:
        raise InvalidInputError(_unknown_tag_message(architecture, spec.pretrained))
    weights = _tag_weights(architecture, _clean_tag(spec.pretrained), tag_cfg)
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

    suggestions = _close_matches(_clean_tag(tag), list_pretrained_tags_by_model(architecture))
    return (
        f"unknown pretrained tag {tag!r} for model {architecture}"
        + (f"; did you mean {', '.join(suggestions)}?" if suggestions else ".")
        + f" Its tags: {_tag_list(architecture)}. A checkpoint file is passed by its path "
        "(e.g. ./ckpt.pt)"
    )


def _tag_weights(architecture: str, tag: str, tag_cfg: dict[str, Any]) -> Path:
    """The local weights file of a tag: from the cache, or downloaded when that is possible."""
    cached = _cached_tag_weights(tag_cfg)
    if cached is not None:
        return cached
    unreachable = _download_blocker(tag_cfg)
    if unreachable is not None:
        raise WeightsUnavailableError(_unavailable_message(architecture, tag, tag_cfg, unreachable))
    from open_clip.pretrained import download_pretrained

    hub_repo, _ = _hub_location(tag_cfg)
    try:
        return Path(download_pretrained(tag_cfg, cache_dir=_hf_cache_dir() if hub_repo else None))
    except Exception as error:  # huggingface_hub and urllib each raise their own types
        raise WeightsUnavailableError(
            _unavailable_message(architecture, tag, tag_cfg, f"the download failed: {error}")
        ) from error


def _hub_location(tag_cfg: dict[str, Any]) -> tuple[str, str]:
    # open_clip's convention: 'org/repo/' means the default file name, 'org/repo/file' that file.
    repo, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    return repo, filename or _HF_WEIGHTS_NAME


def _hub_filenames(filename: str) -> list[str]:
    """The file names open_clip tries for a hub entry, in its order (safetensors first)."""
    if filename == _HF_WEIGHTS_NAME:
        return [_HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _hf_cache_dir() -> Path:
    # Read the environment now: huggingface_hub reads it once, at its import.
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    home = os.environ.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _url_cache_file(url: str) -> Path:
    return Path("~/.cache/clip").expanduser() / os.path.basename(url)


def _cached_tag_weights(tag_cfg: dict[str, Any]) -> Path | None:
    hub_repo, filename = _hub_location(tag_cfg)
    if hub_repo:
        from huggingface_hub import try_to_load_from_cache

        for name in _hub_filenames(filename):
            hit = try_to_load_from_cache(hub_repo, name, cache_dir=_hf_cache_dir())
            if isinstance(hit, str):  # not None and not the "known to be missing" marker
                return Path(hit)
        return None
    url = tag_cfg.get("url", "")
    if url and _url_cache_file(url).is_file():
        from open_clip.pretrained import download_pretrained_from_url

        # Verifies the file's sha256 and returns it; downloads only when it is corrupt.
        return Path(download_pretrained_from_url(url))
    return None


def _download_blocker(tag_cfg: dict[str, Any]) -> str | None:
    """Why the weights cannot be downloaded from here, or None when they can."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in _TRUE_ENV_VALUES:
            return f"{variable} is set"
    hub_repo, _ = _hub_location(tag_cfg)
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hub_repo else tag_cfg["url"]
    host, port = _first_hop(url)
    try:
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"{host}:{port} is not reachable within {_CONNECT_TIMEOUT_S:g} s ({error})"
    return None


def _first_hop(url: str) -> tuple[str, int]:
    """The host and port a download of ``url`` connects to: the proxy's when one is set."""
    from urllib.request import getproxies, proxy_bypass

    target = urlparse(url)
    proxy = getproxies().get(target.scheme)
    if proxy and not proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    return target.hostname or "", port


def _unavailable_message(architecture: str, tag: str, tag_cfg: dict[str, Any], why: str) -> str:
    from open_clip import get_model_config, list_models

    # The tag runs with QuickGELU but the plain config does not say so: a file passed with
    # --pretrained must then go with the '-quickgelu' config to compute the same embeddings.
    file_model = architecture
    model_cfg = get_model_config(architecture) or {}
    if tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
        quick = f"{architecture}-quickgelu"
        file_model = quick if quick in list_models() else architecture
    head = (
        f"the weights of model {architecture} with tag {tag} are not cached on this machine and "
        f"cannot be downloaded from here ({why}). Supply them in one of these ways: "
    )
    hub_repo, filename = _hub_location(tag_cfg)
    if not hub_repo:
        url = tag_cfg["url"]
        return head + (
            f"(1) on a machine with internet, download {url} and pass --model {file_model} "
            f"--pretrained /path/to/{os.path.basename(url)}; (2) copy that file to "
            f"{_url_cache_file(url)} on this machine"
        )
    safe_name = _hub_filenames(filename)[0]
    alternative = f" (or {safe_name})" if safe_name != filename else ""
    return head + (
        f"(1) on a machine with internet, download {filename}{alternative} from "
        f"https://huggingface.co/{hub_repo} and pass --model {file_model} --pretrained "
        f"/path/to/that/file; (2) download the whole repository folder (open_clip_config.json "
        f"and the weights) and pass --model local-dir:/path/to/folder; (3) copy a Hugging Face "
        f"cache that holds {hub_repo} to this machine and set HF_HOME to the folder above its "
        "hub/ directory"
    )
