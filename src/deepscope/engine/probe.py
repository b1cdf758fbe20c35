"""Timing probes: what one training step and one inference pass cost on this machine, in the run's precision.

A task that plans its schedule from a time budget (the segment task fills ``--max-minutes`` with steps) measures
real steps here rather than guessing from parameter counts: the same network costs 10x more on a 2-core CPU than
on a GPU, and bf16 emulated on an AVX2 CPU costs 15x more than float32.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from deepscope.engine.distributed import all_reduce_max
from deepscope.engine.precision import Precision


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a clock read after it counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(
    model: nn.Module,
    batches: Iterable[Any],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    precision: Precision,
    device: torch.device,
) -> float:
    """Mean seconds of one training step over ``batches`` (at least two), the first left out as warm-up (first
    calls allocate memory and pick kernels). The mean, not the median: the run lasts the sum of its steps, and steps
    differ in cost by what their batch holds (a detection batch of mosaics reads four images per sample: on
    Penn-Fudan the median of 3 such steps said 0.240 s where the run's steps averaged 0.167 s, and a third of the
    budget went unused).

    A step is timed from the end of the previous one, so producing the batch (reading, augmenting, building the
    target) counts, as it does in training. The optimizer is AdamW at a tiny learning rate: its per-step cost is the
    trainer's, and the probe leaves the weights nearly as they were.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    start = time.perf_counter()
    for batch in batches:
        with precision.autocast(device):
            value = loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        _synchronize(device)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    if len(times) < 2:
        raise ValueError(f"timing steps needs at least 2 batches (one is warm-up), got {len(times)}")
    return float(np.mean(times[1:]))


def agreed_seconds_per_step(
    model: nn.Module,
    batches: Iterable[Any],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    precision: Precision,
    device: torch.device,
) -> float:
    """:func:`seconds_per_step`, the slowest process's, so that every process plans the same."""
    return all_reduce_max([seconds_per_step(model, batches, loss, precision, device)], device)[0]


@torch.no_grad()
def seconds_per_forward(model: nn.Module, inputs: torch.Tensor, precision: Precision, device: torch.device) -> float:
    """Seconds of one inference forward pass of ``inputs``, after one warm-up pass."""
    model.eval()
    with precision.autocast(device):
        model(inputs)
        _synchronize(device)
        start = time.perf_counter()
        model(inputs)
        _synchronize(device)
    return time.perf_counter() - start
