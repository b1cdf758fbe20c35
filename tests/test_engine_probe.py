"""Timing probes count what a training step costs, batch production included, and leave the model usable."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from deepscope.engine.precision import resolve_precision
from deepscope.engine.probe import seconds_per_forward, seconds_per_step

CPU = torch.device("cpu")


def slow_batches(count: int, pause: float):
    """Batches that take ``pause`` seconds each to produce, as reading and augmenting would."""
    for _ in range(count):
        time.sleep(pause)
        yield torch.ones(4, 3), torch.zeros(4, 1)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_step_time_counts_batch_production_and_barely_moves_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    seconds = seconds_per_step(model, slow_batches(3, 0.05), mse, resolve_precision("off", CPU), CPU)
    assert seconds >= 0.05  # the sleep happens while producing each batch: a lower bound, not a speed claim
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) is False for a, b in zip(before, model.parameters()))  # a real optimizer step ran


def test_step_time_is_the_mean_of_steps_that_differ_in_cost():
    """Steps after the warm-up taking 0, 0 and 0.15 s to produce their batch (a batch of mosaics among plain ones):
    the run lasts their sum, so the estimate is their mean (0.05 s), where a median would say 0."""

    def uneven():
        for pause in (0.0, 0.0, 0.0, 0.15):
            time.sleep(pause)
            yield torch.ones(4, 3), torch.zeros(4, 1)

    assert seconds_per_step(nn.Linear(3, 1), uneven(), mse, resolve_precision("off", CPU), CPU) >= 0.05


def test_step_time_needs_a_warm_up_batch():
    with pytest.raises(ValueError, match="at least 2 batches"):
        seconds_per_step(nn.Linear(3, 1), slow_batches(1, 0.0), mse, resolve_precision("off", CPU), CPU)


def test_forward_time_leaves_model_in_eval_mode_without_gradients():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    seconds = seconds_per_forward(model, torch.ones(2, 3), resolve_precision("off", CPU), CPU)
    assert seconds > 0 and not model.training
    assert all(p.grad is None for p in model.parameters())
