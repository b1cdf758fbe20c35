"""An exponential moving average of the weights, validated, saved and predicted with in place of the last step's.

From-scratch detectors (YOLO's recipes) and short schedules gain from it: the average of the weights over the last
few hundred steps sits nearer a minimum than any single noisy step, at the cost of one copy of the model. torch's
``AveragedModel`` keeps the copy; the decay here ramps up from 0 as ``decay * (1 - exp(-updates / ramp))`` so that
the average does not drag the random initial weights along. The ramp is 2000 steps as in YOLO's training, but at most
a tenth of the schedule, so that a short CPU schedule of a few hundred steps still averages over its later part
rather than mostly copying the last step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from deepscope.errors import DeepscopeError

RAMP_STEPS = 2000
RAMP_SHARE = 0.1  # the ramp takes at most this share of the schedule's steps


Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]


def ramped_average(decay: float, ramp: float) -> Callable[[Tensors, Tensors, torch.Tensor | int], None]:
    """The in-place update of ``AveragedModel`` (its ``multi_avg_fn``): floating-point tensors move towards the
    model's by ``1 - decay(updates)``; integer buffers (batch norm's step count) are copied."""

    def average(averaged: Tensors, current: Tensors, updates: torch.Tensor | int) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        weight = 1.0 - decay * (1.0 - math.exp(-float(updates) / ramp))
        torch._foreach_lerp_(averaged, current, weight)

    return average


class WeightAverage:
    """The moving average of ``model``'s weights and buffers (batch-norm statistics included)."""

    def __init__(self, model: nn.Module, decay: float, total_steps: int) -> None:
        if not 0 < decay < 1:
            raise DeepscopeError(f"--ema must be a decay between 0 and 1 (e.g. 0.999), got {decay:g}")
        ramp = max(1.0, min(RAMP_STEPS, RAMP_SHARE * total_steps))
        self.averaged = AveragedModel(model, multi_avg_fn=ramped_average(decay, ramp), use_buffers=True)
        self.averaged.eval().requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged network, to validate, save and predict with."""
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        """Fold the weights after one optimizer step into the average."""
        self.averaged.update_parameters(model)

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def restore(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Back to a saved average (``weights``, as ``module.state_dict()`` gave them) after ``updates`` steps."""
        self.module.load_state_dict(weights)
        self.averaged.n_averaged.fill_(updates)
