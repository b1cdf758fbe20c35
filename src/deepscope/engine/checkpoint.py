"""Checkpoints written atomically, loaded with checks, and the RNG state they carry.

A checkpoint is first written to a temporary file in the same folder and then renamed
over the old one, so a run killed (or a disk filling up) while saving leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepscope.errors import CheckpointError


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint existed"
        raise CheckpointError(f"{path}: could not write checkpoint ({exc.strerror or exc}); {kept}") from None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Serialise ``state`` with ``torch.save`` to ``path`` atomically."""
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Atomically copy a finished checkpoint (e.g. last.pt to best.pt) without re-serialising."""
    with open(src, "rb") as source:
        atomic_write(Path(dst), lambda handle: shutil.copyfileobj(source, handle, 1 << 20))


def _read(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` onto the CPU with one-line errors; ``mmap`` leaves the tensors on disk until used."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None


def load_checkpoint(path: str | Path, task: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Load a deepscope checkpoint onto the CPU, checking it belongs to ``task`` and ``model``."""
    path = Path(path)
    state = _read(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a deepscope checkpoint (no model weights and config)")
    if task is not None and state["config"].get("task") != task:
        raise CheckpointError(f"{path}: checkpoint is for task {state['config'].get('task')!r}, not {task!r}")
    if model is not None and state["config"].get("model") != model:
        raise CheckpointError(f"{path}: checkpoint holds model {state['config'].get('model')!r}, not {model!r}")
    return state


def checkpoint_task(path: str | Path) -> str:
    """The task a checkpoint was trained for, read without loading its tensors (they are memory-mapped)."""
    path = Path(path)
    state = _read(path, mmap=True)
    try:
        return str(state["config"]["task"])
    except (TypeError, KeyError):
        raise CheckpointError(f"{path}: not a deepscope checkpoint (no config naming its task)") from None


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a state dict, turning torch's long mismatch report into one line."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path}: weights do not fit the model ({first})") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
