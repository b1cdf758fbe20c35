"""Generated nuclei-like images with instance labels, for the segmentation demo and tests (nothing to download).

Nuclei are ellipses of random size, orientation and brightness that may touch but overlap little, with a dim
rim where they meet, on an uneven background, blurred and noisy: touching objects make the boundary target matter.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.draw import ellipse
from skimage.segmentation import find_boundaries


def nuclei_image(
    size: int = 128, seed: int = 0, density: tuple[float, float] = (10, 22), radius: tuple[float, float] = (5.0, 11.0)
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (size, size) image, uint16 labels 1..n); ``density`` bounds the number of nuclei per 128x128 pixels."""
    rng = np.random.default_rng(seed)
    low = max(1, round(density[0] * size * size / 128**2))
    count = (low, max(low + 1, round(density[1] * size * size / 128**2)))
    labels = np.zeros((size, size), np.uint16)
    brightness = [0.0]
    wanted = int(rng.integers(*count))
    for _ in range(wanted * 4):  # tries; crowded images place fewer
        if len(brightness) > wanted:
            break
        r = rng.uniform(*radius, size=2)
        rows, cols = ellipse(
            rng.uniform(0, size), rng.uniform(0, size), r[0], r[1], shape=labels.shape, rotation=rng.uniform(0, np.pi)
        )
        if rows.size < 10 or np.count_nonzero(labels[rows, cols]) > 0.15 * rows.size:
            continue
        free = labels[rows, cols] == 0
        labels[rows[free], cols[free]] = len(brightness)
        brightness.append(rng.uniform(0.45, 1.0))
    signal = np.asarray(brightness, np.float32)[labels]
    signal *= 1 - 0.35 * find_boundaries(labels, mode="inner")
    yy, xx = np.mgrid[0:size, 0:size] / size
    background = 0.08 + 0.08 * (rng.uniform() * yy + rng.uniform() * xx)
    image = ndimage.gaussian_filter(signal + background, 1.2) + rng.normal(0, 0.04, labels.shape)
    return np.clip(image * 220, 0, 255).astype(np.uint8), labels


def nuclei_set(n: int, size: int = 128, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` independent images, image ``i`` seeded by (seed, i)."""
    return [nuclei_image(size, seed=seed * 100_003 + i) for i in range(n)]


SHAPES = ("square", "disc", "triangle")


def shapes_image(
    size: int = 128, seed: int = 0, count: tuple[int, int] = (1, 6), extent: tuple[int, int] = (14, 40)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 (size, size, 3) image, (N, 4) float32 boxes x1 y1 x2 y2, (N,) int64 classes 1..3 of ``SHAPES``).

    Filled squares, discs and triangles of random colour and size on a noisy, shaded background, overlapping each
    other little: shape (not colour or size) tells the class, so a detector must learn form and extent.
    """
    from skimage.draw import disk, polygon

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    tilt = rng.uniform(-40, 40, 2)
    image = (90 + tilt[0] * yy + tilt[1] * xx)[..., None] + rng.normal(0, 12, (size, size, 3))
    taken = np.zeros((size, size), bool)
    boxes: list[list[int]] = []
    labels: list[int] = []
    wanted = int(rng.integers(count[0], count[1] + 1))
    for _ in range(wanted * 4):  # tries; crowded images place fewer
        if len(boxes) == wanted:
            break
        side = int(rng.integers(*extent))
        y0, x0 = (int(v) for v in rng.integers(0, size - side, 2))
        if taken[y0 : y0 + side, x0 : x0 + side].mean() > 0.1:
            continue
        kind = int(rng.integers(len(SHAPES)))
        if kind == 0:
            rows, cols = np.mgrid[y0 : y0 + side, x0 : x0 + side].reshape(2, -1)
        elif kind == 1:
            rows, cols = disk((y0 + side / 2 - 0.5, x0 + side / 2 - 0.5), side / 2, shape=(size, size))
        else:
            rows, cols = polygon(
                [y0 + side - 1, y0 + side - 1, y0], [x0, x0 + side - 1, x0 + (side - 1) / 2], shape=(size, size)
            )
        colour = rng.uniform(140, 255, 3) * rng.permutation([1.0, rng.uniform(0.2, 1), rng.uniform(0.2, 1)])
        image[rows, cols] = colour + rng.normal(0, 12, (len(rows), 3))
        taken[y0 : y0 + side, x0 : x0 + side] = True
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        labels.append(kind + 1)
    return (
        np.clip(image, 0, 255).astype(np.uint8),
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(labels, np.int64),
    )
