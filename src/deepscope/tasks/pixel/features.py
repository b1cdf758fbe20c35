"""Filter-bank pixel features (ilastik's set) in 2D and 3D, computed in torch on the CPU or a GPU.

Every filter is a sum of separable Gaussian-derivative kernels, sampled exactly as ``scipy.ndimage.gaussian_filter``
samples them (radius ``int(4 sigma + 0.5)``, order 0 normalised to sum 1). The convolution is done by FFT: one forward
transform of the block, then per feature the 1D kernel spectra multiplied in and inverted axis by axis (see
``_Block``). Written here because no maintained library computes this set on torch tensors: scikit-image and scipy
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
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from deepscope.errors import DeepscopeError
from deepscope.inference.tiling import read_block

SCALES = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
MAX_SCALE = 100.0  # a kernel of radius 400 pixels; larger scales only exhaust memory
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
            if not scales or not all(0 < s <= MAX_SCALE for s in scales):
                raise DeepscopeError(
                    f"filter {name!r} needs positive scales of at most {MAX_SCALE:g}, got {list(scales)}"
                )

    @classmethod
    def create(cls, filters: Mapping[str, Sequence[float]], ndim: int = 2, channels: int = 1) -> FeatureSpec:
        return cls({str(k): tuple(float(s) for s in v) for k, v in filters.items()}, ndim, channels)

    @classmethod
    def default(cls, ndim: int = 2, channels: int = 1) -> FeatureSpec:
        """ilastik's full set: every filter at every scale from 0.7, and Gaussian smoothing also at 0.3."""
        return cls.create({name: SCALES if name == "gaussian" else SCALES[1:] for name in FILTERS}, ndim, channels)

    @classmethod
    def from_selection(
        cls, filters: Sequence[str], scales: Sequence[float], ndim: int = 2, channels: int = 1
    ) -> FeatureSpec:
        """Every named filter at every given scale."""
        return cls.create({name: tuple(scales) for name in filters}, ndim, channels)

    def to_dict(self) -> dict[str, Any]:
        return {"filters": {k: list(v) for k, v in self.filters.items()}, "ndim": self.ndim, "channels": self.channels}

    @classmethod
    def from_dict(cls, values: Any) -> FeatureSpec:
        """The spec :meth:`to_dict` wrote, read back from a file: DeepscopeError naming what is malformed."""
        try:
            return cls.create(dict(values["filters"]), int(values["ndim"]), int(values["channels"]))
        except (TypeError, KeyError, ValueError, OverflowError) as exc:
            raise DeepscopeError(f"malformed feature spec ({type(exc).__name__}: {str(exc)[:120]})") from None

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

    A map is brought back one axis at a time: inverse FFT along the first axis, crop to the centre, then the next
    axis on the cropped data, the last axis by a real inverse FFT. The partial results of the leading axes are kept
    for the current scale, so maps sharing derivative orders there (Gaussian, gradients and Hessian of one scale
    share three in 2D, nine in 3D) do that work once, and later axes transform only the centre: in 3D about 2.5 times
    less transform work than a full inverse transform per map.

    Maps, Hessian and structure-tensor entries and the float64 eigenvalue scratch go to named buffers allocated once
    per block and reused for all filters and scales, so a 3D volume is not paged in anew for every map. (Transforms
    write fresh tensors: torch's ``out=`` path for FFTs was slower here than the allocation it saves.)
    """

    def __init__(self, block: torch.Tensor, halo: int) -> None:
        self.ndim = block.ndim - 1
        self.shape = tuple(block.shape[1:])
        self.channels = block.shape[0]
        from scipy.fft import next_fast_len  # scipy is imported by the first block, not by every command

        self.fft_shape = tuple(next_fast_len(n, real=True) for n in self.shape)
        self.halo = halo
        self.device = block.device
        self.spectrum = torch.fft.rfftn(block, s=self.fft_shape, dim=tuple(range(1, block.ndim)))
        self.scale = 0.0
        self._partials: dict[tuple, tuple[float, torch.Tensor]] = {}  # slot -> (scale, values)
        self._buffers: dict[tuple, torch.Tensor] = {}

    def new_scale(self, sigma: float) -> None:
        """Drop the partial transforms of the previous scale (they are only reused within one)."""
        self._partials.clear()
        self.scale = sigma

    def buffer(
        self, name: Any, shape: str | tuple[int, ...] = "centre", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A named (C, *shape) scratch tensor (``centre``, ``padded`` or explicit spatial shape), allocated once."""
        if shape == "centre":
            shape = tuple(n - 2 * self.halo for n in self.shape)
        elif shape == "padded":
            shape = self.shape
        key = (name, shape, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty((self.channels, *shape), dtype=dtype, device=self.device)
        return self._buffers[key]

    def _kernel(self, sigma: float, order: int, axis: int) -> torch.Tensor:
        k = _spectrum(sigma, order, self.fft_shape[axis], axis == self.ndim - 1, self.device)
        return k.reshape((-1,) + (1,) * (self.ndim - 1 - axis))

    def _partial(
        self, source: torch.Tensor, key: str | None, sigma: float, prefix: tuple[int, ...], crop: bool
    ) -> torch.Tensor:
        """``source`` with the kernels of orders ``prefix`` applied and inverse-transformed along the first
        ``len(prefix)`` axes, which are cut to the centre (``crop``) or the block; cached under ``key``."""
        if not prefix:
            return source
        slot = (key, prefix, crop, sigma == self.scale)  # a scale's own partials, and DoG's second scale
        cached = self._partials.get(slot) if key is not None else None
        if cached is not None and cached[0] == sigma:
            return cached[1]
        axis = len(prefix) - 1
        parent = self._partial(source, key, sigma, prefix[:-1], crop)
        full = torch.fft.ifft(parent * self._kernel(sigma, prefix[-1], axis), dim=axis + 1)
        start = self.halo if crop else 0
        values = full.narrow(axis + 1, start, self.shape[axis] - 2 * start)
        if key is not None:
            self._partials[slot] = (sigma, values)
        return values

    def filtered(
        self, terms: Sequence[tuple[float, Sequence[int], float]], source: torch.Tensor | None = None, crop: bool = True
    ) -> torch.Tensor:
        """The (C, *centre) map (``crop``; else (C, *padded), exact inside the halo minus the kernel radius) of the
        sum of ``weight * kernel(sigma, orders)`` applied to the block, or to another spectrum ``source``.
        It lives in a buffer: use it before the next call."""
        key = "block" if source is None else None
        source = self.spectrum if source is None else source
        last = self.ndim - 1
        total: torch.Tensor | None = None
        for sigma, orders, weight in terms:
            part = self._partial(source, key, sigma, tuple(orders[:-1]), crop)
            name = "total" if total is None else "term"
            term = torch.mul(
                part, self._kernel(sigma, orders[-1], last), out=self.buffer(name, tuple(part.shape[1:]), part.dtype)
            )
            if weight != 1:
                term.mul_(weight)
            total = term if total is None else total.add_(term)
        assert total is not None
        real = torch.fft.irfft(total, n=self.fft_shape[-1], dim=-1)
        start = self.halo if crop else 0
        return real.narrow(-1, start, self.shape[-1] - 2 * start)

    def smoothed(self, values: torch.Tensor, sigma: float) -> torch.Tensor:
        """Gaussian smoothing of another (C, *padded) map on this block's grid, cropped to the centre."""
        spectrum = torch.fft.rfftn(values, s=self.fft_shape, dim=tuple(range(1, values.ndim)))
        return self.filtered([(sigma, (0,) * self.ndim, 1.0)], spectrum)


def _unit(ndim: int, axis: int, order: int) -> tuple[int, ...]:
    return tuple(order if a == axis else 0 for a in range(ndim))


def _pairs(ndim: int) -> list[tuple[int, int]]:
    """Upper-triangle index pairs of a symmetric ndim x ndim matrix: diagonal first, then off-diagonal."""
    return [(a, a) for a in range(ndim)] + list(itertools.combinations(range(ndim), 2))


def _eigenvalues_2d(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scratch: torch.Tensor, out: Sequence[torch.Tensor] | torch.Tensor
) -> None:
    """Eigenvalues of [[a, b], [b, c]], largest first, into ``out``; ``a`` and ``scratch`` are overwritten."""
    torch.sub(a, c, out=scratch).mul_(0.5)
    torch.hypot(scratch, b, out=scratch)
    a.add_(c).mul_(0.5)
    torch.add(a, scratch, out=out[0])
    torch.sub(a, scratch, out=out[1])


def _eigenvalues_3d(
    e: dict[tuple[int, int], torch.Tensor], scratch: Sequence[torch.Tensor], out: Sequence[torch.Tensor] | torch.Tensor
) -> None:
    """Eigenvalues, largest first, of 3x3 symmetric matrices by the trigonometric method of O. K. Smith (1961), in
    place: ``e`` (the six upper-triangle entries) and the four ``scratch`` maps must be float64, as float32 loses the
    arccosine near repeated eigenvalues; both are overwritten."""
    q, p, t, d = scratch
    d0, d1, d2, b01, b02, b12 = e[0, 0], e[1, 1], e[2, 2], e[0, 1], e[0, 2], e[1, 2]
    torch.add(d0, d1, out=q).add_(d2).div_(3)
    d0.sub_(q), d1.sub_(q), d2.sub_(q)
    torch.mul(d0, d0, out=p).addcmul_(d1, d1).addcmul_(d2, d2)
    torch.mul(b01, b01, out=t).addcmul_(b02, b02).addcmul_(b12, b12)
    p.add_(t, alpha=2).div_(6).sqrt_()
    torch.mul(d1, d2, out=t).addcmul_(b12, b12, value=-1)
    torch.mul(d0, t, out=d)
    torch.mul(b01, d2, out=t).addcmul_(b12, b02, value=-1)
    d.addcmul_(b01, t, value=-1)
    torch.mul(b01, b12, out=t).addcmul_(d1, b02, value=-1)
    d.addcmul_(b02, t)  # det(A - qI)
    torch.pow(p, 3, out=t).mul_(2).clamp_(min=1e-300)
    d.div_(t).clamp_(-1.0, 1.0).acos_().div_(3)  # phi; a multiple of the identity has p = det = 0, so phi = pi / 6
    torch.cos(d, out=t).mul_(p).mul_(2).add_(q)  # largest
    d.add_(2 * math.pi / 3).cos_().mul_(p).mul_(2).add_(q)  # smallest
    q.mul_(3).sub_(t).sub_(d)  # middle: the trace minus the other two
    out[0].copy_(t), out[1].copy_(q), out[2].copy_(d)


def symmetric_eigenvalues(entries: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Eigenvalues, largest first, of 2x2 or 3x3 symmetric matrices given by their upper-triangle entries.

    Closed forms, as a batched LAPACK call is several times slower on millions of tiny matrices and needs them copied
    into (N, 3, 3) layout first.
    """
    ndim = max(a for a, _ in entries) + 1
    first = entries[0, 0]
    out = torch.empty((ndim, *first.shape), dtype=first.dtype, device=first.device)
    if ndim == 2:
        _eigenvalues_2d(first.clone(), entries[0, 1], entries[1, 1], torch.empty_like(first), out)
    else:
        wide = {k: v.to(torch.float64, copy=True) for k, v in entries.items()}
        _eigenvalues_3d(wide, [torch.empty_like(wide[0, 0]) for _ in range(4)], out)
    return out


def _eigenvalues_into(block: _Block, entries: dict[tuple[int, int], torch.Tensor], out: Sequence[torch.Tensor]) -> None:
    if block.ndim == 2:
        _eigenvalues_2d(entries[0, 0], entries[0, 1], entries[1, 1], block.buffer("eigen"), out)
        return
    wide = {pair: block.buffer(("f64", pair), dtype=torch.float64).copy_(values) for pair, values in entries.items()}
    _eigenvalues_3d(wide, [block.buffer(("f64 scratch", i), dtype=torch.float64) for i in range(4)], out)


def _filter(block: _Block, name: str, sigma: float, out: Sequence[torch.Tensor]) -> None:
    """Write the (C, *centre) maps of one filter at one scale into ``out`` (one tensor per map)."""
    nd = block.ndim
    if name == "gaussian":
        out[0].copy_(block.filtered([(sigma, (0,) * nd, 1.0)]))
    elif name == "log":
        out[0].copy_(block.filtered([(sigma, _unit(nd, a, 2), 1.0) for a in range(nd)]))
    elif name == "dog":
        out[0].copy_(block.filtered([(sigma, (0,) * nd, 1.0), (DOG_RATIO * sigma, (0,) * nd, -1.0)]))
    elif name == "ggm":
        out[0].zero_()
        for a in range(nd):
            derivative = block.filtered([(sigma, _unit(nd, a, 1), 1.0)])
            out[0].addcmul_(derivative, derivative)
        out[0].sqrt_()
    else:
        entries = {pair: block.buffer(f"entry{pair}") for pair in _pairs(nd)}
        if name == "hessian":
            for (a, b), target in entries.items():
                target.copy_(block.filtered([(sigma, tuple((a == i) + (b == i) for i in range(nd)), 1.0)]))
        else:  # structure tensor: products of gradients over the whole block (valid where the halo allows), smoothed
            gradients = [
                block.buffer(f"gradient{a}", "padded").copy_(
                    block.filtered([(sigma, _unit(nd, a, 1), 1.0)], crop=False)
                )
                for a in range(nd)
            ]
            product = block.buffer("gradient product", "padded")
            for (a, b), target in entries.items():
                target.copy_(
                    block.smoothed(torch.mul(gradients[a], gradients[b], out=product), STRUCTURE_OUTER * sigma)
                )
        _eigenvalues_into(block, entries, out)


def _check_image(image: Any, spec: FeatureSpec) -> tuple[int, ...]:
    spatial = tuple(image.shape[1:])
    if len(spatial) != spec.ndim or image.shape[0] != spec.channels:
        raise DeepscopeError(
            f"image of shape {tuple(image.shape)} does not fit the features of {spec.channels}-channel "
            f"{spec.ndim}D images (expected (C, *spatial))"
        )
    return spatial


def _fill(
    image: Any, spec: FeatureSpec, region: tuple[slice, ...], device: torch.device, out: Any, at: tuple[slice, ...]
) -> None:
    """Write the features of ``region`` of ``image`` into ``out[:, at]`` map by map. A numpy ``out`` is written in place
    by the CPU computation; other outputs (HDF5, zarr, or features computed on a GPU) get each map copied."""
    halo, per_channel = spec.halo, spec.count // spec.channels
    starts = tuple(s.start - halo for s in region)
    window = tuple(s.stop - s.start + 2 * halo for s in region)
    block = _Block(torch.from_numpy(read_block(image, starts, window)).to(device), halo)
    direct = isinstance(out, np.ndarray) and device.type == "cpu"
    slots, j = [], 0  # (scale, filter, index of its first map): computed scale by scale, stored filter by filter
    for name, scales in spec.filters.items():
        for sigma in scales:
            slots.append((sigma, name, j))
            j += spec.per_scale(name)
    current = None
    for sigma, name, j in sorted(slots, key=lambda slot: slot[0]):
        if sigma != current:
            block.new_scale(sigma)
            current = sigma
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


def _tiles_and_device(
    image: Any, spec: FeatureSpec, tile: Sequence[int] | None, device: Any
) -> tuple[Iterator, torch.device]:
    spatial = _check_image(image, spec)
    tile = auto_tile(spatial, spec) if tile is None else tuple(min(int(t), n) for t, n in zip(tile, spatial))
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
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


def compute_features(
    image: Any, spec: FeatureSpec, tile: Sequence[int] | None = None, device: Any = None, out: Any = None
) -> Any:
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


BYTES_PER_VOXEL = 128  # spectrum, partial transforms and float64 eigenvalue scratch per padded voxel and channel


def memory_budget() -> int:
    """Bytes one block may use: a quarter of the physical memory, at most 4 GiB (larger blocks were no faster)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 2**34
    return min(2**32, physical // 4)


def auto_tile(spatial: Sequence[int], spec: FeatureSpec, budget: int | None = None) -> tuple[int, ...]:
    """The whole image when its padded block fits ``budget`` bytes (default ``memory_budget()``) while its features
    are computed, else tiles halved along their longest axis until one fits (or is no wider than twice the halo)."""
    budget = memory_budget() if budget is None else budget
    tile = list(spatial)
    while (
        math.prod(t + 2 * spec.halo for t in tile) * spec.channels * BYTES_PER_VOXEL > budget
        and max(tile) > 2 * spec.halo
    ):
        axis = int(np.argmax(tile))
        tile[axis] = -(-tile[axis] // 2)
    return tuple(tile)
