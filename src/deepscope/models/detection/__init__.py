"""Object detectors by name (see :func:`build_detector`).

Every detector follows torchvision's convention: ``model(images, targets)`` with a list of (C, H, W) float images
in [0, 1] of any sizes; in training mode it returns a dict of scalar losses, in evaluation mode one dict per image
with ``boxes`` (xyxy, in that image's pixels), ``scores`` and ``labels`` (1..K), plus ``masks`` for Mask R-CNN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from deepscope.errors import DeepscopeError
from deepscope.models.detection import torchvision_detectors
from deepscope.models.detection.centernet import CenterNet
from deepscope.models.detection.detr import DETR
from deepscope.models.registry import construct_model

DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn": torchvision_detectors.faster_rcnn,
    "retinanet": torchvision_detectors.retinanet,
    "fcos": torchvision_detectors.fcos,
    "maskrcnn": torchvision_detectors.mask_rcnn,
    "centernet": CenterNet,
    "detr": DETR,
}
_MASK_DETECTORS = frozenset({"maskrcnn"})
_SET_PREDICTORS = frozenset({"detr"})  # one box per query: no score threshold or NMS of their own


def finishing_args(name: str, score_threshold: float, nms_iou: float) -> dict[str, Any]:
    """The detector's own score threshold and NMS IoU (``score_thresh``, ``nms_thresh``) set to the inference
    settings: the detectors filter their candidates before deepscope's class-wise NMS does, so with their built-in
    values (score 0.05, NMS 0.5-0.6) a lower ``--score-threshold`` or a higher NMS IoU would silently change nothing."""
    return {} if name in _SET_PREDICTORS else {"score_thresh": score_threshold, "nms_thresh": nms_iou}


def detector_names() -> list[str]:
    return sorted(DETECTORS)


def predicts_masks(name: str) -> bool:
    """Whether detector ``name`` returns instance masks (and so trains on them)."""
    return name in _MASK_DETECTORS


def build_detector(name: str, num_classes: int, in_channels: int = 3, **model_args: Any) -> nn.Module:
    """Detector ``name`` for ``num_classes`` object classes (labels 1..K, no background) on images of ``in_channels``;
    ``model_args`` are the detector's own settings (backbone, norm, fpn_channels, min_size, max_detections, ...)."""
    if name not in DETECTORS:
        raise DeepscopeError(f"unknown detector {name!r}; choose one of {', '.join(detector_names())}")
    return construct_model(
        name, DETECTORS[name], (num_classes, in_channels), {"num_classes", "in_channels"}, model_args
    )
