"""Cellpose loss for (N, 1 + ndim, *spatial) logits against ``deepscope.data.segmentation.flows.batch_flow_target`` targets.

Scale convention: the network's flow channels predict ``FLOW_SCALE`` x the unit flow vectors of the target, as
Cellpose trains them (its targets are multiplied by 5, so an MSE of order 1 weighs about as much as the BCE).
Everything that reads flow predictions (``deepscope.postprocess.flows.flow_instances``) divides by ``FLOW_SCALE``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from deepscope.errors import DeepscopeError

FLOW_SCALE = 5.0  # predicted flows = FLOW_SCALE x unit flows


def flows_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None, flow_weight: float = 1.0) -> Tensor:
    """BCE with logits on channel 0 (cell probability) + ``flow_weight`` x MSE between the raw flow channels 1..ndim
    and ``FLOW_SCALE`` x the unit flows of ``target``.

    ``target`` is (N, 1 + ndim, *spatial) as from ``batch_flow_target``; ``mask`` (N, 1, *spatial), 0 = skip,
    leaves pixels out of both terms. Each term is a mean over the kept pixels (the flow term also over the ndim
    channels, as Cellpose's ``MSELoss``); background pixels are kept in the flow term, where the target is 0, so
    the network learns to predict no flow there. A fully masked batch gives 0, not NaN.
    """
    logits = logits.float()
    if target.shape != logits.shape or logits.ndim not in (4, 5) or logits.shape[1] != logits.ndim - 1:
        raise DeepscopeError(
            f"flows loss wants logits and target of one shape (N, 1 + ndim, *spatial), got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    pixels = (logits.shape[0], 1, *logits.shape[2:])
    if mask is None:
        keep = logits.new_ones(pixels)
    elif tuple(mask.shape) != pixels:
        raise DeepscopeError(f"flows loss mask shape {tuple(mask.shape)} must be {pixels}")
    else:
        keep = mask.float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits[:, :1], target[:, :1], reduction="none")
    mse = (logits[:, 1:] - FLOW_SCALE * target[:, 1:]) ** 2
    kept = keep.sum()
    bce_term = (bce * keep).sum() / kept.clamp(min=1)
    mse_term = (mse * keep).sum() / (kept * (logits.shape[1] - 1)).clamp(min=1)
    return bce_term + flow_weight * mse_term
