"""Batched augmentation on the training device, plus the equivalent torchvision.transforms.v2 pipeline.

torchvision's v2 transforms draw one set of random parameters per call, so a whole
batch would get the same crop. The batched versions here draw parameters per image
(from a seeded generator, for the *global* batch so that data-parallel ranks agree)
and apply them with tensor indexing: no Python loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torchvision.transforms import v2


@dataclass
class AugmentConfig:
    """Training augmentation; all off gives the plain images."""

    crop_padding: int = 4  # random crop of the original size after reflect padding by this many pixels
    flip: bool = True  # random horizontal flip
    color_jitter: float = 0.0  # brightness/contrast/saturation strength, 0 disables
    cutout: int = 0  # side of a zeroed square at a random position, 0 disables


def draw_uniform(generator: torch.Generator, n: int, rows: slice, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device)[rows].to(device)


def draw_randint(high: int, generator: torch.Generator, n: int, rows: slice, device: torch.device) -> torch.Tensor:
    return torch.randint(high, (n,), generator=generator, device=generator.device)[rows].to(device)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator, n: int, rows: slice) -> torch.Tensor:
    """Per-image random translation by up to ``pad`` pixels with reflect padding.

    Two ``gather`` calls (rows, then columns) move each image by its own offset; on contiguous
    (not channels-last) tensors this is about 3x faster than one advanced-indexing call.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = draw_randint(2 * pad + 1, generator, n, rows, x.device)
    dx = draw_randint(2 * pad + 1, generator, n, rows, x.device)
    ys = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    xs = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    return padded.gather(2, ys).gather(3, xs)


def random_flip(x: torch.Tensor, generator: torch.Generator, n: int, rows: slice) -> torch.Tensor:
    flip = draw_uniform(generator, n, rows, x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator, n: int, rows: slice) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s] per image, on [0, 1] data."""

    def factor() -> torch.Tensor:
        return (1 + strength * (2 * draw_uniform(generator, n, rows, x.device) - 1))[:, None, None, None]

    x = (x * factor()).clamp(0, 1)
    grey = x.mean(1, keepdim=True) if x.shape[1] != 3 else (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])
    mean = grey.mean((2, 3), keepdim=True)
    x = ((x - mean) * factor() + mean).clamp(0, 1)
    if x.shape[1] == 3:
        grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
        x = ((x - grey) * factor() + grey).clamp(0, 1)
    return x


def cutout(x: torch.Tensor, size: int, generator: torch.Generator, n: int, rows: slice) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square centred at a random pixel of each image."""
    _b, _, h, w = x.shape
    cy = draw_randint(h, generator, n, rows, x.device)[:, None]
    cx = draw_randint(w, generator, n, rows, x.device)[:, None]
    ys = torch.arange(h, device=x.device)[None]
    xs = torch.arange(w, device=x.device)[None]
    inside_y = (ys >= cy - size // 2) & (ys < cy - size // 2 + size)
    inside_x = (xs >= cx - size // 2) & (xs < cx - size // 2 + size)
    mask = inside_y[:, :, None] & inside_x[:, None, :]
    return x.masked_fill(mask[:, None], 0.0)


class BatchAugment:
    """Applies an :class:`AugmentConfig` to batches: jitter before normalization, geometry after."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    def photometric(self, x01: torch.Tensor, generator: torch.Generator, n: int, rows: slice) -> torch.Tensor:
        if self.config.color_jitter > 0:
            x01 = color_jitter(x01, self.config.color_jitter, generator, n, rows)
        return x01

    def geometric(self, x: torch.Tensor, generator: torch.Generator, n: int, rows: slice) -> torch.Tensor:
        cfg = self.config
        if cfg.crop_padding > 0:
            x = random_crop(x, cfg.crop_padding, generator, n, rows)
        if cfg.flip:
            x = random_flip(x, generator, n, rows)
        if cfg.cutout > 0:
            x = cutout(x, cfg.cutout, generator, n, rows)
        return x


def torchvision_pipeline(
    config: AugmentConfig | None, mean: list[float], std: list[float], size: tuple[int, int]
) -> v2.Compose:
    """The same augmentation, per image, for the torch DataLoader path (CHW uint8/uint16 tensor in).

    torchvision is imported here, not with the module: importing it costs seconds of start-up on a slow CPU (it
    loads torch's compiler stack), which every command would pay for a path only the DataLoader uses."""
    from torchvision.transforms import v2

    steps: list[v2.Transform] = [v2.ToDtype(torch.float32, scale=True)]
    if config is not None and config.color_jitter > 0:
        s = config.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s if len(mean) == 3 else 0))
    steps.append(v2.Normalize(mean, std))
    if config is not None:
        if config.crop_padding > 0:
            steps.append(v2.RandomCrop(size, padding=config.crop_padding, padding_mode="reflect"))
        if config.flip:
            steps.append(v2.RandomHorizontalFlip())
        if config.cutout > 0:
            area = config.cutout**2 / (size[0] * size[1])
            steps.append(v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0.0))
    return v2.Compose(steps)
