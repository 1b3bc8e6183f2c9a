"""Generate a small folder of labelled images: circles, squares and triangles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle")


def draw(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One grayscale image of `kind`, randomly placed and sized, as uint8."""
    yy, xx = np.mgrid[0:size, 0:size]
    radius = rng.uniform(0.2, 0.35) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    elif kind == "square":
        mask = (abs(yy - cy) <= radius * 0.8) & (abs(xx - cx) <= radius * 0.8)
    else:
        mask = (yy >= cy - radius) & (yy <= cy + radius) & (abs(xx - cx) <= (yy - cy + radius) / 2)
    image = mask * rng.uniform(150, 255) + rng.normal(0, 12, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_shapes(folder: Path, per_class: int = 30, size: int = 16, seed: int = 0) -> Path:
    """Write `per_class` PNG images of each shape into `folder/<class>/`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw(kind, size, rng)).save(folder / kind / f"{kind}_{i:03d}.png")
    return folder


if __name__ == "__main__":
    import sys

    make_shapes(Path(sys.argv[1]))
