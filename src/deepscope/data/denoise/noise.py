"""Synthetic noise for denoising experiments: noisy images made from clean ones, in the images' own units.

Noise is added on the 0..255 scale for 8-bit data (as the BSD68 protocol does), on the stored scale in general, and
noisy values are not clipped or rounded unless ``clip`` is set, because both change the PSNR a method is scored with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepscope.errors import DeepscopeError

KINDS = ("none", "gaussian", "poisson", "mixed")


@dataclass
class NoiseConfig:
    """How noisy inputs are made from clean images; ``kind: none`` means the data on disk is already noisy."""

    kind: str = "none"  # none | gaussian | poisson | mixed (Poisson then Gaussian)
    sigma: float = 25.0  # Gaussian standard deviation in the images' units (e.g. 25 on the 0..255 scale)
    gain: float = 1.0  # Poisson: photons per unit of intensity; lower gain, more shot noise
    clip: bool = False  # clip noisy values to [0, data range] (off: the usual protocol keeps them as drawn)
    # training: draw new noise for every patch (True) or use one fixed noisy copy per image; None: planned (True but
    # for Noise2Void, which stands for what real noisy data gives)
    fresh: bool | None = None
    seed: int = 1234  # noise of image i in split s is drawn from (seed, split, i): the same in every run

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DeepscopeError(f"unknown noise kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.sigma < 0 or self.gain <= 0:
            raise DeepscopeError(f"noise sigma must be >= 0 and gain > 0, got sigma={self.sigma}, gain={self.gain}")

    @property
    def synthetic(self) -> bool:
        return self.kind != "none"


def add_noise(clean: Tensor, config: NoiseConfig, generator: torch.Generator, clip_to: float | None = None) -> Tensor:
    """``clean`` (any shape, float) plus noise drawn from ``generator``; ``clip_to`` is the upper clip bound when
    ``config.clip`` is set. Batched: one call noises a whole batch of patches on the device."""
    x = clean.float()
    if config.kind in ("poisson", "mixed"):
        if float(x.min()) < 0:
            raise DeepscopeError("Poisson noise needs non-negative clean intensities")
        x = torch.poisson(x * config.gain, generator=generator) / config.gain
    if config.kind in ("gaussian", "mixed") and config.sigma > 0:
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
        x = x + config.sigma * noise.to(x.device)
    if config.clip:
        if clip_to is None:
            raise DeepscopeError("noise.clip needs a data range (set data_range, or use integer images)")
        x = x.clamp(0, clip_to)
    return x


def noise_generator(config: NoiseConfig, split: str, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for the fixed noise of image ``index`` of ``split``, independent of how many images precede it."""
    stream = {"train": 0, "val": 1, "test": 2}.get(split, 3)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed * 1_000_003 + stream * 100_003 + index)
    return generator
