"""Settings of image classification: the shared training settings plus the image size and augmentation.

Settings left open (an empty ``model``, no width in ``model_args``, ``batch_size`` or ``augment`` of None, no
optimizer setting given, ``epochs`` of None) are planned from the data and the time budget
(``tasks/classify/plan.py``, ``engine/plan.py``); the plan and its reasons go to the log, config.yaml and the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from deepscope.config import OptimConfig, TrainConfig
from deepscope.data.classification.augment import AugmentConfig


@dataclass(eq=False)
class DefaultOptim(OptimConfig):
    """The optimizer settings of a run given none: the defaults, which the plan may replace by its recipe's. Any
    optimizer setting given (a flag such as ``--lr``, ``--set optim.X``, ``optim:`` in a file, a saved config.yaml)
    builds a plain :class:`OptimConfig` instead, so a value given is kept even when it equals the default."""


def optim_left_open(config: ClassifyConfig) -> bool:
    """Whether no optimizer setting was given, and none was changed since."""
    return isinstance(config.optim, DefaultOptim) and dataclasses.asdict(config.optim) == dataclasses.asdict(
        OptimConfig()
    )


@dataclass
class ClassifyConfig(TrainConfig):
    task: str = "classify"
    model: str = ""  # logreg | mlp | cnn | resnet18 | fastnet; empty: planned (fastnet up to 64 px, else resnet18)
    val_fraction: float = 0.1  # carved (stratified, seeded) from train when there is no val/ split
    resize: list[int] | None = None  # [H, W] to resize every image to; None requires equal sizes
    loader: str = "auto"  # memory: decode all, batch on the device | dataloader: stream from disk | auto: by size
    # TrainConfig's int, None here until the plan sets it (before the trainer reads it)
    batch_size: int | None = None  # type: ignore[assignment]
    augment: AugmentConfig | None = None  # None: planned by the image size
    optim: OptimConfig = field(default_factory=DefaultOptim)  # none given: the recipe of the planned model


def resize_of(cfg: ClassifyConfig) -> tuple[int, int] | None:
    return (int(cfg.resize[0]), int(cfg.resize[1])) if cfg.resize else None
