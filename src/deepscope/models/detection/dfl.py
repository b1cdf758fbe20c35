"""Box sides as distributions (Li et al., Generalized Focal Loss, NeurIPS 2020; YOLOv8's ``reg_max``).

FCOS regresses each side's distance from a location to its object with one ReLU number. Here each side is a
softmax over ``bins`` distances 0, 1, ..., bins - 1 (in strides of the level); the distance is its expectation, and
the distribution focal loss pulls probability onto the two bins around the true distance. Where an edge is
ambiguous (an occluded foot, a blurred shoulder) the distribution stays wide instead of averaging into a biased
number, and training sharpens it around the right edge: GFL and YOLOv8 owe a large part of their accuracy at strict
IoU (COCO mAP@0.75) to it. torchvision has no such head or loss, hence this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.fcos import FCOSRegressionHead

DFL_WEIGHT = 0.25  # of the loss's mean over the four sides, beside the IoU loss (GFL's 0.25; YOLOv8: 1.5 / 7.5)


def expected_distances(logits: Tensor) -> Tensor:
    """Distances (..., 4) in strides: each side's expectation over its bins, from logits (..., 4, bins)."""
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return logits.float().softmax(-1) @ bins


def distribution_focal_loss(logits: Tensor, distances: Tensor) -> Tensor:
    """Summed over locations, averaged over sides: cross-entropy towards the two bins around each true distance,
    weighted by nearness (a distance of 3.3 strides is 0.7 of bin 3 and 0.3 of bin 4). ``logits`` (P, 4, bins),
    ``distances`` (P, 4) in strides, clamped into the bins' range."""
    bins = logits.shape[-1]
    target = distances.float().clamp(0, bins - 1 - 1e-3)
    below = target.floor().long()
    upper_weight = target - below
    log_p = F.log_softmax(logits.float(), dim=-1)
    at_below = log_p.gather(-1, below[..., None]).squeeze(-1)
    at_above = log_p.gather(-1, (below + 1)[..., None]).squeeze(-1)
    return -(at_below * (1 - upper_weight) + at_above * upper_weight).mean(-1).sum()


class DistributionRegressionHead(FCOSRegressionHead):
    """FCOS's regression tower whose box layer predicts ``bins`` logits per side; ``forward`` gives the expected
    distances (as FCOS's ReLU distances, so decoding, post-processing and export are unchanged), the centre-ness
    logits and the side logits the loss needs."""

    def __init__(self, in_channels: int, num_convs: int, norm: Callable[[int], nn.Module], bins: int) -> None:
        if bins < 2:
            raise ValueError(f"dfl_bins must be at least 2 (or 0 for FCOS's direct distances), got {bins}")
        super().__init__(in_channels, 1, num_convs, norm_layer=norm)
        self.bins = bins
        self.bbox_reg = nn.Conv2d(in_channels, 4 * bins, kernel_size=3, stride=1, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)  # as torchvision initialises the layer it replaces
        nn.init.zeros_(self.bbox_reg.bias)  # type: ignore[arg-type]

    def forward(self, x: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        sides, quality = [], []
        for features in x:
            feature = self.conv(features)
            n, _, h, w = feature.shape
            sides.append(
                self.bbox_reg(feature).view(n, 4, self.bins, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4, self.bins)
            )
            quality.append(self.bbox_ctrness(feature).permute(0, 2, 3, 1).reshape(n, -1, 1))
        logits = torch.cat(sides, dim=1)
        return expected_distances(logits), torch.cat(quality, dim=1), logits
