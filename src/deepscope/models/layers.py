"""Building blocks shared by the classifiers and the U-Net."""

from __future__ import annotations

from torch import nn

NORMS = ("batch", "group", "instance", "none")


def norm_nd(kind: str, channels: int, dim: int = 2) -> nn.Module:
    """Normalization for ``dim`` spatial axes, by name, so BatchNorm/GroupNorm/InstanceNorm comparisons are one flag.

    GroupNorm takes the largest divisor of ``channels`` up to 8 as its group count, so any width works.
    """
    if kind == "batch":
        return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(channels)
    if kind == "group":
        return nn.GroupNorm(max(g for g in range(1, 9) if channels % g == 0), channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}; choose {', '.join(NORMS)}")
