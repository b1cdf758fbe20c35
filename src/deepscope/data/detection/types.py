"""The records every part of object detection shares: one annotated image, and a data set of them.

Boxes are (x1, y1, x2, y2) in pixels of the stored image, 0-based, with x1 < x2 and y1 < y2 (torchvision's
convention); readers convert from VOC (1-based inclusive), COCO (x, y, w, h) and YOLO (normalised centre and size).
Class indices are 1..K; 0 is the background, as torchvision's detectors expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class DetItem:
    """One image and its objects."""

    name: str  # file name of the image (with suffix); predictions and COCO files are matched by it
    path: Path  # image file
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    labels: np.ndarray  # (N,) int64 in 1..K
    crowd: np.ndarray  # (N,) bool: COCO iscrowd / VOC difficult; ignored by the metric, not trained as positives
    masks: Callable[[], np.ndarray] | None = None  # loads (N, H, W) bool instance masks on demand; None: boxes only
    image_id: int = 0  # COCO image id (from the annotation file, else the item's index + 1)
    # (N,) COCO ``area`` (mask area) when the file gives it; None: the metric uses box areas
    area: np.ndarray | None = None

    @property
    def has_masks(self) -> bool:
        return self.masks is not None


@dataclass
class DetData:
    """Items per split ("train", "val", "test"; "all" when the data has no split folders) and the class names."""

    class_names: list[str]  # index i is class i + 1
    splits: dict[str, list[DetItem]] = field(default_factory=dict)
