"""Rebuilding trained models from checkpoints for evaluation and prediction."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepscope.engine.checkpoint import checkpoint_task, load_checkpoint, load_weights
from deepscope.errors import CheckpointError, DeepscopeError
from deepscope.export.runtime import exported_format, exported_metadata, load_exported
from deepscope.inference.fastest import FastestRuntime
from deepscope.models import build_model

ModelBuilder = Callable[[dict[str, Any], dict[str, Any]], nn.Module]


def build_classifier(config: dict[str, Any], info: dict[str, Any]) -> nn.Module:
    return build_model(
        config["model"], tuple(info["in_shape"]), len(info["class_names"]), **config.get("model_args", {})
    )


def load_trained_model(
    path: str | Path, task: str, device: torch.device, build: ModelBuilder = build_classifier
) -> tuple[nn.Module, dict[str, Any]]:
    """The model in a checkpoint, in eval mode on ``device``, with the checkpoint's contents.

    ``build(config, task_state)`` rebuilds the untrained network from the saved config and inference state. A network
    deepscope exported (ONNX, TorchScript) is loaded through its runtime instead, with the config and inference state
    stored in it.
    """
    if exported_format(path) is not None:
        return load_exported_model(path, task, device)
    state = load_checkpoint(path, task=task)
    config, info = state["config"], state.get("task_state", {})
    try:
        model = build(config, info)
    except (KeyError, TypeError, ValueError, DeepscopeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model from this checkpoint ({exc})") from None
    load_weights(model, state["model"], path)
    return model.to(device).eval(), state


def fastest(model: nn.Module, path: str | Path, spatial_multiple: tuple[int, ...] | None) -> nn.Module:
    """A checkpoint's network as :class:`~deepscope.inference.fastest.FastestRuntime` (it moves to onnxruntime in a
    long prediction when that is faster with equal outputs); an exported file's network as it is."""
    if exported_format(path) is not None:
        return model
    return FastestRuntime(model, spatial_multiple, str(path))


def load_exported_model(path: str | Path, task: str, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """An exported network of ``task`` and the settings stored in it, as :func:`load_trained_model` returns them."""
    model, metadata = load_exported(path, device)
    if metadata is None:
        raise CheckpointError(f"{path}: not exported by deepscope (no deepscope metadata), so its settings are unknown")
    if metadata["task"] != task:
        raise CheckpointError(f"{path}: a {metadata['task']} model, not a {task} model")
    return model.to(device).eval(), {"config": metadata["config"], "task_state": metadata["task_state"]}


def saved_task(path: str | Path) -> str:
    """The task of a checkpoint, or of a network deepscope exported (from its metadata, without loading it)."""
    if exported_format(path) is None:
        return checkpoint_task(path)
    metadata = exported_metadata(path)
    if metadata is None:
        raise CheckpointError(f"{path}: not exported by deepscope (no deepscope metadata), so its task is unknown")
    return str(metadata["task"])


@torch.no_grad()
def batched_logits(model: nn.Module, batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of every batch, concatenated on the CPU."""
    logits, targets = [], []
    for x, y in batches:
        logits.append(model(x).float().cpu())
        targets.append(y.cpu())
    return torch.cat(logits), torch.cat(targets)
