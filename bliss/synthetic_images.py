"""Small generated image datasets: simple shapes on noisy backgrounds, one folder each.

Used by ``bliss quickstart`` and by tests, where no real dataset or weights exist. The
images are deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "stripes", "ring")


def draw_shape(shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of ``shape`` at a random place, size and colour."""
    background = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
    half = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(half, size - half, size=2))
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    elif shape == "cross":
        width = max(2, half // 3)
        draw.rectangle((cx - width, cy - half, cx + width, cy + half), fill=colour)
        draw.rectangle((cx - half, cy - width, cx + half, cy + width), fill=colour)
    elif shape == "stripes":
        for x in range(0, size, max(4, half // 2)):
            draw.line((x, 0, x, size), fill=colour, width=2)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, half // 4))
    else:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")
    return image


def write_shape_folders(
    root: Path, shapes: Sequence[str], per_class: int, *, seed: int = 0, size: int = 64
) -> dict[str, list[Path]]:
    """Write ``root/<shape>/<shape>_NNN.png`` for each shape; returns the paths by shape."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for shape in shapes:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        written[shape] = []
        for number in range(per_class):
            path = folder / f"{shape}_{number:03d}.png"
            draw_shape(shape, rng, size).save(path)
            written[shape].append(path)
    return written
