"""The local file of an open_clip pretrained tag: from the cache, else downloaded if possible.

open_clip's public API does the work: ``get_pretrained_cfg`` says where a tag's weights
live (a Hugging Face repository or a URL), ``huggingface_hub.hf_hub_download`` with
``local_files_only=True`` finds them in the hub cache without the network, and
``open_clip.pretrained.download_pretrained`` fetches them. What bliss adds: it fails fast,
with one line naming the tag and how to supply its weights, when they are not cached and
the machine is offline (``HF_HUB_OFFLINE``) or cannot reach the download host, instead of
letting the download hang or retry.

torch and open_clip are imported inside the functions: this module is imported by
:mod:`bliss.encoders`, which must stay cheap to import.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bliss.errors import WeightsUnavailableError

_CONNECT_TIMEOUT_S = 3.0
_TRUE_ENV_VALUES = ("1", "ON", "YES", "TRUE")
# Where URL-hosted weights are cached; bliss passes it to open_clip rather than rely on
# its default (the same folder).
_URL_CACHE_DIR = "~/.cache/clip"


def tag_weights(architecture: str, tag: str, tag_cfg: dict[str, Any]) -> Path:
    """The local weights file of ``tag`` (``tag_cfg``: open_clip's ``get_pretrained_cfg``).

    Raises WeightsUnavailableError, one line, when the file is neither cached nor
    downloadable from here.
    """
    cached = _cached_tag_weights(tag_cfg)
    if cached is not None:
        return cached
    unreachable = _download_blocker(tag_cfg)
    if unreachable is not None:
        raise WeightsUnavailableError(_unavailable_message(architecture, tag, tag_cfg, unreachable))
    from open_clip.pretrained import download_pretrained

    hub_repo, _ = _hub_location(tag_cfg)
    cache_dir = _hf_cache_dir() if hub_repo else _url_cache_dir()
    try:
        return Path(download_pretrained(tag_cfg, cache_dir=str(cache_dir)))
    except Exception as error:  # huggingface_hub and urllib each raise their own types
        raise WeightsUnavailableError(
            _unavailable_message(architecture, tag, tag_cfg, f"the download failed: {error}")
        ) from error


def _hub_location(tag_cfg: dict[str, Any]) -> tuple[str, str]:
    """The tag's Hugging Face repository ('' when URL-hosted) and weights file name.

    open_clip's convention: 'org/repo/' means its default file name, 'org/repo/file' that file.
    """
    from open_clip.constants import HF_WEIGHTS_NAME

    repo, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    return repo, filename or HF_WEIGHTS_NAME


def _hub_filenames(filename: str) -> list[str]:
    """The files of a hub entry that open_clip's download accepts, safetensors first."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now.

    huggingface_hub reads these variables once, at its import; a caller may set them later.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    home = os.environ.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _url_cache_dir() -> Path:
    return Path(_URL_CACHE_DIR).expanduser()


def _cached_tag_weights(tag_cfg: dict[str, Any]) -> Path | None:
    hub_repo, filename = _hub_location(tag_cfg)
    if hub_repo:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        for name in _hub_filenames(filename):
            try:
                return Path(
                    hf_hub_download(
                        hub_repo, name, cache_dir=_hf_cache_dir(), local_files_only=True
                    )
                )
            except LocalEntryNotFoundError:
                continue
        return None
    url = tag_cfg.get("url", "")
    if url and (_url_cache_dir() / os.path.basename(url)).is_file():
        from open_clip.pretrained import download_pretrained_from_url

        # Verifies the file's sha256 and returns it; downloads only when it is corrupt.
        return Path(download_pretrained_from_url(url, cache_dir=str(_url_cache_dir())))
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
        name = os.path.basename(url)
        return head + (
            f"(1) on a machine with internet, download {url} and pass --model {file_model} "
            f"--pretrained /path/to/{name}; (2) copy that file to "
            f"{_url_cache_dir() / name} on this machine"
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
