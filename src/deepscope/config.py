"""Typed run configuration, loadable from and saved to YAML.

Each task extends :class:`TrainConfig` with its own fields; nested dataclasses
(optimizer, augmentation) keep related settings together. ``from_dict`` rejects
unknown keys so that a typo in a YAML file is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import yaml

from deepscope.atomic import atomic_write
from deepscope.errors import DeepscopeError, plain, shown

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
AMP_MODES = ("auto", "off", "bf16", "fp16")  # TrainConfig.amp; what each means: deepscope.engine.precision
MAX_VALUES = 100_000  # values one settings document may hold with its YAML aliases expanded; real ones hold hundreds


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
class PackageConfig:
    """What a BioImage Model Zoo package of the run says about it, when ``deepscope export --format bioimageio`` is
    not told otherwise by its flags (``--name``, ``--author``, ``--license``, ``--description``)."""

    name: str | None = None
    authors: list[str] = field(default_factory=list)
    license: str | None = None  # an SPDX id, e.g. MIT or CC-BY-4.0
    description: str | None = None


@dataclass
class TrainConfig:
    """Settings shared by every task's training run."""

    task: str = ""
    data: str = ""
    model: str = ""
    out: str = ""  # run folder; empty: runs/<task>-<model>-<date-time>
    epochs: int | None = None  # None: planned from the time budget (engine/plan.py)
    steps_per_epoch: int | None = None  # None: one pass over the training set, or planned to fill --max-minutes
    batch_size: int = 128
    eval_batch_size: int = 512
    optim: OptimConfig = field(default_factory=OptimConfig)
    model_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (by the hardware: see engine/precision.py) | off | bf16 | fp16
    max_minutes: float | None = None
    # decay of a moving average of the weights (e.g. 0.999), which is validated, saved and predicted with; None: off
    ema: float | None = None
    early_stopping: int | None = None  # epochs without improvement before stopping
    monitor: str = "accuracy"
    monitor_mode: str = "max"  # max | min
    # which weights best.pt holds: best (the epoch the monitor scored best) | last (the last epoch: a schedule planned
    # to end at learning rate 0 means its end, which a noisy monitor may not see)
    keep: str = "best"
    channels_last: bool = True
    num_workers: int = 0
    tensorboard_images: int = 16
    init_from: str | None = None  # start the model (or its encoder/backbone) from the weights of this local file
    # with init_from: train only what the file did not provide (a linear probe on a classifier)
    freeze_encoder: bool = False
    package: PackageConfig = field(default_factory=PackageConfig)  # for bioimage.io packages of the run


def _resolve_type(tp: Any) -> Any:
    """Strip ``X | None`` to ``X`` for coercion."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def _scalar(tp: type, value: Any) -> Any:
    """``value`` as a ``tp`` (bool, int, float or str) setting, else ValueError or OverflowError.

    YAML gives most values their type but reads 1e-3 as text, so numbers may come as text. Nothing else is converted:
    a bool is true or false (not "no", which bool() makes True), an int has no fraction (2.5 epochs is a typo, not 2),
    a float is not NaN, and text is a single value (str() of a list nested through YAML aliases would expand it).
    """
    if not isinstance(value, (bool, int, float, str)) or isinstance(value, bool) != (tp is bool):
        raise ValueError(value)
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    converted = tp(value)
    if tp is float and math.isnan(converted):
        raise ValueError(value)
    return converted


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` as a setting of type ``tp``: scalars as :func:`_scalar` says, lists and mappings item by item;
    ValueError, TypeError or OverflowError when it does not fit (None included)."""
    origin = typing.get_origin(tp)
    if tp in (bool, int, float, str):
        return _scalar(tp, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return type(value)(v if item is Any else _coerce(item, v) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        key_type, item = typing.get_args(tp) or (Any, Any)
        return {
            k if key_type is Any else _coerce(key_type, k): v if item is Any else _coerce(item, v)
            for k, v in value.items()
        }
    return value


def _group_default(spec: dataclasses.Field[Any]) -> Any:
    """The default of a settings group field (an instance), or None when it has none or defaults to None."""
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    default = spec.default
    return default if dataclasses.is_dataclass(default) and not isinstance(default, type) else None


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from a nested dict, checking keys and types (:func:`_coerce`); None (YAML null) only
    where the type allows it, and for a group of settings, which then keeps its defaults."""
    if not isinstance(values, dict):
        raise DeepscopeError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = sorted(plain(key) for key in values if key not in names)
    if unknown:
        raise DeepscopeError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        tp = _resolve_type(hints[key])
        if dataclasses.is_dataclass(tp):
            group = cast("type[DataclassInstance]", tp)  # a type hint: the dataclass itself, not an instance
            if dataclasses.is_dataclass(value):
                kwargs[key] = value
            elif value is not None and not isinstance(value, dict):
                kwargs[key] = from_dict(group, value, f"{source}: {key}")  # refused: not a mapping
            else:  # the settings given over this class's own defaults of the group (detect's AdamW, not SGD)
                base = _group_default(fields[key])
                merged = {**(dataclasses.asdict(base) if base is not None else {}), **(value or {})}
                kwargs[key] = from_dict(group, merged, f"{source}: {key}")
        elif tp is Any or (value is None and tp is not hints[key]):  # Any, or null for X | None
            kwargs[key] = value
        else:
            try:
                kwargs[key] = _coerce(tp, value)
            except (TypeError, ValueError, OverflowError):
                name = str(tp) if typing.get_origin(tp) else tp.__name__
                raise DeepscopeError(f"{source}: setting {key}={shown(value)} is not a valid {name}") from None
    return cls(**kwargs)


def yaml_problem(exc: Exception) -> str:
    """What a YAML parser found wrong, on one short line: its full message quotes the text over several lines."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return ((getattr(exc, "problem", None) or str(exc)).splitlines() or [type(exc).__name__])[0][:200]


def check_expansion(document: Any, source: str) -> Any:
    """``document`` (as yaml.safe_load built it) unless its lists and mappings, each counted as often as YAML aliases
    use it, hold more than MAX_VALUES values, or one holds itself. Loading shares what an alias names, but copying
    the settings (``dataclasses.asdict``, writing config.yaml) expands every use, and nine lines of aliases make 9**9
    values; one that holds itself never ends."""
    counted: dict[int, int] = {}

    def count(node: Any, inside: tuple[int, ...]) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        if id(node) in inside:
            raise DeepscopeError(f"{source}: a YAML alias makes a list or mapping hold itself")
        if id(node) not in counted:
            children = node.values() if isinstance(node, dict) else node
            counted[id(node)] = 1 + sum(count(child, (*inside, id(node))) for child in children)
        return counted[id(node)]

    if count(document, ()) > MAX_VALUES:
        raise DeepscopeError(f"{source}: YAML aliases expand the settings to more than {MAX_VALUES} values")
    return document


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (``safe_load``: tags that would build Python objects are refused; aliases may not expand
    it beyond reason, see :func:`check_expansion`), with a clear error for a missing or malformed file; an empty file
    is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise DeepscopeError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DeepscopeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise DeepscopeError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DeepscopeError(f"{path}: expected a mapping of settings at the top level")
    return check_expansion(values, str(path))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_yaml(config: Any, path: str | Path, header: Sequence[str] = ()) -> None:
    """Write the resolved config atomically: ``--resume`` reads it back, also after a kill mid-write. ``header``
    lines (the plan's reasons) go above it as comments."""
    comments = "".join(f"# {' '.join(line.split())}\n" for line in header)
    text = (comments + yaml.safe_dump(to_dict(config), sort_keys=False)).encode()
    atomic_write(Path(path), lambda handle: handle.write(text), "config file")
