"""Untrusted image bytes to a preprocessed tensor, within byte and pixel budgets.

The pixel count an image declares in its header is checked before anything is decoded,
per image (:func:`declared_pixels`) and, by the caller, per request: a file declaring a
100,000 x 100,000 canvas is refused in milliseconds. Decoding runs on a thread pool; a
malformed or hostile image raises InvalidInputError for its item and never anything
else, so one bad item cannot hurt other requests.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    max_pixels: int  # per image
    max_request_pixels: int  # all images of one request together


def declared_pixels(data: bytes, limits: ImageLimits) -> int:
    """Width x height from the image's header, refusing empty, oversized or unknown input."""
    with _opened_image(data, limits) as image:
        width, height = image.size
        return width * height


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode an encoded image into upright RGB (EXIF orientation applied)."""
    from PIL import ImageOps

    with _opened_image(data, limits) as image:
        try:
            # Phone cameras store pixels sideways plus an orientation tag; the model must
            # see the picture the way its author did.
            return ImageOps.exif_transpose(image).convert("RGB")
        except Exception as error:
            # Untrusted bytes: any decoder failure (truncated data, corrupt chunks) is the
            # input's fault, whatever exception the decoder chose.
            raise InvalidInputError(f"the image cannot be decoded: {error}") from None


@contextmanager
def _opened_image(data: bytes, limits: ImageLimits) -> Iterator[Image.Image]:
    """The lazily opened image (header read, nothing decoded), within the limits."""
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
            # The pixel limit below is the guard; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.UnidentifiedImageError:
        raise InvalidInputError(
            f"the bytes are not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except Image.DecompressionBombError:
        # PIL's own hard limit fired while it read the header.
        raise _too_many_pixels(f"over {2 * (Image.MAX_IMAGE_PIXELS or 0):,}", limits) from None
    except Exception as error:
        raise InvalidInputError(f"the image cannot be decoded: {error}") from None
    try:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise _too_many_pixels(f"{width}x{height} = {width * height:,}", limits)
        yield image
    finally:
        image.close()


def _too_many_pixels(declared: str, limits: ImageLimits) -> InvalidInputError:
    return InvalidInputError(
        f"the image declares {declared} pixels, over the server's limit of "
        f"{limits.max_pixels:,} (--max-image-pixels): resize it before sending"
    )


def preprocessed_image(
    data: bytes, limits: ImageLimits, preprocess: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """Decode and apply the model's eval transform: one [3, H, W] tensor."""
    return preprocess(decode_image(data, limits))
