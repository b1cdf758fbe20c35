"""Encoders and projection heads for self-supervised learning.

An encoder maps images to pooled features (N, D): the representation that probes, transfer and the embedding map use.
The projection head after it only serves the self-supervised loss and is dropped downstream (SimCLR's finding: features
before the head transfer better than after it). Parameter names are those of the supervised models (``encoder.conv1`` of a
ResNet, ``encoder.encoder.0`` / ``encoder.bottleneck`` of a U-Net), so ``--init-from`` finds them in a classifier or a U-Net.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from deepscope.errors import DeepscopeError
from deepscope.models.registry import construct_model
from deepscope.models.resnet import ResNet
from deepscope.models.unet import UNet

ENCODERS = ("resnet18", "unet")


class UNetEncoder(nn.Module):
    """The contracting half of :class:`UNet` (same modules, same names), globally pooled after the bottleneck."""

    def __init__(
        self,
        in_channels: int,
        dim: int = 2,
        depth: int = 4,
        features: int = 32,
        norm: str = "batch",
        pool: tuple[int, ...] | None = None,
        blurpool: bool = False,
        upsample: str = "transpose",
        residual: bool = False,
        top_skip: bool = True,
    ) -> None:
        """``upsample``, ``residual`` and ``top_skip`` shape only the decoder; they are accepted (and unused) so that the
        ``model_args`` of a ``train segment`` run serve the pretraining of its encoder unchanged."""
        super().__init__()
        unet = UNet(in_channels, 1, dim, depth, features, norm, pool=pool, blurpool=blurpool)
        self.encoder, self.downsample, self.bottleneck = unet.encoder, unet.downsample, unet.bottleneck
        self.divisor = unet.divisor
        self.out_features = features * 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder:
            x = self.downsample(block(x))
        return self.bottleneck(x).flatten(2).mean(2)


def build_encoder(name: str, in_shape: tuple[int, int, int], **model_args: Any) -> nn.Module:
    """Encoder ``name`` for images of ``in_shape`` (C, H, W): ``resnet18`` (``width``, default 64) or ``unet`` (the
    U-Net's ``depth``, ``features``, ``norm``, ... as given to ``train segment``). Its ``out_features`` is D."""
    if name == "resnet18":
        return construct_model(name, ResNet, (in_shape, 0), {"in_shape", "num_classes", "blocks"}, model_args)
    if name == "unet":
        encoder = cast(UNetEncoder, construct_model(name, UNetEncoder, (in_shape[0],), {"in_channels"}, model_args))
        if any(size % d for size, d in zip(in_shape[1:], encoder.divisor)):
            raise DeepscopeError(
                f"image size {tuple(in_shape[1:])} must be divisible by {encoder.divisor} for a U-Net encoder "
                "of this depth; choose another --set patch_size or model_args.depth"
            )
        return encoder
    raise DeepscopeError(f"unknown encoder {name!r} for ssl; choose {' or '.join(ENCODERS)}")


def mlp_head(in_features: int, widths: list[int]) -> nn.Sequential:
    """Linear layers with BatchNorm and ReLU between them, none after the last (SimCLR's and VICReg's heads)."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers.append(nn.Linear(in_features, width, bias=i == len(widths) - 1))
        if i < len(widths) - 1:
            layers += [nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_features = width
    return nn.Sequential(*layers)


class SSLModel(nn.Module):
    """Encoder plus projection head; ``forward`` returns (features, projections) of a batch."""

    def __init__(self, encoder: nn.Module, projector: list[int]) -> None:
        super().__init__()
        if not projector or min(projector) < 1:
            raise DeepscopeError(f"projector must list one or more positive layer widths, got {projector}")
        self.encoder = encoder
        # the encoders of build_encoder hold their feature count as an int
        self.projector = mlp_head(cast(int, encoder.out_features), projector)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return features, self.projector(features)
