"""Settings of image classification: the shared training settings plus the image size and augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field

from deepscope.config import TrainConfig
from deepscope.data.classification.augment import AugmentConfig


@dataclass
class ClassifyConfig(TrainConfig):
    task: str = "classify"
    model: str = "cnn"
    val_fraction: float = 0.1  # carved (stratified, seeded) from train when there is no val/ split
    resize: list[int] | None = None  # [H, W] to resize every image to; None requires equal sizes
    loader: str = "auto"  # memory: decode all, batch on the device | dataloader: stream from disk | auto: by size
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def resize_of(cfg: ClassifyConfig) -> tuple[int, int] | None:
    return (int(cfg.resize[0]), int(cfg.resize[1])) if cfg.resize else None
