"""Sparse labels: 0 means unlabelled, 1..K are classes, as a user paints them (ilastik's convention).

``sample_scribbles`` turns dense ground truth into brush strokes for experiments: short straight strokes inside one
class, drawn class by class until each has its share of the labelled pixels, the way a user labels a few examples
of every class rather than scattering single pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import line_nd

from deepscope.data.io.volumes import read_volume
from deepscope.errors import DataError

MAX_CLASSES = 255  # class maps are written as uint8


def check_sparse_labels(labels: Any, name: str) -> np.ndarray:
    """Integer labels >= 0 with at least one labelled pixel, as a numpy array; errors name the file."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise DataError(f"{name}: labels must be integers (0 = unlabelled, 1..K = classes), got {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise DataError(f"{name}: labels must be a 2D image or a 3D volume, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{name}: negative label {labels.min()} (0 = unlabelled, 1..K = classes)")
    if labels.size and labels.max() > MAX_CLASSES:
        raise DataError(f"{name}: label {labels.max()} is above {MAX_CLASSES}; classes are numbered 1..K")
    if not labels.any():
        raise DataError(f"{name}: no labelled pixels (every value is 0 = unlabelled)")
    return labels.astype(np.uint8)


def read_sparse_labels(path: str | Path, key: str | None = None) -> np.ndarray:
    """A label image from TIFF/PNG/HDF5/zarr/NPZ (2D, or 3D volume), checked by ``check_sparse_labels``."""
    return check_sparse_labels(read_volume(path, key), str(path))


def dense_classes(dense: np.ndarray, class_values: Sequence[int] | None = None, foreground: bool = False) -> np.ndarray:
    """Dense ground truth as classes 1..K: ``foreground`` makes instance labels two classes (1 background,
    2 objects); otherwise value ``class_values[i]`` (default: the sorted values present) becomes class i + 1, and other
    values 0 (never sampled)."""
    dense = np.asarray(dense)
    if foreground:
        return np.where(dense > 0, 2, 1).astype(np.uint8)
    values = np.unique(dense) if class_values is None else np.asarray(class_values)
    if len(values) > MAX_CLASSES:
        raise DataError(
            f"ground truth has {len(values)} values; pass class values or use foreground for instance labels"
        )
    classes = np.zeros(dense.shape, np.uint8)
    for i, value in enumerate(values):
        classes[dense == value] = i + 1
    return classes


def sample_scribbles(
    classes: np.ndarray, fraction: float, length: int = 16, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Sparse labels (uint8) covering about ``fraction`` of the pixels of ``classes`` (dense 1..K, 0 = skip).

    The budget is split evenly over the classes present (a class smaller than its share is labelled whole); each
    stroke starts at a random unlabelled pixel of its class and runs straight in a random direction for up to
    ``length`` pixels, stopping where the class ends.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"scribble fraction must be in (0, 1], got {fraction}")
    rng = rng or np.random.default_rng(0)
    classes = np.asarray(classes)
    present = [int(c) for c in np.unique(classes) if c > 0]
    if not present:
        raise DataError("ground truth has no class to sample scribbles from")
    share = max(1, round(fraction * classes.size / len(present)))
    out = np.zeros(classes.shape, np.uint8)
    upper = np.array(classes.shape) - 1
    for c in present:
        where = np.flatnonzero(classes == c)
        if len(where) <= share:
            out.flat[where] = c
            continue
        labelled = 0
        for start in rng.permutation(where):
            if labelled >= share:
                break
            if out.flat[start]:
                continue
            origin = np.array(np.unravel_index(start, classes.shape))
            direction = rng.normal(size=classes.ndim)
            end = np.clip(np.round(origin + direction / np.linalg.norm(direction) * (length - 1)), 0, upper)
            line = line_nd(origin, end, endpoint=True)
            inside = classes[line] == c
            stop = len(inside) if inside.all() else int(np.argmin(inside))  # up to the first pixel outside the class
            stroke = tuple(axis[: min(stop, share - labelled)] for axis in line)
            labelled += int(np.count_nonzero(out[stroke] == 0))
            out[stroke] = c
    return out
