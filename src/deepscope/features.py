"""Filter-bank pixel features (ilastik's set) in 2D and 3D, computed in torch on the CPU or a GPU.

Every filter is a sum of separable Gaussian-derivative kernels, sampled exactly as ``scipy.ndimage.gaussian_filter``
samples them (radius ``int(4 sigma + 0.5)``, order 0 normalised to sum 1). The convolution is done by FFT: one forward
transform of the block, then per feature one product with the outer product of 1D kernel spectra and one inverse
transform. Written here because no maintained library computes this set on torch tensors: scikit-image and scipy
filter on the CPU one direct convolution at a time, which costs more per output than a transform of the whole block
(and the 3D set at sigma 10 needs kernels of 81 taps along each axis).

A block carries ``spec.halo`` voxels of mirrored context on every side (``tiling.read_block``), at least the radius of
the widest kernel chain, and the features of its centre are returned. The FFT is zero-padded past the block, so the
circular wrap never reaches the centre: features of a tile equal those of the same voxels computed from the whole
image, up to float32 rounding of transforms of different sizes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from scipy.fft import next_fast_len

from deepscope.errors import DeepscopeError
from deepscope.tiling import read_block

SCALES = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
FILTERS = ("gaussian", "log", "ggm", "dog", "structure", "hessian")
DOG_RATIO = 0.66  # ilastik: difference of Gaussians at sigma and 0.66 sigma
STRUCTURE_OUTER = 0.5  # ilastik: gradients at sigma, integrated at 0.5 sigma


def radius(sigma: float) -> int:
    """Kernel radius of a Gaussian of ``sigma``, as scipy.ndimage truncates it (4 sigma)."""
    return int(4.0 * sigma + 0.5)


@dataclass(frozen=True)
class FeatureSpec:
    """Which filters at which scales, for images of ``ndim`` spatial axes and ``channels`` channels.

    Features are ordered channel by channel, then filter by filter as in ``filters``, then by scale; eigenvalue
    filters give ``ndim`` features per scale, largest first.
    """

    filters: dict[str, tuple[float, ...]] = field(default_factory=dict)
    ndim: int = 2
    channels: int = 1

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3):
            raise DeepscopeError(f"features are for 2D or 3D images, got ndim={self.ndim}")
        if self.channels < 1:
            raise DeepscopeError(f"an image has at least one channel, got {self.channels}")
        if not self.filters:
            raise DeepscopeError("no features selected: choose at least one filter and scale")
        for name, scales in self.filters.items():
            if name not in FILTERS:
                raise DeepscopeError(f"unknown filter {name!r}; choose from {', '.join(FILTERS)}")
            if not scales or min(scales) <= 0:
                raise DeepscopeError(f"filter {name!r} needs positive scales, got {list(scales)}")

    @classmethod
    def create(cls, filters: dict[str, Sequence[float]], ndim: int = 2, channels: int = 1) -> FeatureSpec:
        return cls({str(k): tuple(float(s) for s in v) for k, v in filters.items()}, ndim, channels)

    @classmethod
    def default(cls, ndim: int = 2, channels: int = 1) -> FeatureSpec:
        """ilastik's full set: every filter at every scale from 0.7, and Gaussian smoothing also at 0.3."""
        return cls.create({name: SCALES if name == "gaussian" else SCALES[1:] for name in FILTERS}, ndim, channels)

    @classmethod
    def from_selection(cls, filters: Sequence[str], scales: Sequence[float], ndim: int = 2, channels: int = 1) -> FeatureSpec:
        """Every named filter at every given scale."""
        return cls.create({name: tuple(scales) for name in filters}, ndim, channels)

    def to_dict(self) -> dict[str, Any]:
        return {"filters": {k: list(v) for k, v in self.filters.items()}, "ndim": self.ndim, "channels": self.channels}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeatureSpec:
        return cls.create(values["filters"], int(values["ndim"]), int(values["channels"]))

    def per_scale(self, name: str) -> int:
        """Maps per scale of filter ``name``: one, or ``ndim`` eigenvalues."""
        return self.ndim if name in ("structure", "hessian") else 1

    def names(self) -> list[str]:
        base = []
        for name, scales in self.filters.items():
            for sigma in scales:
                count = self.per_scale(name)
                base += [f"{name}_{sigma:g}" + (f"_ev{i}" if count > 1 else "") for i in range(count)]
        return base if self.channels == 1 else [f"c{c}_{n}" for c in range(self.channels) for n in base]

    @property
    def count(self) -> int:
        return len(self.names())

    @property
    def halo(self) -> int:
        """Context a block needs on every side so that its centre's features are exact."""
        widest = 0
        for name, scales in self.filters.items():
            for sigma in scales:
                widest = max(widest, radius(sigma) + (radius(STRUCTURE_OUTER * sigma) if name == "structure" else 0))
        return widest


@lru_cache(maxsize=256)
def _kernel(sigma: float, order: int) -> np.ndarray:
    """scipy.ndimage's sampled Gaussian (order 0) or its first or second derivative, float64, centred."""
    r = radius(sigma)
    x = np.arange(-r, r + 1, dtype=np.float64)
    phi = np.exp(-0.5 * (x / sigma) ** 2)
    phi /= phi.sum()
    if order == 1:
        return -x / sigma**2 * phi
    if order == 2:
        return (x**2 / sigma**4 - 1 / sigma**2) * phi
    return phi


_SPECTRA: dict[tuple[float, int, int, bool, str], torch.Tensor] = {}


def _spectrum(sigma: float, order: int, length: int, last: bool, device: torch.device) -> torch.Tensor:
    """DFT over ``length`` of a kernel wrapped to start at its centre (rfft on the last axis, full fft elsewhere)."""
    key = (sigma, order, length, last, str(device))
    if key not in _SPECTRA:
        k = _kernel(sigma, order)
        r = len(k) // 2
        wrapped = np.zeros(length)
        wrapped[np.arange(-r, r + 1) % length] = k
        spec = np.fft.rfft(wrapped) if last else np.fft.fft(wrapped)
        _SPECTRA[key] = torch.from_numpy(spec.astype(np.complex64)).to(device)
        if len(_SPECTRA) > 512:
            _SPECTRA.pop(next(iter(_SPECTRA)))
    return _SPECTRA[key]


class _Block:
    """One (C, *padded) block in the frequency domain.

    Spectra and maps go through buffers allocated once per block and reused for every filter and scale: fresh
    multi-megabyte tensors per map would each be paged in anew, which costs more than the transforms themselves.
    """

    def __init__(self, block: torch.Tensor, halo: int) -> None:
        self.ndim = block.ndim - 1
        self.dims = tuple(range(1, block.ndim))
        self.shape = tuple(block.shape[1:])
        self.fft_shape = tuple(next_fast_len(n, real=True) for n in self.shape)
        self.halo = halo
        self.device = block.device
        self.spectrum = torch.fft.rfftn(block, s=self.fft_shape, dim=self.dims)
        self.padded = (slice(None),) + tuple(slice(0, n) for n in self.shape)
        self.centre = (slice(None),) + tuple(slice(halo, n - halo) for n in self.shape)
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, like: str = "centre") -> torch.Tensor:
        """A named scratch tensor, allocated on first use: ``centre`` or ``padded`` real maps, ``spectrum`` complex."""
        if name not in self._buffers:
            channels = self.spectrum.shape[0]
            if like == "spectrum":
                self._buffers[name] = torch.empty_like(self.spectrum)
            elif like == "fft":
                self._buffers[name] = torch.empty((channels, *self.fft_shape), device=self.device)
            else:
                shape = self.shape if like == "padded" else tuple(n - 2 * self.halo for n in self.shape)
                self._buffers[name] = torch.empty((channels, *shape), device=self.device)
        return self._buffers[name]

    def _kernel_times(self, spectrum: torch.Tensor, sigma: float, orders: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        """``spectrum`` times the separable kernel with derivative ``orders[a]`` along spatial axis ``a``, into ``out``."""
        for axis, (order, n) in enumerate(zip(orders, self.fft_shape)):
            k = _spectrum(sigma, order, n, axis == self.ndim - 1, self.device).reshape((-1,) + (1,) * (self.ndim - 1 - axis))
            if axis == 0:
                torch.mul(spectrum, k, out=out)
            else:
                out.mul_(k)
        return out

    def filtered(self, terms: Sequence[tuple[float, Sequence[int], float]], source: torch.Tensor | None = None) -> torch.Tensor:
        """The padded-size map of the sum of ``weight * kernel(sigma, orders)`` applied to the block (or to the
        spectrum ``source``); valid until the next call, and exact inside ``halo`` minus the kernel radius."""
        source = self.spectrum if source is None else source
        total = self._kernel_times(source, *terms[0][:2], self.buffer("product", "spectrum"))
        if terms[0][2] != 1:
            total.mul_(terms[0][2])
        for sigma, orders, weight in terms[1:]:
            total.add_(self._kernel_times(source, sigma, orders, self.buffer("term", "spectrum")), alpha=weight)
        real = torch.fft.irfftn(total, s=self.fft_shape, dim=self.dims, out=self.buffer("real", "fft"))
        return real[self.padded]

    def smoothed(self, values: torch.Tensor, sigma: float) -> torch.Tensor:
        """Gaussian smoothing of another (C, *padded) map on this block's grid, cropped to the centre."""
        spectrum = torch.fft.rfftn(values, s=self.fft_shape, dim=self.dims, out=self.buffer("values", "spectrum"))
        return self.filtered([(sigma, (0,) * self.ndim, 1.0)], spectrum)[self.centre]


def _unit(ndim: int, axis: int, order: int) -> tuple[int, ...]:
    return tuple(order if a == axis else 0 for a in range(ndim))


def _pairs(ndim: int) -> list[tuple[int, int]]:
    """Upper-triangle index pairs of a symmetric ndim x ndim matrix: diagonal first, then off-diagonal."""
    return [(a, a) for a in range(ndim)] + list(itertools.combinations(range(ndim), 2))


def _eigenvalues_2d(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scratch: torch.Tensor,
                    out: Sequence[torch.Tensor]) -> None:
    """Eigenvalues of [[a, b], [b, c]], largest first, into ``out``; ``a`` and ``scratch`` are overwritten."""
    torch.sub(a, c, out=scratch).mul_(0.5)
    torch.hypot(scratch, b, out=scratch)
    a.add_(c).mul_(0.5)
    torch.add(a, scratch, out=out[0])
    torch.sub(a, scratch, out=out[1])


def symmetric_eigenvalues(entries: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Eigenvalues, largest first, of 2x2 or 3x3 symmetric matrices given by their upper-triangle entries.

    Closed forms, as a batched LAPACK call is several times slower on millions of tiny matrices and needs them copied
    into (N, 3, 3) layout first. The 3x3 one (the trigonometric method of O. K. Smith, 1961) runs in float64, since
    float32 loses the arccosine near repeated eigenvalues.
    """
    ndim = max(a for a, _ in entries) + 1
    if ndim == 2:
        out = torch.empty((2, *entries[0, 0].shape), dtype=entries[0, 0].dtype, device=entries[0, 0].device)
        _eigenvalues_2d(entries[0, 0].clone(), entries[0, 1], entries[1, 1], torch.empty_like(entries[0, 0]), out)
        return out
    e = {k: v.double() for k, v in entries.items()}
    q = (e[0, 0] + e[1, 1] + e[2, 2]) / 3
    d0, d1, d2 = e[0, 0] - q, e[1, 1] - q, e[2, 2] - q
    p = torch.sqrt((d0**2 + d1**2 + d2**2 + 2 * (e[0, 1] ** 2 + e[0, 2] ** 2 + e[1, 2] ** 2)) / 6)
    det = d0 * (d1 * d2 - e[1, 2] ** 2) - e[0, 1] * (e[0, 1] * d2 - e[1, 2] * e[0, 2]) + e[0, 2] * (e[0, 1] * e[1, 2] - d1 * e[0, 2])
    r = torch.clamp(det / (2 * torch.where(p > 0, p, 1.0) ** 3), -1.0, 1.0)
    phi = torch.acos(r) / 3
    first = q + 2 * p * torch.cos(phi)
    last = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    return torch.stack([first, 3 * q - first - last, last]).float()


def _eigenvalues_into(block: _Block, entries: dict[tuple[int, int], torch.Tensor], out: Sequence[torch.Tensor]) -> None:
    if block.ndim == 2:
        _eigenvalues_2d(entries[0, 0], entries[0, 1], entries[1, 1], block.buffer("eigen"), out)
        return
    for target, values in zip(out, symmetric_eigenvalues(entries)):
        target.copy_(values)


def _filter(block: _Block, name: str, sigma: float, out: Sequence[torch.Tensor]) -> None:
    """Write the (C, *centre) maps of one filter at one scale into ``out`` (one tensor per map)."""
    nd, centre = block.ndim, block.centre
    if name == "gaussian":
        out[0].copy_(block.filtered([(sigma, (0,) * nd, 1.0)])[centre])
    elif name == "log":
        out[0].copy_(block.filtered([(sigma, _unit(nd, a, 2), 1.0) for a in range(nd)])[centre])
    elif name == "dog":
        out[0].copy_(block.filtered([(sigma, (0,) * nd, 1.0), (DOG_RATIO * sigma, (0,) * nd, -1.0)])[centre])
    elif name == "ggm":
        out[0].zero_()
        for a in range(nd):
            derivative = block.filtered([(sigma, _unit(nd, a, 1), 1.0)])[centre]
            out[0].addcmul_(derivative, derivative)
        out[0].sqrt_()
    else:
        entries = {pair: block.buffer(f"entry{pair}") for pair in _pairs(nd)}
        if name == "hessian":
            for (a, b), target in entries.items():
                target.copy_(block.filtered([(sigma, tuple((a == i) + (b == i) for i in range(nd)), 1.0)])[centre])
        else:  # structure tensor: products of gradients over the whole block (valid where the halo allows), smoothed
            gradients = [block.buffer(f"gradient{a}", "padded").copy_(block.filtered([(sigma, _unit(nd, a, 1), 1.0)]))
                         for a in range(nd)]
            product = block.buffer("gradient product", "padded")
            for (a, b), target in entries.items():
                target.copy_(block.smoothed(torch.mul(gradients[a], gradients[b], out=product), STRUCTURE_OUTER * sigma))
        _eigenvalues_into(block, entries, out)


def _check_image(image: Any, spec: FeatureSpec) -> tuple[int, ...]:
    spatial = tuple(image.shape[1:])
    if len(spatial) != spec.ndim or image.shape[0] != spec.channels:
        raise DeepscopeError(f"image of shape {tuple(image.shape)} does not fit the features of {spec.channels}-channel "
                             f"{spec.ndim}D images (expected (C, *spatial))")
    return spatial


def _fill(image: Any, spec: FeatureSpec, region: tuple[slice, ...], device: torch.device, out: Any, at: tuple[slice, ...]) -> None:
    """Write the features of ``region`` of ``image`` into ``out[:, at]`` map by map. A numpy ``out`` is written in place
    by the CPU computation; other outputs (HDF5, zarr, or features computed on a GPU) get each map copied."""
    halo, per_channel = spec.halo, spec.count // spec.channels
    starts = tuple(s.start - halo for s in region)
    window = tuple(s.stop - s.start + 2 * halo for s in region)
    x = torch.from_numpy(read_block(image, starts, window)).to(device)
    if x.shape[0] != spec.channels:
        raise DeepscopeError(f"block of shape {tuple(x.shape)} does not fit the features of {spec.channels}-channel images")
    block = _Block(x, halo)
    direct = isinstance(out, np.ndarray) and device.type == "cpu"
    j = 0
    for name, scales in spec.filters.items():
        for sigma in scales:
            count = spec.per_scale(name)
            if direct:  # (C, *centre) views of maps j.. for every channel
                targets = [torch.from_numpy(out[(slice(j + i, None, per_channel),) + at]) for i in range(count)]
            else:
                targets = [block.buffer(f"map{i}") for i in range(count)]
            _filter(block, name, sigma, targets)
            if not direct:
                for i, target in enumerate(targets):
                    for c, values in enumerate(target.cpu().numpy()):
                        out[(c * per_channel + j + i,) + at] = values
            j += count


def _tiles_and_device(image: Any, spec: FeatureSpec, tile: Sequence[int] | None, device: Any) -> tuple[Iterator, torch.device]:
    spatial = _check_image(image, spec)
    tile = auto_tile(spatial, spec) if tile is None else tuple(min(int(t), n) for t, n in zip(tile, spatial))
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return tile_grid(spatial, tile), device


def feature_tiles(
    image: Any, spec: FeatureSpec, tile: Sequence[int] | None = None, device: Any = None
) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """(tile slices, (F, *tile) float32 features) over a (C, *spatial) array-like, each tile read with its halo."""
    grid, device = _tiles_and_device(image, spec, tile, device)
    for region in grid:
        features = np.empty((spec.count,) + tuple(s.stop - s.start for s in region), np.float32)
        _fill(image, spec, region, device, features, ())
        yield region, features


def compute_features(image: Any, spec: FeatureSpec, tile: Sequence[int] | None = None, device: Any = None, out: Any = None) -> Any:
    """(F, *spatial) float32 features of a (C, *spatial) image, tile by tile into ``out`` (numpy by default; any
    array-like written by slices, such as an HDF5 dataset or a memory-mapped file).

    ``tile`` None takes the whole image when its padded block fits ``auto_tile``'s memory budget.
    """
    grid, device = _tiles_and_device(image, spec, tile, device)
    if out is None:
        out = np.empty((spec.count,) + tuple(image.shape[1:]), np.float32)
    for region in grid:
        _fill(image, spec, region, device, out, region)
    return out


def tile_grid(spatial: Sequence[int], tile: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Slices of the tiles covering an image, row-major; edge tiles are cut to the image."""
    ranges = [[slice(s, min(s + t, n)) for s in range(0, n, t)] for n, t in zip(spatial, tile)]
    return iter(itertools.product(*ranges))


BYTES_PER_VOXEL = 128  # spectrum, a few maps and float64 eigenvalue temporaries per padded voxel and channel


def auto_tile(spatial: Sequence[int], spec: FeatureSpec, budget: int = 2**32) -> tuple[int, ...]:
    """The whole image when its padded block needs at most ``budget`` bytes while its features are computed, else
    tiles halved along their longest axis until one fits (or is no wider than twice the halo)."""
    tile = list(spatial)
    while (math.prod(t + 2 * spec.halo for t in tile) * spec.channels * BYTES_PER_VOXEL > budget
           and max(tile) > 2 * spec.halo):
        axis = int(np.argmax(tile))
        tile[axis] = -(-tile[axis] // 2)
    return tuple(tile)
