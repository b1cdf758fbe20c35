"""Instances of an image too large to post-process whole: block by block, objects kept by the block holding their centre.

Every instance method here (watershed, polygon NMS, flow following) is local: an object depends on the network's
output within about its own size. So each block of the image is post-processed together with a halo of context, and
of the objects it finds only those whose centre lies in the block's core and that do not touch the window's inner
edges (where they would be cut) are kept; the cores partition the image, so every object is kept exactly once and
whole, as long as the halo is wider than the largest object. Objects are pasted onto pixels no earlier object holds.
The result equals the untiled one up to ties the post-processing breaks by scan order (a watershed's boundary pixels).
Memory follows the block, not the image: the maps and the labels are read and written by slices, so they may be
HDF5/zarr arrays on disk.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deepscope.errors import DeepscopeError

DUPLICATE_SHARE = 0.5  # an object whose pixels are more than this share taken already is a second view of one pasted


def centres(labels: np.ndarray) -> np.ndarray:
    """(max id + 1, ndim) mean coordinates of every id, by bincount (NaN for ids not present)."""
    flat = labels.ravel().astype(np.int64)
    count = np.bincount(flat, minlength=1).astype(np.float64)
    coords = np.indices(labels.shape).reshape(labels.ndim, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([np.bincount(flat, weights=c, minlength=len(count)) / count for c in coords], axis=1)


def _kept(
    local: np.ndarray, window: tuple[slice, ...], core: tuple[slice, ...], spatial: tuple[int, ...], taken: np.ndarray
) -> np.ndarray:
    """Ids of ``local`` (labels of ``window``) this block keeps: centre in its core, not cut by an inner window edge,
    and not mostly on pixels (``taken``) that earlier blocks have pasted."""
    centre = centres(local) + np.array([w.start for w in window])
    keep = np.all(
        [(centre[:, a] >= core[a].start) & (centre[:, a] < core[a].stop) for a in range(len(spatial))], axis=0
    )
    keep[0] = False
    for axis, w in enumerate(window):
        for face, inner in ((0, w.start > 0), (-1, w.stop < spatial[axis])):
            if inner:
                keep[np.unique(np.take(local, face, axis=axis))] = False
    flat = local.ravel()
    covered = np.bincount(flat, weights=taken.ravel(), minlength=len(centre))
    keep &= covered <= DUPLICATE_SHARE * np.bincount(flat, minlength=len(centre))  # a second view of a pasted object
    return np.flatnonzero(keep)


def tiled_instances(
    segment: Callable[[np.ndarray], np.ndarray],
    maps: Any,
    block: int | Sequence[int],
    halo: int | Sequence[int],
    out: Any = None,
) -> Any:
    """Labels (int32, ids from 1 up in block order) of ``maps`` (C, *spatial), computed by ``segment`` (maps of a
    window to its labels) on blocks of ``block`` with ``halo`` of context; ``out`` (*spatial) is written by slices.

    An image no larger than one block is segmented whole, so small images get exactly the untiled result.
    """
    spatial = tuple(maps.shape[1:])
    ndim = len(spatial)
    block = (block,) * ndim if isinstance(block, int) else tuple(block)
    halo = (halo,) * ndim if isinstance(halo, int) else tuple(halo)
    if len(block) != ndim or len(halo) != ndim or min(block) < 1 or min(halo) < 0:
        raise DeepscopeError(f"block {block} and halo {halo} must give one positive size per spatial axis of {spatial}")
    if out is None:
        out = np.zeros(spatial, np.int32)
    if all(s <= b for s, b in zip(spatial, block)):
        out[...] = segment(np.asarray(maps[...]))
        return out
    out[...] = 0
    next_id = 1
    for corner in itertools.product(*[range(0, s, b) for s, b in zip(spatial, block)]):
        core = tuple(slice(c, min(c + b, s)) for c, b, s in zip(corner, block, spatial))
        window = tuple(slice(max(c.start - h, 0), min(c.stop + h, s)) for c, h, s in zip(core, halo, spatial))
        local = np.asarray(segment(np.asarray(maps[(slice(None),) + window])))
        current = np.asarray(out[window])
        ids = _kept(local, window, core, spatial, current != 0)
        if not len(ids):
            continue
        relabel = np.zeros(int(local.max()) + 1, np.int32)
        relabel[ids] = np.arange(next_id, next_id + len(ids), dtype=np.int32)
        next_id += len(ids)
        new = relabel[local]
        paste = (new > 0) & (current == 0)
        current[paste] = new[paste]
        out[window] = current
    return out
