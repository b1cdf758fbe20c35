"""Training runs killed with SIGKILL at chosen moments, each in a fresh process.

The processes are forked from a server that imported deepscope once (multiprocessing's forkserver with this module
preloaded), so a run costs its own work, not seconds of imports, and no process inherits the test process's threads.
A moment is where the run dies:

- ``("step", n)``: just before its n-th optimizer step;
- ``("checkpoint", n)``: half way through writing its n-th checkpoint file (the temporary file holds half the bytes);
- ``("time", s)``: ``s`` seconds after it started, wherever it is (reading data, validating, writing the report).
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

from conftest import written_name
from deepscope import atomic
from deepscope.cli import main
from deepscope.engine.trainer import Trainer
from deepscope.tasks import TASKS, get_task

# imported once, by the server, not by each run: deepscope, every task, and what runs import on first use
PRELOAD = sorted(
    {
        "deepscope.cli",
        "deepscope.engine.trainer",
        "torch.utils.tensorboard",
        "torchmetrics",
        "sklearn.model_selection",
        "matplotlib.pyplot",
        *(get_task(name)[1].__module__ for name in TASKS),
    }
)
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(PRELOAD)
CHECKPOINTS = "*.pt"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(moment: tuple[str, float] | None, counts: dict[str, float]) -> None:
    """Count the run's steps and checkpoint writes; die at ``moment``."""
    kind, at = moment or ("", 0)
    step = Trainer._step

    def counted_step(self: Trainer, run: Any, batch: Any) -> Any:
        counts["step"] += 1
        if kind == "step" and counts["step"] == at:
            _die()
        return step(self, run, batch)

    def opener(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 (the atomic writer closes it)
        if "w" not in mode or not fnmatch.fnmatch(written_name(path), CHECKPOINTS):
            return handle
        counts["checkpoint"] += 1
        if kind != "checkpoint" or counts["checkpoint"] != at:
            return handle
        write = handle.write

        def half_then_die(data: bytes) -> None:
            write(bytes(data)[: len(data) // 2])
            handle.flush()
            _die()

        handle.write = half_then_die
        return handle

    Trainer._step = counted_step
    atomic.open = opener  # the module's own name: only the atomic writer's files are touched


def _run(argv: list[str], moment: tuple[str, float] | None, log: str, counts_file: str | None) -> None:
    """The child: output into ``log``, armed, then ``deepscope`` itself; its exit status is main's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    counts: dict[str, float] = {"step": 0, "checkpoint": 0}
    _arm(moment, counts)
    start = time.monotonic()
    code = main(argv)
    counts["seconds"] = time.monotonic() - start
    if counts_file:
        Path(counts_file).write_text(json.dumps(counts))
    os._exit(code)


def run(
    argv: list[str],
    log: Path,
    moment: tuple[str, float] | None = None,
    counts_file: Path | None = None,
    timeout: float = 300,
) -> int:
    """Run ``deepscope argv`` in a fresh process, killed at ``moment``; its exit code (-9: killed)."""
    process = CONTEXT.Process(
        target=_run,
        args=(
            argv,
            moment if moment and moment[0] != "time" else None,
            str(log),
            str(counts_file) if counts_file else None,
        ),
    )
    start = time.monotonic()
    process.start()
    if moment and moment[0] == "time":
        process.join(moment[1])
        if process.exitcode is None:
            process.kill()
    process.join(max(1.0, timeout - (time.monotonic() - start)))
    if process.exitcode is None:
        process.kill()
        raise AssertionError(f"deepscope {' '.join(argv[:2])} did not finish within {timeout} s; see {log}")
    return int(process.exitcode)
