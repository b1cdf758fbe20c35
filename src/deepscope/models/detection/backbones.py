"""Feature-pyramid backbones for detectors that train from scratch.

No pretrained weights exist here, so the trunks are torchvision's ResNets built with ``weights=None`` and, by default,
GroupNorm instead of BatchNorm: detection batches hold 2-16 images, too few for BatchNorm's batch statistics, and
GroupNorm backbones with an FPN are what make detection from scratch work (He et al. 2018, "Rethinking ImageNet
Pre-training"; detectron2 ``scratch_*_gn``). The trunk sits under ``body.`` with torchvision's ResNet key names, so a
torchvision ResNet state dict with the same norm loads into ``body.``; the pyramid sits under ``fpn.``.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

BACKBONES = ("resnet18", "resnet34", "resnet50", "tiny", "csp")
NORMS = ("group", "batch")
STRIDES = (4, 8, 16, 32)  # output strides of the trunk stages layer1..layer4
_RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
_TINY_WIDTHS = (16, 32, 64, 128, 256)  # stem, layer1..layer4
_CSP_DEPTHS = (1, 2, 2, 1)  # bottlenecks in the cross-stage blocks of layer1..layer4 (YOLOv8n's depths)
IMAGE_MEAN = 0.5  # inputs are [0, 1]; mean 0.5 and std 0.25 per channel map them to about [-2, 2]
IMAGE_STD = 0.25


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in Wu & He (2018), fewer where ``channels`` is small or not divisible, keeping at
    least two channels per group (a single-channel group would normalise away each channel's contrast)."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if g == 1 or (channels % g == 0 and channels // g >= 2))
    return nn.GroupNorm(groups, channels)


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    return group_norm if norm == "group" else nn.BatchNorm2d


class _NarrowTrunk(nn.Module):
    """A stem (3x3 stride-2 convolution of ``_TINY_WIDTHS[0]`` channels, norm, activation, optional max-pooling) and
    four ``stages``, under torchvision's ResNet names (``conv1``, ``layer1``..``layer4``), so the FPN is attached as
    to a ResNet; the trunks below differ in their activation, pooling and stages."""

    # registered by setattr in __init__
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self, norm: Callable[[int], nn.Module], act: nn.Module, pool: bool, stages: list[nn.Sequential]
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, _TINY_WIDTHS[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = norm(_TINY_WIDTHS[0])
        self.act = act
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if pool else nn.Identity()
        for index, stage in enumerate(stages, start=1):
            setattr(self, f"layer{index}", stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TinyResNet(_NarrowTrunk):
    """A ResNet trunk with one BasicBlock per stage and widths 16-32-64-128-256: about a tenth of resnet18's FLOPs,
    for small objects such as nuclei on a CPU. torchvision's ResNet cannot be made this narrow (its widths are fixed),
    so the stages are assembled here from its BasicBlock."""

    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        stages = []
        for index, (c_in, c_out) in enumerate(itertools.pairwise(_TINY_WIDTHS), start=1):
            stride = 1 if index == 1 else 2
            downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride, downsample, norm_layer=norm)))
        super().__init__(norm, nn.ReLU(inplace=True), True, stages)


def _conv(c_in: int, c_out: int, kernel: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), norm(c_out), nn.SiLU(inplace=True)
    )


class CrossStageBlock(nn.Module):
    """A cross-stage partial block as in YOLOv8 (C2f): a 1x1 convolution splits the channels in two halves, one half
    passes ``depth`` residual bottlenecks (two 3x3 convolutions each) and every intermediate map is concatenated and
    fused by a 1x1 convolution. Half the channels skip the bottlenecks, which makes the block cheap per output channel,
    and the concatenation gives the fused map every depth's features (many gradient paths, as in CSPNet)."""

    def __init__(self, channels: int, depth: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        half = channels // 2
        self.split = _conv(channels, 2 * half, 1, 1, norm)
        self.bottlenecks = nn.ModuleList(
            nn.Sequential(_conv(half, half, 3, 1, norm), _conv(half, half, 3, 1, norm)) for _ in range(depth)
        )
        self.fuse = _conv((2 + depth) * half, channels, 1, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = list(self.split(x).chunk(2, dim=1))
        for bottleneck in self.bottlenecks:
            maps.append(maps[-1] + bottleneck(maps[-1]))
        return self.fuse(torch.cat(maps, dim=1))


class CSPTrunk(_NarrowTrunk):
    """A YOLOv8n-sized trunk (Jocher et al., Ultralytics YOLOv8, 2023): 3x3 stride-2 convolutions, each stage a
    :class:`CrossStageBlock`, SiLU, widths 16-32-64-128-256 and depths 1-2-2-1: about twice tiny's 3x3
    convolutions at tiny's widths, and under FCOS's own head a training step of 0.192 s against resnet18's 0.334
    (320 px, 4 images, bf16, 2 AVX-512 cores), for detection from scratch in a CPU budget, where the passes over the
    data count most. Neither torchvision nor the other dependencies have such a trunk."""

    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        stages = [
            nn.Sequential(_conv(c_in, c_out, 3, 2, norm), CrossStageBlock(c_out, depth, norm))
            for (c_in, c_out), depth in zip(itertools.pairwise(_TINY_WIDTHS), _CSP_DEPTHS)
        ]
        super().__init__(norm, nn.SiLU(inplace=True), False, stages)


def _trunk(name: str, norm: Callable[[int], nn.Module]) -> tuple[nn.Module, list[int]]:
    """The trunk and the channel counts of its stages layer1..layer4."""
    if name in ("tiny", "csp"):
        return (TinyResNet if name == "tiny" else CSPTrunk)(norm), list(_TINY_WIDTHS[1:])
    # zero-initialised last norm of each residual block: every block starts as the identity, which steadies training from scratch
    trunk = _RESNETS[name](weights=None, norm_layer=norm, zero_init_residual=True)
    expansion = 4 if name == "resnet50" else 1
    return trunk, [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]


class FPNBackbone(nn.Module):
    """``body`` (the trunk, returning the requested stages) followed by ``fpn``. torchvision's BackboneWithFPN would
    do, but it always adds a max-pooled level when no extra block is given; here extra levels come only on request."""

    def __init__(
        self, body: nn.Module, fpn: FeaturePyramidNetwork, out_channels: int, strides: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels
        self.strides = strides  # one per output map, in order (including p6/p7 when present)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_backbone(
    name: str,
    in_channels: int = 3,
    norm: str = "group",
    fpn_channels: int = 128,
    strides: tuple[int, ...] = (8, 16, 32),
    extra_p6p7: bool = False,
) -> FPNBackbone:
    """Trunk ``name`` with an FPN of ``fpn_channels`` maps at ``strides`` (keys "0", "1", ... finest first), plus
    "p6" and "p7" (2x and 4x the last stride) computed from the last map when ``extra_p6p7``, the levels RetinaNet and
    FCOS use for large objects."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    strides = tuple(strides)
    if not strides or list(strides) != sorted(set(strides)) or not set(strides) <= set(STRIDES):
        raise ValueError(f"strides must be increasing values from {STRIDES}, got {strides}")
    if in_channels < 1 or fpn_channels < 1:
        raise ValueError(f"in_channels and fpn_channels must be positive, got {in_channels} and {fpn_channels}")
    norm_fn = norm_factory(norm)
    trunk, stage_channels = _trunk(name, norm_fn)
    if in_channels != 3:
        stem = cast(nn.Conv2d, trunk.conv1)  # both trunks begin with a Conv2d named conv1
        # a Conv2d stores pairs, which torch annotates as tuple[int, ...]
        kernel_size, stride = cast(tuple[int, int], stem.kernel_size), cast(tuple[int, int], stem.stride)
        padding = cast("str | tuple[int, int]", stem.padding)
        trunk.conv1 = nn.Conv2d(in_channels, stem.out_channels, kernel_size, stride, padding, bias=False)
    stages = [STRIDES.index(s) for s in strides]
    body = IntermediateLayerGetter(trunk, {f"layer{i + 1}": str(k) for k, i in enumerate(stages)})
    fpn = FeaturePyramidNetwork(
        [stage_channels[i] for i in stages],
        fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels) if extra_p6p7 else None,
        norm_layer=group_norm if norm == "group" else None,
    )
    out_strides = strides + ((strides[-1] * 2, strides[-1] * 4) if extra_p6p7 else ())
    return FPNBackbone(body, fpn, fpn_channels, out_strides)


def transform_args(in_channels: int, min_size: int | Sequence[int], max_size: int) -> dict[str, Any]:
    """The arguments of torchvision's GeneralizedRCNNTransform (resize, normalise, pad to a multiple of 32), for the
    torchvision detectors' constructors and :func:`detection_transform` alike, so every detector sees the same
    pixels. Several ``min_size`` values are drawn at random per training image (multi-scale jitter); evaluation uses
    the last one. ``min_size`` 0 means native scale (see :class:`NativeScaleTransform`)."""
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    native = sizes == (0,)
    if not sizes or (not native and (min(sizes) < 1 or max_size < max(sizes))):
        raise ValueError(
            f"min_size must be positive and at most max_size ({max_size}) or 0 for native scale, got {min_size}"
        )
    channels = {"image_mean": [IMAGE_MEAN] * in_channels, "image_std": [IMAGE_STD] * in_channels}
    return {"min_size": sizes, "max_size": max_size, **channels}


class NativeScaleTransform(GeneralizedRCNNTransform):
    """Torchvision's transform without its resize: images are normalised and padded but keep their pixel scale.

    Microscopy objects have a physical size, so a model should see every image, and every tile of a large image, at
    the scale it was trained at; resizing each input to a fixed shorter side would shrink a 4096-pixel image (and its
    nuclei) eight times more than a 512-pixel tile of it, so tiled and whole predictions could never agree."""

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


def detection_transform(in_channels: int, min_size: int | Sequence[int], max_size: int) -> GeneralizedRCNNTransform:
    """The resize / normalise / pad step every detector here uses, for [0, 1] images of ``in_channels``."""
    args = transform_args(in_channels, min_size, max_size)
    return (NativeScaleTransform if args["min_size"] == (0,) else GeneralizedRCNNTransform)(**args)
