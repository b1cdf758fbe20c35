"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
from torch import nn

from deepscope.config import OptimConfig
from deepscope.errors import DeepscopeError


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and normalization parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise DeepscopeError(f"unknown optimizer {cfg.name!r}; choose sgd or adamw")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, mode: str = "max"
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, str]:
    """Return (scheduler, when) where ``when`` is 'step', 'epoch' (plateau, given the metric) or 'never'."""
    total_steps = max(1, total_steps)
    warmup = max(1, int(cfg.warmup_fraction * total_steps))
    if cfg.schedule in ("onecycle", "cosine"):
        shape = cfg.schedule

        def factor(step: int) -> float:
            """Linear warm-up from 10% to the peak, then linear (one-cycle) or cosine decay to zero."""
            step = min(step, total_steps)
            if step < warmup:
                return 0.1 + 0.9 * step / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 1.0 - progress if shape == "onecycle" else 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"
    if cfg.schedule == "plateau":
        return (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                # "min" or "max" (TrainConfig.monitor_mode); ReduceLROnPlateau refuses any other
                mode=cast(Literal["min", "max"], mode),
                factor=cfg.plateau_factor,
                patience=cfg.plateau_patience,
            ),
            "epoch",
        )
    if cfg.schedule == "none":
        return None, "never"
    raise DeepscopeError(f"unknown schedule {cfg.schedule!r}; choose onecycle, cosine, plateau or none")
