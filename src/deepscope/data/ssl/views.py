"""Two independently augmented views of each image for self-supervised learning, batched on the training device.

SimCLR and VICReg compare two random views of every image at every step, so the augmentation runs once per image
per view and must be fast. torchvision's RandomResizedCrop, ColorJitter and GaussianBlur draw one parameter set per
call: applied to a batch tensor, every image would share one crop, one colour change and one blur, and calling them
per image in a CPU loop is the bottleneck at small image sizes. Here each image draws its own parameters (for the
global batch of ``n`` images from a seeded generator, sliced by ``rows`` as in :mod:`deepscope.data.classification.augment`, so
data-parallel ranks draw what one process would) and everything is applied with batched tensor operations: one
``grid_sample`` for crop, flip and rotation, per-image blends and 3x3 colour matrices, one grouped convolution for
the blur. Crops that shrink the image by more than 2x are sampled without anti-aliasing (as torchvision's tensor
path before antialias=True); at the usual sizes (CIFAR 32 -> 32, microscopy patches) crops are rarely that large.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deepscope.config import from_dict
from deepscope.data.classification.augment import draw_randint, draw_uniform
from deepscope.data.segmentation.augment import gaussian_kernels
from deepscope.errors import DeepscopeError

_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_YIQ_INV = torch.linalg.inv(_YIQ)
_RANGES = {"crop_scale": "0 < low <= high <= 1", "crop_ratio": "0 < low <= high", "blur_sigma": "0 <= low <= high",
           "intensity": "0 <= low <= high"}  # fmt: skip


@dataclass
class ViewConfig:
    """How one view is made; build it with :func:`view_config` (a preset plus overrides)."""

    crop_scale: list[float]  # area fraction range of the random resized crop
    crop_ratio: list[float]  # aspect ratio (width / height) range, drawn log-uniformly
    flip: bool  # random horizontal flip
    rot90: bool  # random multiple of 90 degrees (with flip: all 8 dihedral orientations)
    jitter: list[float]  # brightness, contrast, saturation, hue strengths (torchvision ColorJitter meaning)
    jitter_p: float
    grayscale_p: float  # only for 3-channel images
    blur_p: float
    blur_sigma: list[float]  # sigma range in pixels; kernel about 10% of the view side, as SimCLR
    solarize_p: float  # x -> 1 - x where x >= 0.5 ([0, 1] natural images)
    intensity: list[float]  # multiplicative scale range per image and channel (microscopy); [1, 1] disables
    intensity_p: float
    noise: float  # standard deviation of additive Gaussian noise (microscopy); 0 disables
    noise_p: float
    clamp: bool  # clamp results to [0, 1] (natural images); False for percentile-normalised data

    def __post_init__(self) -> None:
        for name, length in (*((key, 2) for key in _RANGES), ("jitter", 4)):
            value = getattr(self, name)
            numbers = isinstance(value, (list, tuple)) and all(type(v) in (int, float) for v in value)
            if not numbers or len(value) != length:
                raise DeepscopeError(f"ssl views: {name} must be a list of {length} numbers, got {value!r}")
            setattr(self, name, [float(v) for v in value])
        for name, rule in _RANGES.items():
            low, high = getattr(self, name)
            if not (0 <= low <= high <= (1 if name == "crop_scale" else math.inf)) or (
                low == 0 and name.startswith("crop")
            ):
                raise DeepscopeError(f"ssl views: {name} {getattr(self, name)} is not a valid range (need {rule})")
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise DeepscopeError(f"ssl views: jitter {self.jitter} must be >= 0 with hue (the last) <= 0.5")
        for name in (f.name for f in fields(self) if f.name.endswith("_p")):
            if not 0 <= getattr(self, name) <= 1:
                raise DeepscopeError(f"ssl views: {name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.noise < 0:
            raise DeepscopeError(f"ssl views: noise must be >= 0, got {self.noise}")


PRESETS: dict[str, dict[str, Any]] = {
    "natural": {"crop_scale": [0.08, 1.0], "crop_ratio": [3 / 4, 4 / 3], "flip": True, "rot90": False,
                "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": 0.0, "blur_sigma": [0.1, 2.0],
                "solarize_p": 0.0, "intensity": [1.0, 1.0], "intensity_p": 0.0, "noise": 0.0, "noise_p": 0.0, "clamp": True},
    "microscopy": {"crop_scale": [0.25, 1.0], "crop_ratio": [3 / 4, 4 / 3], "flip": True, "rot90": True,
                   "jitter": [0.0, 0.0, 0.0, 0.0], "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.2, "blur_sigma": [0.1, 1.5],
                   "solarize_p": 0.0, "intensity": [0.6, 1.4], "intensity_p": 0.8, "noise": 0.03, "noise_p": 0.2, "clamp": False},
}  # fmt: skip


def view_config(preset: str, overrides: dict[str, Any] | None = None) -> ViewConfig:
    """The ``preset`` settings updated by ``overrides``; unknown names and bad values raise a one-line error."""
    if preset not in PRESETS:
        raise DeepscopeError(f"ssl views: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if overrides is not None and not isinstance(overrides, dict):
        raise DeepscopeError(f"ssl views: overrides must be a mapping of settings, got {type(overrides).__name__}")
    return from_dict(ViewConfig, {**copy.deepcopy(PRESETS[preset]), **(overrides or {})}, f"ssl views ({preset})")


def _rand(
    shape: tuple[int, ...], generator: torch.Generator, rows: slice, device: torch.device, normal: bool = False
) -> Tensor:
    """Uniform (or normal) numbers for the global batch (first axis), the ``rows`` slice moved to ``device``."""
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=generator.device)[rows].to(device)


def _between(low: float, high: float, generator: torch.Generator, n: int, rows: slice, device: torch.device) -> Tensor:
    return low + (high - low) * draw_uniform(generator, n, rows, device)


def _crop_theta(
    cfg: ViewConfig, size: tuple[int, int], generator: torch.Generator, n: int, rows: slice, device: torch.device
) -> Tensor:
    """``affine_grid`` matrices (b, 2, 3) mapping the view onto a random box of the input, flipped and turned.

    Area and aspect ratio are drawn as torchvision's RandomResizedCrop does (ratio log-uniform); a box that does not
    fit is shrunk to fit, side by side, instead of redrawn (a rejection loop cannot run batched), and its centre is
    uniform over the positions where it fits, so sampling never leaves the image. The flip and quarter turns act on
    the view's normalised coordinates: the crop is turned, then resized to the view size.
    """
    h, w = size
    low, high = cfg.crop_scale
    area = h * w * _between(low, high, generator, n, rows, device)
    low, high = map(math.log, cfg.crop_ratio)
    ratio = torch.exp(_between(low, high, generator, n, rows, device))
    bw, bh = (area * ratio).sqrt().clamp(max=w), (area / ratio).sqrt().clamp(max=h)
    cx = bw / 2 + draw_uniform(generator, n, rows, device) * (w - bw)
    cy = bh / 2 + draw_uniform(generator, n, rows, device) * (h - bh)
    flip = torch.where(draw_uniform(generator, n, rows, device) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones_like(area)
    turns = draw_randint(4, generator, n, rows, device) if cfg.rot90 else torch.zeros_like(area, dtype=torch.long)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[turns]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[turns]
    sx, sy = bw / w, bh / h
    row_x = torch.stack([sx * cos * flip, -sx * sin, 2 * cx / w - 1], -1)
    row_y = torch.stack([sy * sin * flip, sy * cos, 2 * cy / h - 1], -1)
    return torch.stack([row_x, row_y], 1)


def _grey(x: Tensor) -> Tensor:
    """Luma (ITU-R 601, as torchvision) of 3-channel images, else the channel mean; shape (b, 1, H, W)."""
    if x.shape[1] == 3:
        return torch.einsum("c,bchw->bhw", _YIQ[0].to(x), x)[:, None]
    return x.mean(1, keepdim=True)


def _color_jitter(x: Tensor, cfg: ViewConfig, generator: torch.Generator, n: int, rows: slice) -> Tensor:
    """Brightness, contrast, then (3 channels only) saturation and hue, each image with probability ``jitter_p``.

    Factors are uniform in [max(0, 1 - s), 1 + s] as in torchvision, blended with black, the mean grey level and
    the greyscale image. The hue shift rotates the chroma plane (I, Q) of YIQ space by 2 * pi * h with h uniform in
    [-s, s]: one 3x3 matrix per image. It approximates torchvision's HSV hue shift (not linear, so not one matrix):
    colours turn the same way about as far, but luma stays put where HSV keeps the largest channel.
    """
    clip = (lambda t: t.clamp(0, 1)) if cfg.clamp else (lambda t: t)
    on = draw_uniform(generator, n, rows, x.device) < cfg.jitter_p

    def factor(s: float) -> Tensor:
        return torch.where(on, _between(max(0.0, 1 - s), 1 + s, generator, n, rows, x.device), 1.0)[:, None, None, None]

    brightness, contrast, saturation, hue = cfg.jitter
    x = clip(x * factor(brightness))
    f = factor(contrast)
    x = clip(f * x + (1 - f) * _grey(x).mean((2, 3), keepdim=True))
    if x.shape[1] != 3:
        return x
    f = factor(saturation)
    x = clip(f * x + (1 - f) * _grey(x))
    angle = torch.where(on, 2 * math.pi * _between(-hue, hue, generator, n, rows, x.device), 0.0).double()
    rotation = torch.zeros(len(angle), 3, 3, dtype=torch.float64, device=x.device)  # R - I, exactly 0 for angle 0
    rotation[:, 1, 1] = rotation[:, 2, 2] = torch.cos(angle) - 1
    rotation[:, 1, 2], rotation[:, 2, 1] = torch.sin(angle), -torch.sin(angle)  # by -angle: torchvision's direction
    matrix = torch.eye(3, dtype=torch.float64, device=x.device) + _YIQ_INV.to(x.device) @ rotation @ _YIQ.to(x.device)
    return clip(torch.einsum("bij,bjhw->bihw", matrix.to(x.dtype), x))


def _blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with one sigma per image (0: unchanged), reflect padding.

    torchvision's gaussian_blur takes one sigma per call; folding images and channels into the channels of one
    grouped convolution gives each image its own kernel in a single call per axis."""
    b, c, h, w = x.shape
    kernels = gaussian_kernels(sigma, radius).to(x.dtype).repeat_interleave(c, 0)
    out = F.pad(x.reshape(1, b * c, h, w), [radius] * 4, mode="reflect")
    out = F.conv2d(out, kernels.view(b * c, 1, -1, 1), groups=b * c)
    return F.conv2d(out, kernels.view(b * c, 1, 1, -1), groups=b * c).view(b, c, h, w)


class TwoViews:
    """Makes augmented views of (b, C, H, W) float batches at ``out_size`` (not standardised: the caller does that).

    Order: crop + flip + rotation (one resampling), colour jitter, greyscale, intensity scale, blur, solarize, noise,
    then the clamp to [0, 1] if configured. Colour operations other than brightness and contrast need 3 channels.
    """

    def __init__(self, config: ViewConfig, out_size: tuple[int, int]) -> None:
        self.config = config
        self.out_size = (int(out_size[0]), int(out_size[1]))
        side = min(self.out_size)
        self.blur_radius = max(3, int(0.1 * side) | 1) // 2 if side > 1 else 0  # odd kernel ~10% of the side (SimCLR)

    def view(self, x: Tensor, generator: torch.Generator, n: int, rows: slice) -> Tensor:
        """One augmented view (b, C, oh, ow) float32 on ``x``'s device, parameters drawn for the global batch of n."""
        if x.ndim != 4 or not x.is_floating_point():
            raise DeepscopeError(
                f"ssl views: expected a float (b, C, H, W) batch, got {x.dtype} of shape {tuple(x.shape)}"
            )
        cfg, dev = self.config, x.device
        x = x.float()
        theta = _crop_theta(cfg, (x.shape[2], x.shape[3]), generator, n, rows, dev)
        grid = F.affine_grid(theta, [x.shape[0], 1, *self.out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if cfg.jitter_p > 0 and max(cfg.jitter) > 0:
            x = _color_jitter(x, cfg, generator, n, rows)
        if cfg.grayscale_p > 0 and x.shape[1] == 3:
            x = torch.where((draw_uniform(generator, n, rows, dev) < cfg.grayscale_p)[:, None, None, None], _grey(x), x)
        if cfg.intensity_p > 0 and cfg.intensity != [1.0, 1.0]:
            low, high = cfg.intensity
            scale = low + (high - low) * _rand((n, x.shape[1]), generator, rows, dev)
            x = (
                x
                * torch.where((draw_uniform(generator, n, rows, dev) < cfg.intensity_p)[:, None], scale, 1.0)[
                    :, :, None, None
                ]
            )
        if cfg.blur_p > 0 and self.blur_radius > 0:
            low, high = cfg.blur_sigma
            sigma = _between(low, high, generator, n, rows, dev)
            x = _blur(x, torch.where(draw_uniform(generator, n, rows, dev) < cfg.blur_p, sigma, 0.0), self.blur_radius)
        if cfg.solarize_p > 0:
            on = (draw_uniform(generator, n, rows, dev) < cfg.solarize_p)[:, None, None, None]
            x = torch.where(on & (x >= 0.5), 1 - x, x)
        if cfg.noise_p > 0 and cfg.noise > 0:
            on = (draw_uniform(generator, n, rows, dev) < cfg.noise_p)[:, None, None, None]
            x = x + cfg.noise * on * _rand((n, *x.shape[1:]), generator, rows, dev, normal=True)
        return x.clamp(0, 1) if cfg.clamp else x

    def __call__(self, x: Tensor, generator: torch.Generator, n: int, rows: slice) -> tuple[Tensor, Tensor]:
        """Two independent views of every image (the second draws after the first from the same generator)."""
        return self.view(x, generator, n, rows), self.view(x, generator, n, rows)
