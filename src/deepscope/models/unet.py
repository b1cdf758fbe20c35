"""U-Net for 2D images and 3D volumes (Ronneberger et al. 2015; Cicek et al. 2016 for 3D).

One class covers both so segmentation code picks the dimensionality with a flag. Anisotropic pooling
(e.g. ``pool=(1, 2, 2)``) keeps thick-sliced microscopy stacks from losing their few z slices early. For denoising,
``residual`` adds the input to the output, and ``blurpool`` with ``top_skip=False`` is the N2V2 variant (Hoeck et al.
2022): max-blur pooling and no skip connection at full resolution, which keeps Noise2Void free of checkerboard artefacts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepscope.errors import DeepscopeError
from deepscope.models.layers import NORMS, norm_nd

UPSAMPLES = ("transpose", "bilinear")
ACTIVATIONS = (None, "sigmoid", "softmax")


def double_conv(c_in: int, c_out: int, dim: int, norm: str) -> nn.Sequential:
    """Two 3x3(x3) conv-norm-ReLU layers; the conv bias is dropped where a norm follows, as it would cancel."""
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers += [conv(c, c_out, 3, padding=1, bias=norm == "none"), norm_nd(norm, c_out, dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class MaxBlurPool(nn.Module):
    """Max pooling evaluated at every position, then a [1, 2, 1] binomial blur before subsampling (Zhang 2019,
    "Making convolutional networks shift-invariant again"); torch has no such layer. Pool factors must be 1 or 2."""

    kernel: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, pool: tuple[int, ...]) -> None:
        super().__init__()
        if any(p not in (1, 2) for p in pool):
            raise ValueError(f"blurpool supports pooling factors 1 and 2, got {pool}")
        self.pool, self.dim = pool, len(pool)
        kernel = torch.ones(())
        for p in pool:
            k = torch.tensor([1.0, 2.0, 1.0]) / 4 if p == 2 else torch.ones(1)
            kernel = kernel.unsqueeze(-1) * k
        self.register_buffer("kernel", kernel[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right = [q for p in reversed(self.pool) for q in (0, p - 1)]
        x = F.pad(x, right, mode="replicate")
        x = (F.max_pool2d if self.dim == 2 else F.max_pool3d)(x, self.pool, stride=1)
        n, c, *spatial = x.shape
        pad = [q for p in reversed(self.pool) for q in ((1, 1) if p == 2 else (0, 0))]
        x = F.pad(x.reshape(n * c, 1, *spatial), pad, mode="replicate")
        conv = F.conv2d if self.dim == 2 else F.conv3d
        x = conv(x, self.kernel.to(x.dtype), stride=self.pool)
        return x.reshape(n, c, *x.shape[2:])


class UNet(nn.Module):
    """Encoder-decoder with skip connections by concatenation; output has the input's spatial shape.

    ``depth`` pooling steps double the features at each level (features, 2f, 4f, ...). ``pool`` is the
    pooling factor per axis, used at every level, so each spatial size must be divisible by ``divisor``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dim: int = 2,
        depth: int = 4,
        features: int = 32,
        norm: str = "batch",
        upsample: str = "transpose",
        pool: tuple[int, ...] | None = None,
        final_activation: str | None = None,
        residual: bool = False,
        blurpool: bool = False,
        top_skip: bool = True,
    ) -> None:
        super().__init__()
        pool = (2,) * dim if pool is None else tuple(pool)
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if min(in_channels, out_channels, features) < 1:
            raise ValueError("in_channels, out_channels and features must be positive")
        if norm not in NORMS:
            raise ValueError(f"unknown normalization {norm!r}; choose {', '.join(NORMS)}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"unknown upsampling {upsample!r}; choose {' or '.join(UPSAMPLES)}")
        if final_activation not in ACTIVATIONS:
            raise ValueError(f"unknown final activation {final_activation!r}; choose None, sigmoid or softmax")
        if len(pool) != dim or min(pool) < 1:
            raise ValueError(f"pool must give {dim} positive factors (one per spatial axis), got {pool}")
        if residual and in_channels != out_channels:
            raise ValueError(
                f"residual needs as many output as input channels, got {in_channels} in and {out_channels} out"
            )
        self.in_channels, self.dim, self.depth, self.pool = in_channels, dim, depth, pool
        self.residual, self.top_skip = residual, top_skip
        widths = [features * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList(
            double_conv(c_in, c, dim, norm) for c_in, c in zip([in_channels] + widths, widths[:-1])
        )
        self.downsample = (
            MaxBlurPool(pool) if blurpool else (nn.MaxPool2d if dim == 2 else nn.MaxPool3d)(pool, stride=pool)
        )
        self.bottleneck = double_conv(widths[-2], widths[-1], dim, norm)
        self.upsamplers = nn.ModuleList(self._up(c * 2, c, upsample) for c in reversed(widths[:-1]))
        skip_factor = [2] * (depth - 1) + [2 if top_skip else 1]
        self.decoder = nn.ModuleList(
            double_conv(c * k, c, dim, norm) for c, k in zip(reversed(widths[:-1]), skip_factor)
        )
        self.head = (nn.Conv2d if dim == 2 else nn.Conv3d)(features, out_channels, 1)
        self.activation = {None: nn.Identity(), "sigmoid": nn.Sigmoid(), "softmax": nn.Softmax(dim=1)}[final_activation]

    def _up(self, c_in: int, c_out: int, mode: str) -> nn.Module:
        """Undo one pooling step and halve the channels, by a learned or a fixed interpolation."""
        if mode == "transpose":
            # self.pool holds self.dim factors, as each layer expects
            transpose: Callable[..., nn.Module] = nn.ConvTranspose2d if self.dim == 2 else nn.ConvTranspose3d
            return transpose(c_in, c_out, self.pool, stride=self.pool)
        interp = nn.Upsample(
            scale_factor=self.pool, mode="bilinear" if self.dim == 2 else "trilinear", align_corners=False
        )
        return nn.Sequential(interp, (nn.Conv2d if self.dim == 2 else nn.Conv3d)(c_in, c_out, 1))

    @property
    def divisor(self) -> tuple[int, ...]:
        """What each spatial size must be divisible by, so that skips and upsampled maps line up exactly."""
        return tuple(p**self.depth for p in self.pool)

    def check_input(self, x: torch.Tensor) -> None:
        """Explain a wrong input in one line instead of a shape mismatch deep inside the decoder."""
        shape = tuple(x.shape)
        if x.ndim != self.dim + 2:
            axes = "(N, C, H, W)" if self.dim == 2 else "(N, C, D, H, W)"
            raise DeepscopeError(f"expected a {self.dim + 2}D {axes} input for a {self.dim}D U-Net, got shape {shape}")
        if shape[1] != self.in_channels:
            raise DeepscopeError(f"expected {self.in_channels} input channel(s) for this U-Net, got shape {shape}")
        if any(size % d for size, d in zip(shape[2:], self.divisor)):
            raise DeepscopeError(
                f"input spatial shape {shape[2:]} must be divisible by {self.divisor} for a U-Net of depth {self.depth}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        inputs, skips = x, []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.downsample(x)
        x = self.bottleneck(x)
        for level, (up, block, skip) in enumerate(zip(self.upsamplers, self.decoder, reversed(skips))):
            top = level == self.depth - 1
            x = block(up(x) if top and not self.top_skip else torch.cat([skip, up(x)], dim=1))
        x = self.head(x)
        return self.activation(x + inputs if self.residual else x)
