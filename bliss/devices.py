"""Where and in which precision a model runs: the device choice and its precision check."""

from __future__ import annotations

import os

from bliss.errors import InvalidInputError

PRECISIONS = ("fp32", "fp16", "bf16")


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


def check_precision(precision: str, device: str) -> None:
    """InvalidInputError unless ``precision`` is known and ``device`` supports it."""
    if precision not in PRECISIONS:
        raise InvalidInputError(
            f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}"
        )
    if precision != "fp32" and not device.startswith("cuda"):
        raise InvalidInputError(
            f"precision {precision} is supported on CUDA only, and the device is {device}: "
            "use --precision fp32"
        )
