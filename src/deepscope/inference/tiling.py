"""Blockwise prediction with halo for 2D images and 3D volumes larger than memory.

The image is cut into a grid of tiles; each tile is read with ``halo`` voxels of context on every side (mirrored where
it leaves the image), predicted, and put back. Only ``image[slices]`` reads and ``out[slices] = block`` writes are used,
so both can be on-disk datasets (np.memmap, h5py, zarr) and the whole image is never loaded.

``blend="none"`` crops the halo off and writes each tile once, as torch-em does. ``"gaussian"`` and ``"linear"`` average
overlapping windows, as MONAI and nnU-Net do, but only over the tile plus the inner half of the halo: a network's output
near the window edge is spoilt by its own zero padding, so the outer half of the halo is context only and weighs nothing.
For a network whose receptive radius is at most ``halo // 2`` the blended result is then exactly the untiled one.
Blending streams along the first spatial axis: only the current row of tiles and its overlap with the next are
accumulated, and rows are written as soon as no later tile reaches them, so memory is bounded by a slab, not the image.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, SupportsInt, cast

import numpy as np
import torch
from torch import nn

from deepscope.errors import DeepscopeError
from deepscope.inference.fastest import announce
from deepscope.models import eval_mode

BLENDS = ("none", "gaussian", "linear")
Ranges = tuple[tuple[int, int], ...]


def _per_axis(value: int | Sequence[int], ndim: int, name: str, minimum: int) -> tuple[int, ...]:
    """One size per spatial axis from an int or a sequence; a sequence of the wrong length is refused, not broadcast."""
    # np.isscalar's TypeGuard narrows to numpy's scalar types and leaves the int in the other branch
    if np.isscalar(value):
        sizes = (int(cast(SupportsInt, value)),) * ndim
    else:
        sizes = tuple(int(v) for v in cast(Sequence[int], value))
    if len(sizes) != ndim or min(sizes) < minimum:
        raise DeepscopeError(f"{name} must give {ndim} sizes of at least {minimum} (one per spatial axis), got {value}")
    return sizes


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Positions along an axis of ``size`` mapped inside it by mirroring at the edges without repeating them (numpy's
    ``reflect``), as often as needed, so a window may be wider than the image."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index < size, index, period - index)


def read_block(image: Any, starts: tuple[int, ...], window: tuple[int, ...]) -> np.ndarray:
    """The float32 (C, *window) block whose corner is at ``starts`` (negative before the image), reading only the
    bounding box of the voxels it mirrors."""
    index = [_reflect(np.arange(a, a + w), n) for a, w, n in zip(starts, window, image.shape[1:])]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    block = np.asarray(image[(slice(None),) + box], dtype=np.float32)
    return block[np.ix_(np.arange(block.shape[0]), *(i - b.start for i, b in zip(index, box)))]


def _profile(blend: str, length: int) -> np.ndarray:
    """1D weight over ``length`` voxels: nnU-Net's Gaussian (sigma 1/8 of the length, >= exp(-8) at the ends) or a tent
    that stops at 2 / (length + 1) above zero; both positive, so every voxel of the extent counts."""
    x = np.arange(length) - (length - 1) / 2
    if blend == "gaussian":
        return np.exp(-0.5 * (x / (length / 8)) ** 2)
    return 1 - np.abs(x) / ((length + 1) / 2)


def _window_weight(blend: str, window: tuple[int, ...], tile: tuple[int, ...], halo: tuple[int, ...]) -> np.ndarray:
    """Blending weight of a window: the profile over the tile grown by half the halo, zero in the outer halo half."""
    weight = np.ones(())
    for w, t, h in zip(window, tile, halo):
        axis, extent = np.zeros(w), t + 2 * (h - h // 2)
        axis[h // 2 : h // 2 + extent] = _profile(blend, extent)
        weight = np.multiply.outer(weight, axis)
    return weight.astype(np.float32)


def _placement(
    tile: Ranges, grow: Sequence[int], halo: tuple[int, ...], spatial: tuple[int, ...]
) -> tuple[tuple, tuple]:
    """Where a tile's prediction goes: the tile grown by ``grow`` and clipped to the image, as image slices and as the
    matching slices of the window (which starts ``halo`` before the tile)."""
    dst, src = [], []
    for (start, stop), g, h, n in zip(tile, grow, halo, spatial):
        a, b = max(start - g, 0), min(stop + g, n)
        dst.append(slice(a, b))
        src.append(slice(a - start + h, b - start + h))
    return tuple(dst), tuple(src)


@torch.no_grad()
def _predict(
    model: nn.Module,
    blocks: list[np.ndarray],
    device: torch.device,
    views: list[tuple[tuple[int, ...], bool]],
    channels: int,
) -> np.ndarray:
    """The model's float32 output for a batch of windows, averaged over the views (flipped axes, whether the last two
    axes are swapped), each prediction turned back before it is added."""
    x = torch.from_numpy(np.stack(blocks)).to(device)
    total = torch.zeros((), device=device)
    for dims, swap in views:
        seen = x.flip(dims).transpose(-1, -2) if swap else x.flip(dims)
        y = model(seen)
        if tuple(y.shape) != (x.shape[0], channels) + tuple(seen.shape[2:]):
            raise DeepscopeError(
                f"model returned shape {tuple(y.shape)} for a tile batch of shape {tuple(x.shape)}; "
                f"expected {channels} channel(s) and the same spatial size"
            )
        total = total + (y.transpose(-1, -2) if swap else y).flip(dims).float()
    return (total / len(views)).cpu().numpy()


def predict_tiled(
    model: nn.Module,
    image: Any,
    tile: int | Sequence[int],
    halo: int | Sequence[int],
    out_channels: int,
    out: Any = None,
    blend: str = "gaussian",
    batch_size: int = 4,
    device: str | torch.device | None = None,
    flip_tta: bool = False,
    dtype: Any = np.float32,
    rotate_tta: bool = False,
    model_divisor: int | Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """``model`` applied to ``image`` (C, *spatial), 2 or 3 spatial axes, tile by tile; returns ``out``.

        ``out`` (out_channels, *spatial) is filled by slice assignment, or allocated as a numpy array of ``dtype``. Windows
        of ``tile + 2 * halo`` go to the model ``batch_size`` at a time on ``device`` (default CUDA if available, else CPU;
        the model is moved there and is in eval mode meanwhile). ``flip_tta`` averages over flips of every subset of spatial axes;
    ``rotate_tta`` also over those views with the last two axes swapped (with the flips: all 8 rotations and mirrorings
    of a 2D window).
        ``model_divisor`` is what the model needs each window side divisible by (a U-Net's ``divisor``); windows on axes
        shorter than a tile are shrunk to the image plus halo, rounded up to it. ``blend`` is explained in the module doc.
        ``progress(done, total)`` is called after each batch with the number of windows predicted so far, so a caller can
        show how far it is (and stop it by raising).
    """
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) not in (3, 4):
        raise DeepscopeError(f"image must be (C, H, W) or (C, D, H, W), got shape {shape}")
    spatial, ndim = shape[1:], len(shape) - 1
    tile, halo = _per_axis(tile, ndim, "tile", 1), _per_axis(halo, ndim, "halo", 0)
    if any(t < 2 * h for t, h in zip(tile, halo)):
        raise DeepscopeError(f"tile {tile} must be at least twice the halo {halo}")
    if blend not in BLENDS:
        raise DeepscopeError(f"unknown blend {blend!r}; choose one of {', '.join(BLENDS)}")
    if batch_size < 1:
        raise DeepscopeError(f"batch_size must be at least 1, got {batch_size}")
    divisor = (1,) * ndim if model_divisor is None else _per_axis(model_divisor, ndim, "model_divisor", 1)
    window = tuple(t + 2 * h for t, h in zip(tile, halo))
    if any(w % d for w, d in zip(window, divisor)):
        raise DeepscopeError(f"window tile + 2 * halo {window} must be divisible by the model divisor {divisor}")
    expected = (out_channels,) + spatial
    if out is None:
        out = np.empty(expected, dtype)
    elif tuple(out.shape) != expected:
        raise DeepscopeError(
            f"out must have shape {expected} (out_channels, *image spatial shape), got {tuple(out.shape)}"
        )

    tile = tuple(min(t, n) for t, n in zip(tile, spatial))  # one tile covers an axis shorter than a tile
    window = tuple(-(-(t + 2 * h) // d) * d for t, h, d in zip(tile, halo, divisor))  # last tiles are mirrored up to it
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    flips = [dims for r in range(ndim + 1 if flip_tta else 1) for dims in itertools.combinations(range(2, ndim + 2), r)]
    if rotate_tta:  # swapped views need square windows: the shorter side reads more mirrored context, cropped after
        window = window[:-2] + (max(window[-2:]),) * 2
    views = [(dims, swap) for dims in flips for swap in ((False, True) if rotate_tta else (False,))]
    grid = [[(s, min(s + t, n)) for s in range(0, n, t)] for n, t in zip(spatial, tile)]
    grow = [0] * ndim if blend == "none" else [h - h // 2 for h in halo]
    weight = None if blend == "none" else _window_weight(blend, window, tile, halo)
    # blending accumulates sum(w * pred) and, as the last channel, sum(w) over the slab of rows [lo, lo + acc.shape[1])
    lo, acc = 0, np.zeros((out_channels + 1, 0) + spatial[1:], np.float32)
    predicted, windows = 0, math.prod(len(axis) for axis in grid)
    announce(model, -(-windows // batch_size) * len(views))  # a network that may change runtime hears of the work
    with eval_mode(model.to(device)):  # each submodule gets its own mode back afterwards
        for k, row in enumerate(grid[0]):
            tiles: list[Ranges] = [(row,) + rest for rest in itertools.product(*grid[1:])]
            if weight is not None:
                start = max(row[0] - grow[0], 0)
                slab = np.zeros((out_channels + 1, min(row[1] + grow[0], spatial[0]) - start) + spatial[1:], np.float32)
                carried = acc[:, start - lo :]  # rows the previous row of tiles reached into
                slab[:, : carried.shape[1]] = carried
                lo, acc = start, slab
            for i in range(0, len(tiles), batch_size):
                batch = tiles[i : i + batch_size]
                blocks = [read_block(image, tuple(a - h for (a, _), h in zip(t, halo)), window) for t in batch]
                for t, pred in zip(batch, _predict(model, blocks, device, views, out_channels)):
                    dst, src = _placement(t, grow, halo, spatial)
                    if weight is None:
                        out[(slice(None),) + dst] = pred[(slice(None),) + src].astype(dtype, copy=False)
                        continue
                    w = weight[src]
                    at = (slice(dst[0].start - lo, dst[0].stop - lo),) + dst[1:]
                    acc[(slice(None, -1),) + at] += pred[(slice(None),) + src] * w
                    acc[(-1,) + at] += w
                predicted += len(batch)
                if progress is not None:
                    progress(predicted, windows)
            if weight is not None:
                # no later tile reaches above
                done = grid[0][k + 1][0] - grow[0] if k + 1 < len(grid[0]) else spatial[0]
                out[:, lo:done] = (acc[:-1, : done - lo] / acc[-1:, : done - lo]).astype(dtype, copy=False)
    return out
