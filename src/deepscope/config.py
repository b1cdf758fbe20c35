"""Typed run configuration, loadable from and saved to YAML.

Each task extends :class:`TrainConfig` with its own fields; nested dataclasses
(optimizer, augmentation) keep related settings together. ``from_dict`` rejects
unknown keys so that a typo in a YAML file is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from deepscope.errors import DeepscopeError

T = TypeVar("T")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "onecycle"  # onecycle | cosine | plateau | none
    warmup_fraction: float = 0.2  # share of steps spent warming up (onecycle/cosine)
    plateau_patience: int = 2
    plateau_factor: float = 0.2
    grad_clip: float | None = None  # max gradient norm; None disables clipping
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    """Settings shared by every task's training run."""

    task: str = ""
    data: str = ""
    model: str = ""
    out: str = ""  # run folder; empty: runs/<task>-<model>-<date-time>
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    optim: OptimConfig = field(default_factory=OptimConfig)
    model_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (by the hardware: see engine/precision.py) | off | bf16 | fp16
    max_minutes: float | None = None
    early_stopping: int | None = None  # epochs without improvement before stopping
    monitor: str = "accuracy"
    monitor_mode: str = "max"  # max | min
    channels_last: bool = True
    num_workers: int = 0
    tensorboard_images: int = 16
    init_from: str | None = None  # start the model (or its encoder/backbone) from the weights of this local file
    freeze_encoder: bool = False  # with init_from: train only what the file did not provide (a linear probe on a classifier)


def _resolve_type(tp: Any) -> Any:
    """Strip ``X | None`` to ``X`` for coercion."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from a nested dict, checking keys and simple types."""
    if not isinstance(values, dict):
        raise DeepscopeError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise DeepscopeError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        tp = _resolve_type(hints[key])
        if dataclasses.is_dataclass(tp):
            kwargs[key] = value if dataclasses.is_dataclass(value) else from_dict(tp, value or {}, f"{source}: {key}")
        elif value is None or tp is Any or typing.get_origin(tp) is not None:
            kwargs[key] = value
        else:
            try:
                kwargs[key] = tp(value) if not isinstance(value, tp) else value
            except (TypeError, ValueError):
                raise DeepscopeError(f"{source}: setting {key}={value!r} is not a valid {tp.__name__}") from None
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise DeepscopeError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DeepscopeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise DeepscopeError(f"{path}: expected a mapping of settings at the top level")
    return values


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
