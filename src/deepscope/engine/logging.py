"""What a run tells its user: a rich progress bar, a plain-text log, TensorBoard and a progress file.

``progress.json`` in the run folder lets another program (``deepscope serve``'s training jobs) follow a run without
parsing its log: ``{"state": "running"|"done"|"failed", "epoch": epochs completed, "epochs", "step": steps done in
the current epoch, "steps", "loss": the current epoch's mean training loss so far, "elapsed_s", "history": the
per-epoch records, "stopped": why a finished run stopped, "error": why a failed one did}``. It is replaced
atomically, at most once per ``PROGRESS_EVERY_S`` during an epoch and at every epoch's and the run's end.

Only the main process (rank 0) writes; the others get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from deepscope.atomic import atomic_write

console = Console(stderr=True)
PROGRESS_FILE = "progress.json"
PROGRESS_EVERY_S = 1.0  # the least time between two writes of the progress file within an epoch


def per_second(value: float) -> str:
    """A rate with the digits it needs: two significant ones below 10 (0.48, 3.5), whole numbers above (4,086)."""
    if not math.isfinite(value) or value <= 0:
        return "0"
    if value >= 9.95:
        return f"{value:,.0f}"
    return f"{value:.{max(0, 1 - math.floor(math.log10(value)))}f}"


def finite(value: Any) -> Any:
    """``value`` with NaN and infinite numbers (of a diverged loss) as None, so the file is strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def preview_images(images: torch.Tensor, count: int = 8) -> torch.Tensor:
    """The first ``count`` images of a (N, C, *spatial) batch as TensorBoard shows them: the middle plane of 3D
    volumes, three channels (or one) of the rest; values left as they are."""
    shown = images[:count].float()
    if shown.ndim == 5:
        shown = shown[:, :, shown.shape[2] // 2]
    return shown[:, :3] if shown.shape[1] >= 3 else shown[:, :1]


class RunLogger:
    """Progress bar, ``train.log`` and TensorBoard scalars/images for one run directory."""

    def __init__(self, run_dir: Path | None, enabled: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self._writer: Any = None  # TensorBoard's, opened at the first figure it is given
        self.progress: Progress | None = None
        self.task_id: TaskID | None = None
        self.started = time.time()
        self.written = -math.inf  # when the progress file was last written
        self.status: dict[str, Any] = {
            "state": "running",
            "epoch": 0,
            "epochs": 0,
            "step": 0,
            "steps": 0,
            "loss": None,
            "elapsed_s": 0.0,
            "history": [],
            "stopped": None,
        }
        if not self.enabled:
            return
        assert run_dir is not None  # enabled only with a run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / "train.log"
        self.progress_path = run_dir / PROGRESS_FILE
        self.tensorboard_dir = run_dir / "tensorboard"

    def writer(self) -> Any:
        """TensorBoard's writer, None when logging is off. Opened on first use: importing it costs a tenth of a second
        (it pulls in boto3), which a run should not pay before its data is read."""
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir))
        return self._writer

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
        self.status.update(epoch=epoch, epochs=epochs, step=0, steps=steps, loss=None)
        self.write_progress()

    def advance(self, completed: int) -> None:
        """``completed`` steps of the epoch are done; called at every step, it writes the file at most once a second."""
        self.status["step"] = completed
        self.write_progress()

    def update(self, completed: int, loss: float, images_per_s: float, metric: str) -> None:
        if self.progress is not None:
            assert self.task_id is not None  # start_epoch adds the task with the progress bar
            stats = f"loss {loss:.4f}  {metric}  {per_second(images_per_s)} img/s"
            self.progress.update(self.task_id, completed=completed, stats=stats)
        self.status["loss"] = loss
        self.advance(completed)

    def end_epoch(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def epoch_done(self, epochs_completed: int, history: list[dict[str, Any]]) -> None:
        """An epoch is trained, validated and checkpointed: its record joins the file's history at once."""
        self.status.update(epoch=epochs_completed, step=0, history=list(history))
        self.write_progress(force=True)

    def finish(self, stopped: str) -> None:
        """The run is over and its files are written."""
        self.status.update(state="done", stopped=stopped)
        self.write_progress(force=True)

    def fail(self, error: str) -> None:
        """The run stopped on an error; the progress file says so (a killed process leaves "running" behind). A run
        refused before it wrote anything (e.g. its folder holds another run) leaves that run's file alone."""
        if self.enabled and self.written == -math.inf and self.progress_path.exists():
            return
        self.status.update(state="failed", error=error)
        self.write_progress(force=True)

    def write_progress(self, force: bool = False) -> None:
        """Replace the progress file (rank 0 only), unless it was written less than a second ago and not ``force``."""
        now = time.time()
        if not self.enabled or (not force and now - self.written < PROGRESS_EVERY_S):
            return
        self.status["elapsed_s"] = round(now - self.started, 3)
        text = json.dumps(finite(self.status)).encode()
        atomic_write(self.progress_path, lambda handle: handle.write(text), "progress file")
        self.written = now

    def scalars(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        writer = self.writer()
        if writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"{prefix}{key}", value, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        writer = self.writer()
        if writer is not None and images.numel():
            writer.add_images(tag, images.detach().float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        self.end_epoch()
        if self._writer is not None:
            self._writer.close()
