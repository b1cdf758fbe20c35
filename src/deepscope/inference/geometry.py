"""Patch and tile geometry shared by the U-Net tasks: training patch shapes and prediction tiles with their halo."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from deepscope.errors import DataError


def patch_shape_for(
    requested: Sequence[int] | None,
    spatial: Sequence[Sequence[int]],
    default: Sequence[int],
    divisor: Sequence[int],
    kind: str = "images",
) -> tuple[int, ...]:
    """The requested patch shape (checked), or ``default`` capped by the smallest of the ``spatial`` shapes and
    rounded down to ``divisor``; ``kind`` names the arrays whose dimensionality decides (for messages)."""
    ndim = len(default)
    smallest = np.min(np.asarray(spatial), axis=0)
    if requested is not None:
        shape = tuple(int(s) for s in requested)
        if len(shape) != ndim:
            raise DataError(f"patch_shape {list(shape)} has {len(shape)} sizes but the {kind} are {ndim}D")
        if any(s % d for s, d in zip(shape, divisor)):
            raise DataError(f"patch_shape {list(shape)} must be divisible by {list(divisor)} (the U-Net's pooling)")
        return shape
    shape = tuple(max(d, min(p, int(s)) // d * d) for p, s, d in zip(default, smallest, divisor))
    if any(p > s for p, s in zip(shape, smallest)):
        raise DataError(
            f"the smallest image {tuple(int(s) for s in smallest)} is smaller than one U-Net input {shape}; use a shallower model (model_args.depth)"
        )
    return shape


def halo_for(tile: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    """About an eighth of the tile, rounded up so that ``tile + 2 * halo`` stays divisible by ``divisor``."""
    return tuple(
        math.ceil(t / 8 / max(1, d // 2)) * max(1, d // 2) if d > 1 else math.ceil(t / 8) for t, d in zip(tile, divisor)
    )


def tile_and_halo(
    tile: Sequence[int] | None,
    halo: Sequence[int] | None,
    saved_tile: Sequence[int],
    saved_halo: Sequence[int],
    divisor: Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Prediction tile and halo: the given ones (one value stands for every axis), else those saved at training; a new
    tile without a halo gets its own default halo rather than the saved one."""
    ndim = len(saved_tile)
    tile_t = tuple(int(t) for t in tile) if tile else tuple(saved_tile)
    tile_t = tile_t * ndim if len(tile_t) == 1 else tile_t
    halo_t = tuple(int(h) for h in halo) if halo else (tuple(saved_halo) if not tile else halo_for(tile_t, divisor))
    return tile_t, halo_t * ndim if len(halo_t) == 1 else halo_t
