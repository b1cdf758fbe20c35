"""Checkpoints written atomically, loaded with checks, and the RNG state they carry.

A checkpoint is first written to a temporary file in the same folder and then renamed
over the old one, so a run killed (or a disk filling up) while saving leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
import types
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


SOURCE_PREFIXES = ("", "module.", "backbone.", "backbone.body.", "body.", "encoder.", "model.")
TARGET_PREFIXES = ("", "backbone.body.", "backbone.", "body.", "encoder.")


def _state_dict_of(value: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a deepscope checkpoint, a plain state dict, or a dict holding one under ``state_dict``/``model``."""
    if isinstance(value, dict):
        for key in ("model", "state_dict"):
            if isinstance(value.get(key), dict):
                value = value[key]
                break
    if isinstance(value, torch.nn.Module):
        value = value.state_dict()
    tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)} if isinstance(value, dict) else {}
    if not tensors:
        raise CheckpointError(f"{path}: holds no weights (expected a deepscope checkpoint or a state dict of tensors)")
    return tensors


def load_init_weights(model: torch.nn.Module, path: str | Path, freeze: bool = False) -> str:
    """Start ``model`` (or its backbone) from the weights of a local file; returns one line saying what was taken.

    The file's keys are mapped onto the model's by the pair of key prefixes (e.g. a torchvision ResNet's ``layer1.*``
    onto a detector's ``backbone.body.layer1.*``) that fits the most tensors. Tensors whose shapes differ, and batch-norm
    statistics meeting a model without them (a GroupNorm model), are errors listing the keys: a partly fitting file is
    never loaded silently wrong. Keys with no counterpart at all (a classifier's last layer) are left out and named.
    ``freeze`` keeps every tensor taken from the file fixed (see :func:`freeze_tensors`).
    """
    path = Path(path)
    source = _state_dict_of(_read(path), path)
    target = model.state_dict()
    best: tuple[int, str, str] = (0, "", "")
    for strip in SOURCE_PREFIXES:
        keys = [k[len(strip):] for k in source if k.startswith(strip)]
        for add in TARGET_PREFIXES:
            hits = sum(add + k in target for k in keys)
            best = max(best, (hits, strip, add))
    hits, strip, add = best
    if not hits:
        raise CheckpointError(f"{path}: no weight name fits the model (file keys like {next(iter(source))!r}, model keys like {next(iter(target))!r})")
    mapped = {add + k[len(strip):]: v for k, v in source.items() if k.startswith(strip)}
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items() if k in target and v.shape != target[k].shape]
    stats = [k for k in mapped if k not in target and k.rsplit(".", 1)[-1] in ("running_mean", "running_var") and k.rsplit(".", 1)[0] + ".weight" in target]
    if wrong_shape or stats:
        problems = [f"{len(wrong_shape)} of different shape ({', '.join(wrong_shape[:4])})"] if wrong_shape else []
        if stats:
            problems.append(f"batch-norm statistics for {len(stats)} layers the model normalises otherwise (e.g. {stats[0]}; "
                            "build the model with the same norm, e.g. model_args.norm=batch)")
        raise CheckpointError(f"{path}: weights do not fit the model: {'; '.join(problems)}")
    taken = {k: v for k, v in mapped.items() if k in target}
    left_out = [k for k in mapped if k not in target]
    model.load_state_dict(taken, strict=False)
    where = f"mapping {strip or '(top level)'}* onto {add or '(top level)'}*" if strip != add else "by name"
    left_out += [k for k in source if not k.startswith(strip)]  # e.g. a self-supervised run's projection head
    skipped = f"; left out {len(left_out)} with no counterpart ({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''})" if left_out else ""
    frozen = f"; {freeze_tensors(model, set(taken), path)} frozen" if freeze else ""
    return f"initialised {len(taken)} of {len(target)} tensors from {path} {where}{skipped}{frozen}"


def freeze_tensors(model: torch.nn.Module, names: set[str], path: Path) -> int:
    """Stop training the parameters in ``names``; returns how many. Batch-norm layers whose parameters are all frozen also
    keep their running statistics (they stay in eval mode whatever ``model.train()`` says), so a frozen encoder computes
    the same features in training as in evaluation, as a linear probe requires."""
    params = dict(model.named_parameters())
    for name in names & set(params):
        params[name].requires_grad_(False)
    if not any(p.requires_grad for p in params.values()):
        raise CheckpointError(f"{path}: it provides every weight of the model, so --freeze-encoder would leave nothing to train")
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and own and not any(p.requires_grad for p in own):
            module.train = types.MethodType(lambda self, mode=True: torch.nn.Module.train(self, False), module)
            module.eval()
    return sum(1 for name in names if name in params)
