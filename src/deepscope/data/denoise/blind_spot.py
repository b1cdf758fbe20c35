"""Noise2Void masking (Krull et al. 2019): hide a few pixels of each noisy patch behind values from their neighbourhood.

The network never sees a masked pixel's own noisy value, so predicting it can only use the surroundings; with noise
independent between pixels, the best such prediction is the clean value. Masked pixels are drawn stratified, one at
a random place in every box of about ``ratio ** (-1 / ndim)`` pixels per side (boxes do not overlap, so no pixel
is masked twice), so they are spread out as in the
original. ``uniform`` replaces each by a random neighbour within ``radius`` other than itself; ``median`` by the
median of its neighbourhood without the centre (N2V2, Hoeck et al. 2022), which removes the checkerboard artefacts.
All of it is batched index arithmetic on the device; no library offers blind-spot masking for plain torch tensors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from deepscope.errors import DeepscopeError

REPLACEMENTS = ("uniform", "median")


@dataclass
class BlindSpotConfig:
    ratio: float = 0.02  # fraction of pixels masked per patch and channel (N2V's default is 0.002)
    radius: int = 2  # neighbourhood half-width: a (2r+1)^d window around each masked pixel
    replace: str = "uniform"  # uniform (N2V) | median (N2V2)

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 0.5:
            raise DeepscopeError(f"blind-spot ratio must be in (0, 0.5], got {self.ratio}")
        if self.radius < 1:
            raise DeepscopeError(f"blind-spot radius must be at least 1, got {self.radius}")
        if self.replace not in REPLACEMENTS:
            raise DeepscopeError(f"unknown blind-spot replacement {self.replace!r}; choose {' or '.join(REPLACEMENTS)}")


def box_size(ratio: float, ndim: int) -> int:
    """Side of the boxes that each hold one masked pixel."""
    return max(1, round(ratio ** (-1 / ndim)))


def _reflect(index: Tensor, size: int) -> Tensor:
    """Positions mirrored back into [0, size) without repeating the edge (numpy's ``reflect``)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index < size, index, period - index)


def _flat(coords: list[Tensor], spatial: list[int]) -> Tensor:
    flat = torch.zeros_like(coords[0])
    for c, n in zip(coords, spatial):
        flat = flat * n + c
    return flat


def mask_pixels(x: Tensor, config: BlindSpotConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(masked input, mask) of a float batch (N, C, *spatial); mask is 1.0 at the replaced pixels, per channel."""
    if x.ndim not in (4, 5):
        raise DeepscopeError(f"blind-spot masking takes (N, C, H, W) or (N, C, D, H, W) batches, got {tuple(x.shape)}")
    n, c, spatial = x.shape[0], x.shape[1], list(x.shape[2:])
    ndim, device, r = len(spatial), x.device, config.radius
    box = box_size(config.ratio, ndim)
    grid = [torch.arange(0, s, box, device=device) for s in spatial]
    origins = torch.meshgrid(*grid, indexing="ij")
    shape = (n, c, *origins[0].shape)

    def draw(high: int) -> Tensor:
        return torch.randint(high, shape, generator=generator, device=generator.device).to(device)

    # one pixel per box; boxes cut by the image border draw within the part inside
    uniform = [torch.rand(shape, generator=generator, device=generator.device).to(device) for _ in spatial]
    coords = [o + (u * (s - o).clamp(max=box)).long() for o, u, s in zip(origins, uniform, spatial)]
    flat = _flat(coords, spatial).reshape(n, c, -1)
    values = x.reshape(n, c, -1)
    offsets = [o for o in itertools.product(range(-r, r + 1), repeat=ndim) if any(o)]
    if config.replace == "uniform":
        pick = torch.tensor(offsets, device=device)[draw(len(offsets))]  # (*shape, ndim)
        source = _flat([_reflect(p + pick[..., i], s) for i, (p, s) in enumerate(zip(coords, spatial))], spatial)
        replacement = values.gather(2, source.reshape(n, c, -1))
    else:
        around = [
            _flat([_reflect(p + o[i], s) for i, (p, s) in enumerate(zip(coords, spatial))], spatial) for o in offsets
        ]
        stacked = torch.stack([values.gather(2, a.reshape(n, c, -1)) for a in around], dim=-1)
        replacement = stacked.median(dim=-1).values
    mask = torch.zeros_like(values).scatter_(2, flat, 1.0)
    masked = values.scatter(2, flat, replacement)
    return masked.reshape(x.shape), mask.reshape(x.shape)
