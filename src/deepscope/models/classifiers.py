"""Image classifiers in the course's order: logistic regression, MLP, small CNN, fast ResNet-9 (ResNet-18: models/resnet.py).

All take NCHW float input of shape (C, H, W) given at construction and return logits.
"""

from __future__ import annotations

import torch
from torch import nn

from deepscope.models.layers import norm_nd


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on raw pixels: one linear layer."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        self.linear = nn.Linear(c * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected network; hidden layers with normalization and dropout."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        hidden: tuple[int, ...] = (1024, 512),
        dropout: float = 0.2,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_shape[0] * in_shape[1] * in_shape[2]
        for size in hidden:
            layers += [nn.Linear(width, size)]
            layers += [nn.BatchNorm1d(size)] if batchnorm else []
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def conv_block(c_in: int, c_out: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), norm_nd(norm, c_out), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """VGG-style CNN: stages of two 3x3 convolutions and a 2x2 max-pool, then global pooling.

    Global average pooling makes it work for any input size (8x8 digits to 32x32 CIFAR and up).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 128),
        norm: str = "batch",
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_shape[0], min(in_shape[1:])
        for width in widths:
            layers += [conv_block(c, width, norm), conv_block(width, width, norm)]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FastBlock(nn.Module):
    """Conv, pool, then two conv-BN-GELU layers with a residual, as in the airbench/ResNet-9 recipe."""

    def __init__(self, c_in: int, c_out: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.post = nn.Sequential(nn.BatchNorm2d(c_out), nn.GELU())
        self.res = nn.Sequential(conv_block_gelu(c_out), conv_block_gelu(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.post(self.pool(self.conv(x)))
        return x + self.res(x)


def conv_block_gelu(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU())


class FastNet(nn.Module):
    """ResNet-9-style network for small images (Page's DAWNBench net, slimmed as in airbench).

    Widths are configurable so the same design serves a 2-core CPU (narrow) and a GPU (wide).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        widths: tuple[int, int, int] = (64, 128, 256),
        stem: int = 32,
        scale: float = 0.125,
    ) -> None:
        super().__init__()
        size = min(in_shape[1:])
        self.stem = nn.Sequential(
            nn.Conv2d(in_shape[0], stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.GELU()
        )
        blocks, c = [], stem
        for width in widths:
            blocks.append(FastBlock(c, width, pool=size >= 2))
            size //= 2
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, num_classes, bias=False))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x))) * self.scale
