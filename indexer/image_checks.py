"""The check every normal image passes before any encoding starts.

Encoding a large input takes hours; an undecodable file found at its end would waste them
(and, before this check, stopped the build there). So every image's header is read first:
its format, its size against a pixel budget (which also stops decompression bombs), and a
cheap test that its data decodes. Measured on 1024x768 images (ms per image, one core):

    format  header only  verify()  draft + load  full load
    JPEG    0.02         0.02      2.0           2.9       (12 MP: 30 ms draft, 64 ms full)
    PNG     0.01         0.5       20            20
    WEBP    0.16         0.11      15            15

``verify()`` is a no-op for JPEG, GIF, BMP and TIFF, and finds nothing wrong in a truncated
file of those formats; a full load does. So: PNG is verified (every chunk's CRC, which
finds truncation), WEBP is opened (libwebp parses the whole file then, and fails on a
truncated one), JPEG is decoded at 1/8 scale (``draft``: all the compressed data is read,
a fraction of the pixels computed), other formats are decoded.
"""

from __future__ import annotations

import io
import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from tqdm import tqdm

from bliss.errors import InvalidInputError
from bliss.indexer.image_sources import IMAGE_SUFFIXES, ImageClass, ImageItem

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Threads: decoding releases the GIL, and remote reads mostly wait on the network.
DEFAULT_WORKERS = 16
SHOWN_IN_ERROR = 3
_PROGRESS_FROM = 1000  # images; fewer are checked before a bar would be worth drawing
_BATCH = 1024  # images in flight at once, so memory does not grow with the input


@dataclass(frozen=True)
class BadImage:
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


def check_images(
    classes: list[ImageClass],
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    skip_bad: bool = False,
    workers: int = DEFAULT_WORKERS,
) -> list[ImageClass]:
    """The classes, checked; bad images either stop the build or, with ``skip_bad``, are
    dropped (counted in ``ImageClass.skipped``). Each bad image is logged on one line."""
    _check_budget(max_pixels)
    total = sum(len(image_class.files) for image_class in classes)
    bad: dict[int, list[int]] = {}  # class position -> positions of its bad images
    found: list[BadImage] = []
    items = (
        (position, index, item)
        for position, image_class in enumerate(classes)
        for index, item in enumerate(image_class.files)
    )
    small = total < _PROGRESS_FROM
    with tqdm(total=total, desc="check images", unit="image", disable=small) as bar:
        for position, index, problem in _problems(items, max_pixels, workers):
            if problem is not None:
                logger.warning("bad image %s", problem)
                bad.setdefault(position, []).append(index)
                found.append(problem)
            bar.update()
    if found and not skip_bad:
        examples = "; ".join(str(problem) for problem in found[:SHOWN_IN_ERROR])
        raise InvalidInputError(
            f"{len(found):,} of {total:,} normal images cannot be used ({examples}"
            f"{'; ...' if len(found) > SHOWN_IN_ERROR else ''}): fix or remove them, or pass "
            "--skip-bad-images to leave them out"
        )
    checked = []
    for position, image_class in enumerate(classes):
        dropped = set(bad.get(position, ()))
        if not dropped:
            checked.append(image_class)
            continue
        if len(dropped) == len(image_class.files):
            raise InvalidInputError(
                f"class {image_class.name!r} has no usable image: all {len(dropped):,} are bad "
                f"(first: {image_class.files[0].key}): fix them, or remove the class"
            )
        files = tuple(item for i, item in enumerate(image_class.files) if i not in dropped)
        checked.append(replace(image_class, files=files, skipped=len(dropped)))
    if found:
        logger.warning("skipping %s bad normal images (--skip-bad-images)", f"{len(found):,}")
    return checked


def image_problem(data: bytes, max_pixels: int) -> str | None:
    """Why these bytes cannot be encoded, or None when they can (see the module docstring)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return (
                    f"{width}x{height} is {width * height:,} pixels, over the budget of "
                    f"{max_pixels:,} (--max-image-pixels)"
                )
            if image.format == "PNG":
                image.verify()
            elif image.format != "WEBP":
                image.draft(None, (max(1, width // 8), max(1, height // 8)))
                image.load()
    except Image.DecompressionBombError as error:
        return f"over PIL's decompression-bomb limit: {error}"
    except Image.UnidentifiedImageError:  # its message names an anonymous BytesIO
        return f"not an image in a format PIL reads ({', '.join(sorted(IMAGE_SUFFIXES))})"
    # PIL's format plugins raise many exception types on malformed data (SyntaxError,
    # struct.error, IndexError, ...); any of them means the file cannot be encoded.
    except Exception as error:
        return f"cannot be decoded: {' '.join(str(error).split()) or type(error).__name__}"
    return None


def _problems(
    items: Iterator[tuple[int, int, ImageItem]], max_pixels: int, workers: int
) -> Iterator[tuple[int, int, BadImage | None]]:
    """(class position, index, problem or None) per item, in order, ``workers`` at a time."""
    from PIL import Image

    def check(entry: tuple[int, int, ImageItem]) -> tuple[int, int, BadImage | None]:
        position, index, item = entry
        try:
            data = item.read()
        except OSError as error:
            return position, index, BadImage(item.key, f"cannot be read: {error}")
        problem = image_problem(data, max_pixels)
        return position, index, None if problem is None else BadImage(item.key, problem)

    # Images between PIL's warning and error thresholds are judged by the budget alone;
    # the warning would only repeat it. (The filter is process-wide, so it covers the pool.)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for batch in _batched(items, _BATCH):
            yield from pool.map(check, batch)


def _check_budget(max_pixels: int) -> None:
    from PIL import Image

    # The encoder decodes with PIL's own limit, which raises above twice MAX_IMAGE_PIXELS.
    limit = 2 * (Image.MAX_IMAGE_PIXELS or max(1, max_pixels))
    if not 1 <= max_pixels <= limit:
        raise InvalidInputError(
            f"the pixel budget (--max-image-pixels) must be between 1 and {limit:,}, where PIL "
            f"refuses to decode an image as a possible decompression bomb; got {max_pixels:,}"
        )


def _batched(items: Iterable[tuple[int, int, ImageItem]], size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
