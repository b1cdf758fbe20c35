"""Normalised, channels-first views of stored images, read region by region.

Images stay as stored (uint8/uint16 in RAM, or lazy HDF5/zarr volumes) and are normalised on read with percentiles
computed once per image, so a data set costs its size on disk in memory, not four times that as float32. Every task
that feeds an image to a model (training patches, tiled prediction, the pixel features, serve) reads it through
these views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepscope.data.io.volumes import MAX_COLOURS, spatial_shape
from deepscope.errors import DataError, DeepscopeError


def percentile_normalize(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, eps: float = 1e-6, channel_axis: int | None = None
) -> np.ndarray:
    """float32 ``(x - p_low) / (p_high - p_low + eps)``, percentiles per channel along ``channel_axis``.

    Percentiles rather than min/max so a few hot pixels do not squash the intensities of everything else;
    ``eps`` keeps a constant image (or channel) at 0 instead of dividing by zero.
    """
    x = np.asarray(image, dtype=np.float32)
    axes = None if channel_axis is None else tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    p_low, p_high = np.percentile(x, [low, high], axis=axes, keepdims=True).astype(np.float32)
    return (x - p_low) / (p_high - p_low + np.float32(eps))


PERCENTILE_SAMPLES = 2**22  # values read to estimate an image's percentiles; a strided subset of larger volumes
NORMALIZE_EPS = 1e-6  # added to the percentile range so a constant image (or channel) normalizes to 0, not inf
INVERT_MODES = ("never", "always", "auto")


def channel_count(shape: Sequence[int], ndim: int) -> int:
    """Channels of an image of ``shape`` in the storage layout (1 when it has no channel axis)."""
    if len(shape) == ndim:
        return 1
    return int(shape[-1] if ndim == 2 else shape[0])


def channel_axis(shape: Sequence[int], ndim: int) -> int | None:
    if len(shape) == ndim:
        return None
    return len(shape) - 1 if ndim == 2 else 0


def _samples(image: Any, ndim: int) -> np.ndarray:
    """(C, N) float32 values of an image, at most ``PERCENTILE_SAMPLES`` of them, to estimate its statistics.

    Larger images are subsampled by taking every k-th plane (row in 2D) along the first spatial axis, which
    reads whole contiguous planes of a lazy volume rather than scattered voxels.
    """
    shape = tuple(image.shape)
    axis = 1 if ndim == 3 and len(shape) == 4 else 0
    step = max(1, math.ceil(np.prod(shape, dtype=np.float64) / PERCENTILE_SAMPLES))
    index = [slice(None)] * len(shape)
    index[axis] = slice(None, None, step)
    values = np.asarray(image[tuple(index)], dtype=np.float32)
    c_axis = channel_axis(shape, ndim)
    return values.reshape(1, -1) if c_axis is None else np.moveaxis(values, c_axis, 0).reshape(values.shape[c_axis], -1)


def _percentiles(samples: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    p_low, p_high = np.percentile(samples, [low, high], axis=1).astype(np.float32)
    return p_low, p_high


def percentiles(image: Any, ndim: int, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) percentiles, float32 of shape (C,), from at most ``PERCENTILE_SAMPLES`` values."""
    return _percentiles(_samples(image, ndim), low, high)


def _bright_background(samples: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    """Whether the median pixel, percentile-normalized and averaged over channels, is above 0.5.

    Nuclei and cells usually cover well under half of an image, so the median pixel is background; percentile
    normalization puts a dark (fluorescence) background near 0 and a bright (bright-field, H&E) one near 1. On the
    DSB2018 training images the median is at most 0.19 for all 541 grey fluorescence images and at least 0.52 for
    all 107 H&E and 0.82 for all 16 grey bright-field ones, so this rule sorts all 664 by modality. It fails on
    images that objects fill more than half of; give ``invert="always"`` or ``"never"`` for those.
    """
    normalized = (samples - low[:, None]) / (high - low + np.float32(NORMALIZE_EPS))[:, None]
    return bool(np.median(normalized.mean(0)) > 0.5)


def _is_colour(samples: np.ndarray) -> bool:
    """Channels that differ somewhere; a grey picture saved as RGB has three equal ones."""
    return bool(np.any(samples != samples[:1]))


def appearance(stored: Any, ndim: int, low: np.ndarray, high: np.ndarray) -> str:
    """ "grey-dark", "grey-bright", "colour-dark" or "colour-bright": channels equal or not, and the background rule of
    :func:`_bright_background` on the stored image with its percentiles ``low``, ``high``, whether or not normalization
    inverted it."""
    samples = _samples(stored, ndim)
    colour = "colour" if _is_colour(samples) else "grey"
    return f"{colour}-{'bright' if _bright_background(samples, low, high) else 'dark'}"


class Normalized:
    """Read-only view of an image whose reads come back as float32 ``(x - low) / (high - low + eps)`` per channel,
    or 1 minus that when ``inverted``.

    Inversion is the same one-pass expression with another offset and sign, ``1 - (x - low) / s == (x - (low + s)) / -s``,
    so tiled prediction reads inverted blocks at no extra cost. Indexing with slices only (as patch sampling and
    tiling do) keeps every axis, so the per-channel scale broadcasts on the same axis of the block as of the image.
    """

    def __init__(
        self,
        image: Any,
        ndim: int,
        low: np.ndarray,
        high: np.ndarray,
        eps: float = NORMALIZE_EPS,
        inverted: bool = False,
    ) -> None:
        self.image, self.shape, self.ndim = image, tuple(image.shape), len(image.shape)
        self.low, self.high, self.inverted = np.asarray(low, np.float32), np.asarray(high, np.float32), bool(inverted)
        axis = channel_axis(self.shape, ndim)
        view = [1] * self.ndim
        if axis is not None:
            view[axis] = -1
        scale = self.high - self.low + np.float32(eps)
        self.offset = (self.low + scale if inverted else self.low).reshape(view)
        self.scale = (-scale if inverted else scale).reshape(view)

    def __getitem__(self, key: Any) -> np.ndarray:
        return (np.asarray(self.image[key], dtype=np.float32) - self.offset) / self.scale


def normalized(
    image: Any, ndim: int, low: float, high: float, invert: str = "never", name: str = "image"
) -> Normalized:
    """``image`` normalized between its ``low`` and ``high`` percentiles per channel, inverted as ``invert`` says:
    "never", "always", or "auto" (when the background is bright, see :func:`_bright_background`); ``name`` (the file)
    is named when the values read are not all finite."""
    if invert not in INVERT_MODES:
        raise DeepscopeError(f"invert must be one of {', '.join(INVERT_MODES)}, got {invert!r}")
    samples = _samples(image, ndim)
    if not np.isfinite(samples).all():  # NaN percentiles would make every normalized value NaN, and the loss with it
        raise DataError(f"{name}: holds NaN or infinite values")
    p_low, p_high = _percentiles(samples, low, high)
    inverted = invert == "always" or (invert == "auto" and _bright_background(samples, p_low, p_high))
    return Normalized(image, ndim, p_low, p_high, inverted=inverted)


class ChannelsFirst:
    """(C, *spatial) view of a stored image, as tiled prediction reads it; a grey image is repeated to ``channels``."""

    def __init__(self, image: Any, ndim: int, channels: int | None = None) -> None:
        shape = tuple(image.shape)
        self.image, self.spatial_ndim = image, ndim
        self.axis = channel_axis(shape, ndim)
        stored = channel_count(shape, ndim)
        self.channels = stored if channels is None else channels
        if stored not in (1, self.channels):
            raise DataError(f"image of shape {shape} has {stored} channels but {self.channels} are expected")
        self.shape = (self.channels, *spatial_shape(shape, ndim))
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        spatial = tuple(key[1:])
        if self.axis is None:
            block = np.asarray(self.image[spatial])[None]
        elif self.spatial_ndim == 2:
            block = np.moveaxis(np.asarray(self.image[spatial + (slice(None),)]), -1, 0)
        else:
            block = np.asarray(self.image[(slice(None),) + spatial])
        if block.shape[0] != self.channels:
            block = np.repeat(block, self.channels, axis=0)
        return block[key[0]]


def input_view(
    image: Any, ndim: int, channels: int, name: str, normalize: Sequence[float] | None, invert: str = "never"
) -> Any:
    """A stored image checked against a ``ndim``-D model of ``channels`` input channels, as a (C, *spatial) view,
    percentile-normalized per channel (and inverted as ``invert`` says, see :func:`normalized`) unless ``normalize``
    is None; errors name the file."""
    shape = tuple(image.shape)
    if ndim == 2 and len(shape) == 3 and shape[-1] not in (1, channels):
        if shape[-1] <= MAX_COLOURS:
            raise DataError(f"{name}: image has {shape[-1]} channels but the model takes {channels}")
        raise DataError(f"{name}: 3D volume {shape} given to a 2D model (2D images are (H, W) or (H, W, {channels}))")
    if len(shape) not in (ndim, ndim + 1):
        layout = "(H, W) or (H, W, C)" if ndim == 2 else "(D, H, W) or (C, D, H, W)"
        raise DataError(f"{name}: image of shape {shape} does not fit a {ndim}D model; expected {layout}")
    if normalize is not None:
        low, high = normalize
        image = normalized(image, ndim, low, high, invert=invert, name=name)
    elif invert != "never":
        raise DeepscopeError(f"invert={invert!r} needs percentile normalization, but normalize is off")
    try:
        return ChannelsFirst(image, ndim, channels)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None
