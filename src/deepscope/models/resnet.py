"""ResNet-18 with a width parameter, keeping torchvision's parameter names.

torchvision's ``resnet18`` fixes the widths at 64-128-256-512; on a 2-core CPU a self-supervised run needs narrower networks
(width 16 or 32 is 16x or 4x cheaper), so the network is assembled here from torchvision's own ``BasicBlock``. The names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``) are torchvision's, so at width 64 a torchvision
state dict loads as it is, and an encoder trained by ``train ssl`` loads into ``train classify --model resnet18``.
"""

from __future__ import annotations

import torch
from torch import nn

SMALL_IMAGE = 64  # images up to this side get the CIFAR stem: 3x3 stride-1 convolution and no max-pool


class ResNet(nn.Module):
    """ResNet of BasicBlocks; ``num_classes`` 0 returns the pooled features (N, 8 * width) instead of logits."""

    def __init__(
        self, in_shape: tuple[int, int, int], num_classes: int, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2)
    ) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock  # imported here: torchvision costs seconds of CLI start-up

        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        small = min(in_shape[1:]) <= SMALL_IMAGE
        self.conv1 = (
            nn.Conv2d(in_shape[0], width, 3, stride=1, padding=1, bias=False)
            if small
            else nn.Conv2d(in_shape[0], width, 7, stride=2, padding=3, bias=False)
        )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, stride=2, padding=1)
        layers, c_in = [], width
        for i, count in enumerate(blocks):
            c_out, stride = width * 2**i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or c_in != c_out:
                downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            layer = [BasicBlock(c_in, c_out, stride, downsample)] + [BasicBlock(c_out, c_out) for _ in range(count - 1)]
            layers.append(nn.Sequential(*layer))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c_in
        self.fc = nn.Linear(c_in, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(in_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> ResNet:
    """ResNet-18; for images up to 64 px the stem is a 3x3 stride-1 convolution without max-pool (the CIFAR stem)."""
    return ResNet(in_shape, num_classes, width)
