"""torchvision's Faster R-CNN, RetinaNet, FCOS and Mask R-CNN, set up to train from scratch on ``build_backbone``.

torchvision's ready-made builders assume ImageNet weights: BatchNorm (frozen or not) everywhere, ImageNet mean/std,
COCO's image sizes and 100 detections per image. Here the backbone and heads use GroupNorm (where torchvision lets
them), inputs are [0, 1] images normalised by 0.5/0.25 per channel, anchors follow the backbone's strides, and
``max_detections`` lifts the per-image caps so images with hundreds of objects (nuclei, cells) are not cut at 100.

Labels are 1..K for all four models: the R-CNNs reserve class 0 for the background; RetinaNet and FCOS index their
sigmoid logits by label, so they get K + 1 columns too, and column 0 (never a positive) is kept out of the detections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, remove_small_boxes

from deepscope.models.detection.backbones import (
    FPNBackbone,
    build_backbone,
    detection_transform,
    group_norm,
    transform_args,
)

Detector = TypeVar("Detector", bound=nn.Module)

ASPECT_RATIOS = (0.5, 1.0, 2.0)
_ROI_FC_WIDTH = 1024  # torchvision's box head width
MIN_BOX_SIZE = 1e-2  # pixels: the R-CNNs' threshold for dropping empty boxes


def _check_counts(num_classes: int, max_detections: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}")


def _head_norm(norm: str) -> Callable[[int], nn.Module] | None:
    """GroupNorm in the heads with a GroupNorm backbone; with BatchNorm, torchvision's norm-free heads."""
    return group_norm if norm == "group" else None


def octave_anchors(strides: Sequence[int]) -> AnchorGenerator:
    """RetinaNet's anchors: sizes 4x the stride times 2^0, 2^(1/3), 2^(2/3) per level, three aspect ratios, so
    consecutive levels cover object sizes without gaps."""
    sizes = tuple(tuple(round(4 * s * 2 ** (i / 3)) for i in range(3)) for s in strides)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(strides))


def _without_background_column(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits with column 0 at -inf: its sigmoid score 0 fails any score threshold >= 0."""
    masked = [level.clone() for level in logits]
    for level in masked:
        level[..., 0] = float("-inf")
    return masked


def _without_empty_boxes(detection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keep = remove_small_boxes(detection["boxes"], MIN_BOX_SIZE)
    return {key: value[keep] for key, value in detection.items()}


class _OneStagePostprocess:
    """Postprocessing that never reports label 0 nor an empty box. RetinaNet and FCOS train column 0 only as a
    negative, so its scores stay low, but at a low score threshold it would still turn up as detections of a class
    that does not exist; and unlike the R-CNNs they keep boxes that clipping to the image left without area."""

    def postprocess_detections(
        self, head_outputs: dict[str, list[torch.Tensor]], *args: object
    ) -> list[dict[str, torch.Tensor]]:
        head_outputs = {**head_outputs, "cls_logits": _without_background_column(head_outputs["cls_logits"])}
        # a mixin: the superclass is RetinaNet or FCOS, known only in the classes that mix it in
        detections = super().postprocess_detections(head_outputs, *args)  # type: ignore[misc]
        return [_without_empty_boxes(d) for d in detections]


class RetinaNetFromOne(_OneStagePostprocess, RetinaNet):
    """RetinaNet with labels 1..K in and out, and no empty boxes out."""


class FCOSFromOne(_OneStagePostprocess, FCOS):
    """FCOS with labels 1..K in and out, and no empty boxes out."""


class NormFCOSHead(FCOSHead):
    """FCOSHead whose towers take ``norm``: torchvision's hard-codes GroupNorm(32, C), which fails unless the FPN
    width C is a multiple of 32 (small CPU models use 16-64 channels)."""

    def __init__(
        self, in_channels: int, num_classes: int, norm: Callable[[int], nn.Module], num_convs: int = 4
    ) -> None:
        nn.Module.__init__(self)  # FCOSHead.__init__ would build the GroupNorm(32, C) towers this class replaces
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs, norm_layer=norm)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm)


def _level_names(backbone: FPNBackbone) -> list[str]:
    """The pyramid maps the RoI heads pool from: all of ``backbone``'s ("0", "1", ...)."""
    return [str(i) for i in range(len(backbone.strides))]


def _rcnn_parts(backbone: FPNBackbone, num_classes: int, norm: str, max_detections: int) -> dict:
    """The region-proposal and box-head arguments shared by Faster and Mask R-CNN (detectron2's GN scratch setup:
    two-conv RPN head, four-conv + one-fc box head with GroupNorm)."""
    anchors = octave_anchors(backbone.strides)
    c = backbone.out_channels
    proposals = max(1000, 2 * max_detections)
    return {
        "rpn_anchor_generator": anchors,
        "rpn_head": RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2),
        "rpn_pre_nms_top_n_test": proposals,
        "rpn_post_nms_top_n_test": proposals,
        "box_roi_pool": MultiScaleRoIAlign(_level_names(backbone), output_size=7, sampling_ratio=2),
        "box_head": FastRCNNConvFCHead((c, 7, 7), [c] * 4, [_ROI_FC_WIDTH], norm_layer=_head_norm(norm)),
        "box_predictor": FastRCNNPredictor(_ROI_FC_WIDTH, num_classes + 1),
        "box_detections_per_img": max_detections,
    }


def _scaled(model: Detector, in_channels: int, min_size: int | Sequence[int], max_size: int) -> Detector:
    """``model`` with deepscope's transform, which also knows native scale (``min_size`` 0; torchvision's does not)."""
    model.transform = detection_transform(in_channels, min_size, max_size)
    return model


def faster_rcnn(
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet18",
    norm: str = "group",
    fpn_channels: int = 128,
    min_size: int | Sequence[int] = 512,
    max_size: int = 853,
    max_detections: int = 100,
    strides: Sequence[int] = (4, 8, 16, 32),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
) -> FasterRCNN:
    """Faster R-CNN with an FPN, for ``num_classes`` object classes (labels 1..K)."""
    _check_counts(num_classes, max_detections)
    body = build_backbone(backbone, in_channels, norm, fpn_channels, tuple(strides))
    return _scaled(
        FasterRCNN(
            body,
            **_rcnn_parts(body, num_classes, norm, max_detections),
            **transform_args(in_channels, min_size, max_size),
            box_score_thresh=score_thresh,
            box_nms_thresh=nms_thresh,
        ),
        in_channels,
        min_size,
        max_size,
    )


def mask_rcnn(
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet18",
    norm: str = "group",
    fpn_channels: int = 128,
    min_size: int | Sequence[int] = 512,
    max_size: int = 853,
    max_detections: int = 100,
    strides: Sequence[int] = (4, 8, 16, 32),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
) -> MaskRCNN:
    """Mask R-CNN: Faster R-CNN plus a four-conv mask head; detections carry ``masks`` (M, 1, H, W) probabilities."""
    _check_counts(num_classes, max_detections)
    body = build_backbone(backbone, in_channels, norm, fpn_channels, tuple(strides))
    c = body.out_channels
    return _scaled(
        MaskRCNN(
            body,
            **_rcnn_parts(body, num_classes, norm, max_detections),
            **transform_args(in_channels, min_size, max_size),
            box_score_thresh=score_thresh,
            box_nms_thresh=nms_thresh,
            mask_roi_pool=MultiScaleRoIAlign(_level_names(body), output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=_head_norm(norm)),
            mask_predictor=MaskRCNNPredictor(c, c, num_classes + 1),
        ),
        in_channels,
        min_size,
        max_size,
    )


def _single_stage(
    cls: type[Detector],
    body: FPNBackbone,
    num_classes: int,
    anchors: AnchorGenerator,
    head: nn.Module,
    sizes: tuple[int, int | Sequence[int], int],
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
) -> Detector:
    """RetinaNet or FCOS with K + 1 classes, deepscope's transform and candidates enough for ``max_detections``."""
    in_channels, min_size, max_size = sizes
    model = cls(
        body,
        num_classes + 1,
        **transform_args(in_channels, min_size, max_size),
        anchor_generator=anchors,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=max_detections,
        topk_candidates=max(1000, max_detections),
    )
    return _scaled(model, in_channels, min_size, max_size)


def retinanet(
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet18",
    norm: str = "group",
    fpn_channels: int = 128,
    min_size: int | Sequence[int] = 512,
    max_size: int = 853,
    max_detections: int = 100,
    strides: Sequence[int] = (8, 16, 32),
    extra_p6p7: bool = True,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
) -> RetinaNet:
    """RetinaNet (focal loss, anchors at three octave scales) on P3-P7 by default."""
    _check_counts(num_classes, max_detections)
    body = build_backbone(backbone, in_channels, norm, fpn_channels, tuple(strides), extra_p6p7)
    anchors = octave_anchors(body.strides)
    head = RetinaNetHead(
        fpn_channels, anchors.num_anchors_per_location()[0], num_classes + 1, norm_layer=_head_norm(norm)
    )
    return _single_stage(
        RetinaNetFromOne,
        body,
        num_classes,
        anchors,
        head,
        (in_channels, min_size, max_size),
        score_thresh,
        nms_thresh,
        max_detections,
    )


def fcos(
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "resnet18",
    norm: str = "group",
    fpn_channels: int = 128,
    min_size: int | Sequence[int] = 512,
    max_size: int = 853,
    max_detections: int = 100,
    strides: Sequence[int] = (8, 16, 32),
    extra_p6p7: bool = True,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
) -> FCOS:
    """FCOS (anchor-free: one point per location, centre-ness) on P3-P7 by default. Its heads always use GroupNorm,
    as FCOS was designed; its "anchors" are one square per location the size of the stride, which FCOS uses to
    normalise box offsets and to assign objects to levels by size."""
    _check_counts(num_classes, max_detections)
    body = build_backbone(backbone, in_channels, norm, fpn_channels, tuple(strides), extra_p6p7)
    anchors = AnchorGenerator(tuple((s,) for s in body.strides), ((1.0,),) * len(body.strides))
    head = NormFCOSHead(fpn_channels, num_classes + 1, group_norm)
    return _single_stage(
        FCOSFromOne,
        body,
        num_classes,
        anchors,
        head,
        (in_channels, min_size, max_size),
        score_thresh,
        nms_thresh,
        max_detections,
    )
