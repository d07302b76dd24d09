"""Untrusted image bytes to a preprocessed tensor, with a byte limit and a pixel limit.

Decoding runs on a thread pool; a malformed or hostile image raises InvalidInputError
for its item and never anything else, so one bad item cannot hurt other requests.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bliss.errors import InvalidInputError

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Formats a camera or an encoder produces; the long tail of PIL's decoders (and their
# attack surface) stays closed.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode an encoded image into RGB, refusing empty, oversized or undecodable input."""
    from PIL import Image

    if not data:
        raise InvalidInputError("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidInputError(
            f"the image has {len(data):,} bytes, over the server's limit of "
            f"{limits.max_bytes:,} (--max-image-mib): send a smaller image"
        )
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the guard; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidInputError(
                    f"the image is {width}x{height} = {width * height:,} pixels, over the "
                    f"server's limit of {limits.max_pixels:,} (--max-image-pixels): "
                    "resize it before sending"
                )
            return image.convert("RGB")
    except InvalidInputError:
        raise
    except Image.UnidentifiedImageError:
        raise InvalidInputError(
            f"the bytes are not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except Exception as error:
        # Untrusted bytes: any decoder failure (truncated data, corrupt chunks, a bomb PIL
        # caught itself) is the input's fault, whatever exception the decoder chose.
        raise InvalidInputError(f"the image cannot be decoded: {error}") from None


def preprocessed_image(
    data: bytes, limits: ImageLimits, preprocess: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """Decode and apply the model's eval transform: one [3, H, W] tensor."""
    return preprocess(decode_image(data, limits))
