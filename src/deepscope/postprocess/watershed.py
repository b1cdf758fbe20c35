"""From network output to instances: foreground (and boundary) probability maps, 2D (H, W) or 3D (D, H, W), to labels.

The maps are the predictions of the ``deepscope.data.segmentation.targets`` targets with the channel axis taken off. Objects are
seeded where the network is sure (foreground without boundary, or distance maxima) and the seeds are grown back over
the whole foreground by a watershed, so the boundary pixels cut away to separate objects are returned to them.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.measure import label
from skimage.segmentation import relabel_sequential, watershed

from deepscope.errors import DataError

SEEDS = ("components", "maxima")


def _maps(foreground: np.ndarray, boundaries: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Refuse maps that are not 2D/3D or not aligned; a leftover channel axis shows up here as a shape mismatch."""
    foreground = np.asarray(foreground)
    boundaries = None if boundaries is None else np.asarray(boundaries)
    other = foreground.shape if boundaries is None else boundaries.shape
    if foreground.ndim not in (2, 3) or other != foreground.shape:
        raise DataError(
            f"foreground and boundaries must be 2D or 3D maps of one shape, got {foreground.shape} and {other}"
        )
    return foreground, boundaries


def size_filter(labels: np.ndarray, min_size: int) -> np.ndarray:
    """A copy of ``labels`` (non-negative integers, as from ``skimage.measure.label``) without objects under
    ``min_size`` voxels; ids and dtype are kept, relabel afterwards if consecutive ids are needed."""
    labels = np.asarray(labels)
    small = np.bincount(labels.ravel(), minlength=1) < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def watershed_from_seeds(
    foreground: np.ndarray,
    boundaries: np.ndarray | None = None,
    threshold: float = 0.5,
    seeds: str = "components",
    min_distance: int = 3,
    min_size: int = 0,
) -> np.ndarray:
    """int32 labels 1..n: a seeded watershed restricted to ``foreground > threshold``.

    ``seeds="components"`` takes the connected components of the foreground minus the boundaries;
    ``seeds="maxima"`` the local maxima (at least ``min_distance`` apart) of the distance transform of the foreground
    minus the boundaries, which splits touching round objects even without a boundary map and does not merge cells
    whose boundary has a gap (elongated objects may be split, though).
    The flooded relief is the boundary map when there is one, else the negated distance transform. Foreground that
    no seed reaches (an object no wider than the boundary band has no seed) stays background.
    """
    foreground, boundaries = _maps(foreground, boundaries)
    if seeds not in SEEDS:
        raise DataError(f"unknown seeds {seeds!r}; choose one of {', '.join(SEEDS)}")
    mask = foreground > threshold
    full = mask.ndim  # diagonal neighbours connect in the growth
    interior = mask if boundaries is None else mask & ~(boundaries > threshold)
    distance = ndimage.distance_transform_edt(interior) if boundaries is None or seeds == "maxima" else None
    if seeds == "components":
        # between boundaries, face connectivity: a seed must not leak through a one-voxel diagonal gap
        markers = label(interior, connectivity=full if boundaries is None else 1)
    else:
        peaks = np.zeros_like(mask)
        peaks[tuple(peak_local_max(distance, min_distance=min_distance, labels=interior, exclude_border=False).T)] = (
            True
        )
        markers = label(peaks, connectivity=full)  # touching peaks of one plateau are one seed
    relief = boundaries if boundaries is not None else -cast(np.ndarray, distance)  # computed without boundaries
    grown = watershed(relief, markers, connectivity=full, mask=mask)
    return relabel_sequential(size_filter(grown, min_size))[0].astype(np.int32)


def connected_components(
    foreground: np.ndarray, boundaries: np.ndarray | None = None, threshold: float = 0.5, min_size: int = 0
) -> np.ndarray:
    """int32 labels 1..n: components of foreground without boundaries, grown back over the foreground."""
    return watershed_from_seeds(foreground, boundaries, threshold, seeds="components", min_size=min_size)
