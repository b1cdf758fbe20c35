"""What a run tells its user: a rich progress bar, a plain-text log and TensorBoard.

Only the main process (rank 0) writes; the others get a logger that does nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class RunLogger:
    """Progress bar, ``train.log`` and TensorBoard scalars/images for one run directory."""

    def __init__(self, run_dir: Path | None, enabled: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.writer = None
        self.progress: Progress | None = None
        self.task_id = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / "train.log"
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        console.print(message, markup=False, highlight=False, soft_wrap=True)
        with open(self.log_path, "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.progress.start()
        self.task_id = self.progress.add_task("train", total=steps, stats="")

    def update(self, completed: int, loss: float, images_per_s: float, metric: str) -> None:
        if self.progress is not None:
            stats = f"loss {loss:.4f}  {metric}  {images_per_s:,.0f} img/s"
            self.progress.update(self.task_id, completed=completed, stats=stats)

    def end_epoch(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def scalars(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}{key}", value, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.writer is not None and images.numel():
            self.writer.add_images(tag, images.detach().float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        self.end_epoch()
        if self.writer is not None:
            self.writer.close()
