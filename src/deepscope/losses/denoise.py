"""Denoising losses: mean squared error, over every pixel (Noise2Noise, supervised) or only the masked ones (Noise2Void)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of (pred - target)^2 over the pixels where ``mask`` is 1 (all pixels without a mask), in float32.

    Noise2Void needs the mask: unmasked pixels see their own noisy value, so a loss there would teach the identity.
    """
    pred, target = pred.float(), target.float()
    if mask is None:
        return F.mse_loss(pred, target)
    mask = mask.float()
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)
