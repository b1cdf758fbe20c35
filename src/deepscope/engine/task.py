"""The contract between the engine and a task.

A task wires data, model, loss and metrics; the engine owns the loop, devices, precision,
checkpoints, logging and distribution. Adding a task means implementing these methods,
never writing another training loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from deepscope.config import TrainConfig
from deepscope.engine.distributed import DistInfo
from deepscope.engine.plan import Plan


class Batches(Protocol):
    """What the engine needs of a loader: a length, iteration, and per-epoch reshuffling."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Any: ...

    def set_epoch(self, epoch: int) -> None: ...


class ItemShard:
    """Whole images for evaluation: this process's share (every ``world``-th image from ``rank``)."""

    def __init__(self, items: Sequence[Any], rank: int = 0, world: int = 1) -> None:
        self.items = list(items)[rank::world]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not change between epochs."""


class Task(ABC):
    """One kind of learning problem (classification, segmentation, ...)."""

    name: str = ""
    # DDP must look for parameters without gradient each step (e.g. a detector's head for objects a batch lacks)
    find_unused_parameters: bool = False
    # minutes planned for when the user gives no --max-minutes (the run is then not stopped by the clock)
    default_budget_minutes: float = 10.0
    # the task plans epochs and steps itself (from its own step timer) instead of the engine's planner
    plans_schedule: bool = False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        # lines for the run log from setup and model building (e.g. which weights were loaded)
        self.notes: list[str] = []
        # the settings left open, planned in setup() from the data (and by the engine from the budget), with reasons
        self.plan = Plan()

    @abstractmethod
    def setup(self, device: torch.device, dist: DistInfo) -> None:
        """Read and check the data, and plan (``self.plan``) the settings left open; called once before the model
        is built."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The network to train, on the CPU."""

    @abstractmethod
    def train_batches(self) -> Batches:
        """Training batches for this process (its shard under DDP)."""

    def schedule(self, total_steps: int) -> None:
        """Called once the schedule is known (planned or given, fresh or resumed; also for ``deepscope plan``), before
        the first step: the run's training steps in all, for batches that change over the run (detection's last steps
        without mosaic)."""

    @abstractmethod
    def val_batches(self) -> Batches | None:
        """Validation batches, or None when there is no validation data."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of one batch (inside the engine's autocast)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        """Metrics over all batches, synchronised across processes; holds ``config.monitor``."""

    @abstractmethod
    def inference_state(self) -> dict[str, Any]:
        """What inference needs besides the weights (class names, normalization, input shape)."""

    def display_images(self, batch: Any) -> torch.Tensor:
        """A few images of a training batch in [0, 1] (N, C, H, W) for TensorBoard; empty to skip."""
        return torch.empty(0)

    def finish(
        self, model: nn.Module, run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]
    ) -> dict[str, Any]:
        """Called on every rank after training with the best weights loaded; returns extra metrics (test)."""
        return {}

    def write_report(self, run_dir: Path, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        """Write ``report.html`` and its pictures (main process only)."""
