"""Segmentation losses for (N, C, H, W) and (N, C, D, H, W) logits, each with an optional mask of pixels to leave out.

Every loss casts the logits to float32 first, so sums over many pixels stay accurate under autocast,
and a user mistake (target or mask of the wrong shape, a float class map) raises :class:`DeepscopeError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deepscope.errors import DeepscopeError
from deepscope.losses.flows import flows_loss
from deepscope.losses.star import stardist_loss

LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def dice_loss(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, eps: float = 1e-6, activation: str = "sigmoid"
) -> Tensor:
    """Soft Dice loss ``1 - 2·Σpt / (Σp² + Σt²)`` per channel over batch and space, averaged over channels.

    Written by hand because torch has none. The squared denominator follows torch-em. ``eps`` is added to both
    numerator and denominator so a channel with nothing in prediction, target or mask scores 0 rather than 0/0.
    ``activation`` is "sigmoid" (multi-label, target shaped like the logits) or "softmax" (target an integer
    class map (N, *spatial), or shaped like the logits). Masked pixels count in neither numerator nor denominator.
    """
    logits = logits.float()
    if activation == "sigmoid":
        _check_same_shape(target, logits)
        probs, target = torch.sigmoid(logits), target.float()
    elif activation == "softmax":
        probs = torch.softmax(logits, dim=1)
        target = target.float() if target.shape == logits.shape else _one_hot(target, logits)
    else:
        raise DeepscopeError(f"unknown dice activation {activation!r}; choose sigmoid or softmax")
    if mask is not None:
        keep = _mask(mask, logits.shape)
        probs, target = probs * keep, target * keep
    dims = [0, *range(2, logits.ndim)]
    intersection = (probs * target).sum(dims)
    denominator = (probs * probs).sum(dims) + (target * target).sum(dims)
    return 1 - ((2 * intersection + eps) / (denominator + eps)).mean()


def bce_loss(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    pos_weight: float | Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy with logits, averaged over the unmasked elements; a fully masked batch gives 0, not NaN.

    ``pos_weight`` is one value or one per channel; it is lined up with dim 1 (torch would broadcast a
    per-channel vector against the last, spatial dim).
    """
    logits = logits.float()
    _check_same_shape(target, logits)
    weight = (
        None
        if pos_weight is None
        else _per_channel(pos_weight, logits, "pos_weight").view(-1, *[1] * (logits.ndim - 2))
    )
    losses = F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=weight, reduction="none")
    if mask is None:
        return losses.mean()
    keep = _mask(mask, logits.shape)
    return (losses * keep).sum() / keep.expand(logits.shape).sum().clamp(min=1)


def dice_bce_loss(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, dice_weight: float = 1.0, bce_weight: float = 1.0
) -> Tensor:
    """Sigmoid Dice plus BCE: Dice copes with a small foreground, BCE gives steady per-pixel gradients early on."""
    return dice_weight * dice_loss(logits, target, mask) + bce_weight * bce_loss(logits, target, mask)


def cross_entropy_loss(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -1,
    weight: Sequence[float] | Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Multi-class cross-entropy over an integer class map, skipping pixels labelled ``ignore_index`` or masked out.

    Wraps F.cross_entropy but divides by the (class-weighted) count of kept pixels itself, so a batch with
    every pixel ignored gives 0 instead of NaN. ``mask`` must broadcast to (N, 1, *spatial).
    """
    logits = logits.float()
    _check_class_map(target, logits, ignore_index)
    target = target.long()
    if mask is not None:
        pixels = (logits.shape[0], 1, *logits.shape[2:])
        target = target.masked_fill(_mask(mask, pixels).expand(pixels)[:, 0] == 0, ignore_index)
    class_weight = None if weight is None else _per_channel(weight, logits, "weight")
    total = F.cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index, reduction="sum")
    kept = target != ignore_index
    count = kept.float() if class_weight is None else class_weight[torch.where(kept, target, 0)] * kept
    return total / count.sum().clamp(min=torch.finfo(torch.float32).tiny)


_LOSSES: dict[str, Callable[..., Tensor]] = {
    "dice": dice_loss,
    "bce": bce_loss,
    "dice_bce": dice_bce_loss,
    "ce": cross_entropy_loss,
    "stardist": stardist_loss,
    "flows": flows_loss,
}


def build_loss(name: str, **kwargs: Any) -> LossFn:
    """Loss ``name`` with ``kwargs`` bound, called as ``loss(logits, target, mask)``; bad names or options fail here."""
    if name not in _LOSSES:
        raise DeepscopeError(f"unknown loss {name!r}; choose one of {', '.join(sorted(_LOSSES))}")
    fn = _LOSSES[name]
    allowed = set(inspect.signature(fn).parameters) - {"logits", "target", "mask"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise DeepscopeError(
            f"loss {name!r} has no argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}"
        )

    def loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return fn(logits, target, mask=mask, **kwargs)

    return loss


def _shape_error(target: Tensor, logits: Tensor) -> DeepscopeError:
    return DeepscopeError(f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}")


def _check_same_shape(target: Tensor, logits: Tensor) -> None:
    if target.shape != logits.shape:
        raise _shape_error(target, logits)


def _check_class_map(target: Tensor, logits: Tensor, ignore_index: int | None = None) -> None:
    """Check dtype, shape (N, *spatial) and label range here: on a GPU a bad label is an opaque device-side assert."""
    if target.is_floating_point() or target.is_complex():
        raise DeepscopeError(f"class map must be integers, got {target.dtype}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise _shape_error(target, logits)
    classes = logits.shape[1]
    bad = (target < 0) | (target >= classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bad.any():
        label = int(target[bad][0])
        raise DeepscopeError(
            f"class map has label {label} but logits have {classes} channels (labels 0..{classes - 1})"
        )


def _one_hot(target: Tensor, logits: Tensor) -> Tensor:
    _check_class_map(target, logits)
    return F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).float()


def _mask(mask: Tensor, shape: Sequence[int]) -> Tensor:
    """The mask as float 0/1, after checking it broadcasts to ``shape`` without enlarging it."""
    try:
        fits = torch.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise DeepscopeError(f"mask shape {tuple(mask.shape)} does not broadcast to {tuple(shape)}")
    return mask.float()


def _per_channel(values: float | Sequence[float] | Tensor, logits: Tensor, name: str) -> Tensor:
    """One value or one per channel, as a float32 vector of length C on the logits' device."""
    tensor = torch.as_tensor(values, dtype=torch.float32, device=logits.device).flatten()
    classes = logits.shape[1]
    if tensor.numel() not in (1, classes):
        raise DeepscopeError(f"{name} has {tensor.numel()} values but logits have {classes} channels")
    return tensor.expand(classes)
