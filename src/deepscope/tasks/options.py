"""The command-line pieces every task's commands share.

A task declares its commands in ``tasks/<task>/commands.py`` as a :class:`TaskCommands`: the flags its ``train``,
``evaluate`` and ``predict`` take, and the functions that run them. ``deepscope/cli.py`` only assembles these
declarations. Nothing here or in a ``commands.py`` imports torch or the task's own code at module level: ``deepscope
--help`` and ``deepscope train TASK --help`` are built from declarations alone, and a command imports its task when
it runs.

Settings of a run resolve as defaults < ``--config FILE.yaml`` < ``--set key=value`` < explicit flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deepscope.config import AMP_MODES, check_expansion, from_dict, load_yaml, yaml_problem
from deepscope.errors import DataError, DeepscopeError, shown

Result = dict[str, Any]  # what a command prints as JSON on the last line of stdout


@dataclass(frozen=True)
class Option:
    """One flag: its names and ``argparse.add_argument`` settings; ``key`` is the dotted config setting a training flag
    sets (None for flags that are not settings)."""

    flags: tuple[str, ...]
    settings: dict[str, Any]
    key: str | None = None

    @property
    def dest(self) -> str:
        return self.settings.get("dest") or self.flags[0].lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str | None = None) -> None:
        parser.add_argument(*self.flags, **({**self.settings, "help": help} if help is not None else self.settings))


def option(*flags: str, key: str | None = None, **settings: Any) -> Option:
    return Option(flags, settings, key)


def setting(flag: str, key: str | None = None, **settings: Any) -> Option:
    """A training flag that sets config key ``key`` (default: the flag's own name)."""
    return option(flag, key=key or flag[2:].replace("-", "_"), **settings)


@dataclass(frozen=True)
class TaskCommands:
    """What one task adds to the command line.

    ``train_options`` come after :data:`TRAIN_OPTIONS`; ``data_help`` and ``model_help`` say what ``--data`` and
    ``--model`` mean for this task. ``evaluate`` and ``predict`` run ``deepscope evaluate|predict CHECKPOINT`` for a
    checkpoint of this task with the parsed arguments and the device; their flags are ``evaluate_options`` and
    ``predict_options`` (a flag several tasks declare is added once; given with another task's checkpoint it is an
    error). ``score_saved`` runs ``deepscope evaluate TASK --pred --truth``, scores of saved results without a model;
    ``score_options`` names the evaluate flags it takes. ``export`` makes ``deepscope export CHECKPOINT`` of this task's
    checkpoints: from the parsed arguments it returns an :class:`~deepscope.export.exportable.Exportable`.
    """

    name: str
    summary: str
    data_help: str
    model_help: str
    evaluate: Callable[[argparse.Namespace, Any], Result]
    train_options: tuple[Option, ...] = ()
    evaluate_options: tuple[Option, ...] = ()
    predict_options: tuple[Option, ...] = ()
    predict: Callable[[argparse.Namespace, Any], Result] | None = None
    score_saved: Callable[[argparse.Namespace], Result] | None = None
    score_options: tuple[str, ...] = ()  # the evaluate flags (by dest) that ``score_saved`` takes
    export: Callable[[argparse.Namespace], Any] | None = None


SET = option("--set", action="append", metavar="KEY=VALUE", help="any setting, e.g. optim.lr=0.1")
CONFIG = option("--config", help="YAML file of settings")

# Flags of every training run; each sets the config key it names.
TRAIN_OPTIONS = (
    setting("--epochs", type=int),
    setting("--out", help="run folder for checkpoints, logs and report"),
    CONFIG,
    option("--resume", action="store_true", help="continue the run in --out from last.pt"),
    setting(
        "--init-from",
        help="start the model, or its encoder/backbone, from a local weights file (a deepscope "
        "checkpoint, e.g. of train ssl, or a torchvision state dict); the log says which tensors were taken",
    ),
    setting(
        "--freeze-encoder",
        action="store_true",
        default=None,
        help="with --init-from: keep the loaded weights fixed and train only the rest (a linear probe on a classifier)",
    ),
    setting("--batch-size", type=int),
    setting("--lr", key="optim.lr", type=float),
    setting("--optimizer", key="optim.name", choices=["sgd", "adamw"]),
    setting("--schedule", key="optim.schedule", choices=["onecycle", "cosine", "plateau", "none"]),
    setting("--weight-decay", key="optim.weight_decay", type=float),
    setting("--grad-clip", key="optim.grad_clip", type=float),
    setting("--device", help="auto (default), cpu, cuda, cuda:N"),
    setting(
        "--amp",
        choices=AMP_MODES,
        help="mixed precision (auto: bf16/fp16 on CUDA, bf16 on CPUs that compute it natively, else float32)",
    ),
    setting("--seed", type=int),
    setting(
        "--max-minutes",
        type=float,
        help="the time budget: what is left open is planned so that training ends within it, and it stops cleanly "
        "at it (without it: the task's default budget is planned, and nothing stops the run)",
    ),
    setting("--early-stopping", type=int, metavar="EPOCHS"),
    setting(
        "--ema",
        type=float,
        metavar="DECAY",
        help="keep a moving average of the weights (e.g. 0.999) and validate, save and predict with it",
    ),
    setting("--val-fraction", type=float),
    SET,
)


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            raise DeepscopeError(f"setting {shown(key)}: {shown(part)} is a single value, not a group of settings")
    values[leaf] = value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested update: a config file that sets optim.lr keeps the other optim settings of ``base``."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def parse_assignment(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``, VALUE read as YAML (``safe_load``: a tag that would build a Python object is refused)."""
    if "=" not in text:
        raise DeepscopeError(f"--set {shown(text)}: expected KEY=VALUE, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as exc:
        raise DeepscopeError(f"--set {shown(text)}: the value is not valid YAML ({yaml_problem(exc)})") from None
    return key.strip(), check_expansion(value, f"--set {shown(text)}")


def settings_from(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` updated by ``--config`` and then ``--set``."""
    values = base if base is not None else {}
    if getattr(args, "config", None):
        merge(values, load_yaml(args.config))
    for assignment in getattr(args, "set", None) or []:
        set_dotted(values, *parse_assignment(assignment))
    return values


def resolve_config(config_cls: type, args: argparse.Namespace, options: tuple[Option, ...], task: str) -> Any:
    """The typed settings of ``train TASK``: the saved config.yaml of a resumed run < --config < --set < flags."""
    values: dict[str, Any] = {}
    if args.resume:
        if not args.out:
            raise DeepscopeError("--resume needs --out DIR, the folder of the run to continue")
        saved = Path(args.out) / "config.yaml"
        if saved.is_file():
            values = load_yaml(saved)
        elif not (args.data or args.config or getattr(args, "images", None)):  # killed before it saved its settings
            raise DeepscopeError(
                f"{saved}: nothing to resume, no config.yaml in {args.out}; give the run's settings "
                "(--data ...) to start it again"
            )
    settings_from(args, values)
    for opt in options:
        value = getattr(args, opt.dest, None)
        if opt.key and value is not None:
            set_dotted(values, opt.key, value)
    values["task"] = task
    config: Any = from_dict(config_cls, values, args.config or "command line")
    if not config.data and not getattr(config, "images", None):
        raise DeepscopeError("no data given: pass --data PATH (or data: in the --config file)")
    return config


def collect_inputs(inputs: list[str], volumes: bool = False) -> list[Path]:
    """Files named, and the images in folders named; ``volumes`` also takes TIFF/HDF5/zarr/NPZ volumes."""
    from deepscope.data.io.images import is_image_file
    from deepscope.data.io.volumes import is_volume

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if volumes and path.suffix.lower() == ".zarr":
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p) or (volumes and p.is_file() and is_volume(p)))
            if not found:
                raise DataError(f"{path}: folder holds no images")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: file not found")
    return files


# Prediction flags of the tasks that apply a U-Net tile by tile (segment, denoise).
TILED_PREDICT_OPTIONS = (
    option("--tile", type=int, nargs="+", help="tile size, one value or one per axis"),
    option("--halo", type=int, nargs="+", help="context added around each tile"),
    option("--blend", choices=["gaussian", "linear", "none"], help="how overlapping tiles are merged"),
    option("--key", help="dataset/array inside HDF5, zarr or NPZ inputs"),
    option("--batch-size", type=int, help="tiles per forward pass"),
)


def tiled_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The values of :data:`TILED_PREDICT_OPTIONS`, as keyword arguments of a tiled ``predict_files``."""
    return {opt.dest: getattr(args, opt.dest) for opt in TILED_PREDICT_OPTIONS}


def predictions(records: list[dict[str, Any]], out: str) -> Result:
    """What ``predict`` prints for images predicted into files."""
    return {"predictions": len(records), "out": str(out), "outputs": records}
