"""Loss for star-convex polygon (StarDist) outputs: object probability plus distances to the edge along rays.

Logits and targets are (N, 1 + n_rays, *spatial) as ``deepscope.data.segmentation.star.batch_star_target`` builds them; the
logits are cast to float32 first so sums over many pixels stay accurate under autocast. Self-contained:
``deepscope.losses.segmentation`` registers this loss, so it cannot import from there.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from deepscope.errors import DeepscopeError


def stardist_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None, dist_weight: float = 0.2) -> Tensor:
    """BCE of channel 0 (a probability logit) against the object probability target, plus ``dist_weight`` times the
    mean absolute error of channels 1.. (raw distances in pixels, no activation), as the StarDist paper.

    The BCE is a mean over the kept pixels. The distance error is weighted by the probability target and divided by
    its sum, so background pixels carry no distance loss and an object's centre, whose shape the post-processing
    uses, weighs the most. ``mask`` (N, 1, *spatial), 0 = leave out, applies to both terms; a batch with nothing
    left gives 0, not NaN.
    """
    logits = logits.float()
    if logits.ndim < 3 or logits.shape[1] < 2 or target.shape != logits.shape:
        raise DeepscopeError(
            f"stardist loss needs logits and target (N, 1 + n_rays, *spatial) of one shape, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    pixels = (logits.shape[0], 1, *logits.shape[2:])
    if mask is not None and tuple(mask.shape) != pixels:
        raise DeepscopeError(f"stardist loss mask shape {tuple(mask.shape)} must be {pixels}")
    keep = logits.new_ones(pixels) if mask is None else mask.float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits[:, :1], target[:, :1], reduction="none")
    weight = target[:, :1] * keep
    error = (logits[:, 1:] - target[:, 1:]).abs().mean(1, keepdim=True)
    prob_term = (bce * keep).sum() / keep.sum().clamp(min=1)
    return prob_term + dist_weight * (error * weight).sum() / weight.sum().clamp(min=1e-6)
