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
from torch.nn import functional as F
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import (
    MultiScaleRoIAlign,
    box_area,
    complete_box_iou_loss,
    generalized_box_iou_loss,
    remove_small_boxes,
    sigmoid_focal_loss,
)

from deepscope.models.detection.backbones import (
    FPNBackbone,
    build_backbone,
    detection_transform,
    group_norm,
    transform_args,
)
from deepscope.models.detection.dfl import DFL_WEIGHT, DistributionRegressionHead, distribution_focal_loss

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


MIN_PREDICTED_SIDE = 1e-3  # pixels added to predicted box sides for CIoU (its aspect term divides by the height)


def _ciou_loss(predicted: torch.Tensor, boxes: torch.Tensor, reduction: str) -> torch.Tensor:
    """CIoU loss of boxes that may have no area: FCOS's distances pass a ReLU, so a predicted box can have width and
    height 0, where CIoU's aspect-ratio term is 0 / 0."""
    widened = predicted + predicted.new_tensor([0.0, 0.0, MIN_PREDICTED_SIDE, MIN_PREDICTED_SIDE])
    return complete_box_iou_loss(widened, boxes, reduction=reduction)


BOX_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"giou": generalized_box_iou_loss, "ciou": _ciou_loss}
SCORES = ("centerness", "iou")


def paired_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of each box with the box at the same place of ``others`` (both (N, 4) xyxy): torchvision's ``box_iou``
    computes every pair, N x N, where only the diagonal is wanted."""
    low = torch.maximum(boxes[:, :2], others[:, :2])
    high = torch.minimum(boxes[:, 2:], others[:, 2:])
    inter = (high - low).clamp(min=0).prod(dim=1)
    union = box_area(boxes) + box_area(others) - inter
    return inter / union.clamp(min=1e-6)


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Quality focal loss (Li et al., Generalized Focal Loss, NeurIPS 2020), summed: binary cross-entropy towards a
    soft target (the IoU of the box predicted at a positive location, 0 elsewhere), weighted by the distance
    ``|target - p| ** beta`` as the focal loss weights by ``(1 - p) ** gamma``. torchvision has only the hard-target
    focal loss."""
    probability = logits.sigmoid()
    weight = (targets - probability).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum()


class NormFCOSHead(FCOSHead):
    """FCOSHead whose towers take ``norm`` (torchvision's hard-codes GroupNorm(32, C), which fails unless the FPN
    width C is a multiple of 32; small CPU models use 16-64 channels), with a choice of box loss and of scores.

    ``scores="iou"`` makes the scores rank detections by how well they are localised, which matters at strict IoU
    (COCO mAP@0.75): the centre-ness branch learns the IoU of the box predicted at its location with its object
    (the IoU branch of IoU-aware detectors) and classification learns that IoU as a soft target by the quality focal
    loss, instead of centre-ness (a geometric guess of quality) and hard 1/0 targets. ``box_loss="ciou"`` adds
    CIoU's centre-distance and aspect-ratio terms to GIoU's, so boxes converge in fewer steps (YOLO's box loss).
    ``dfl_bins`` > 0 predicts each box side as a distribution over that many distances (:mod:`.dfl`), trained by
    the distribution focal loss beside the IoU loss."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm: Callable[[int], nn.Module],
        num_convs: int = 4,
        box_loss: str = "giou",
        scores: str = "centerness",
        dfl_bins: int = 0,
    ) -> None:
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")
        if scores not in SCORES:
            raise ValueError(f"scores must be one of {', '.join(SCORES)}, got {scores!r}")
        nn.Module.__init__(self)  # FCOSHead.__init__ would build the GroupNorm(32, C) towers this class replaces
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs, norm_layer=norm)
        self.regression_head = (
            DistributionRegressionHead(in_channels, num_convs, norm, dfl_bins)
            if dfl_bins
            else FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm)
        )
        self.box_loss, self.scores = box_loss, scores

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """FCOSHead's outputs, and each side's distance logits (``bbox_distribution``) with ``dfl_bins``."""
        out = {"cls_logits": self.classification_head(x)}
        out["bbox_regression"], out["bbox_ctrness"], *distribution = self.regression_head(x)
        if distribution:
            out["bbox_distribution"] = distribution[0]
        return out

    def compute_loss(
        self,
        targets: list[dict[str, torch.Tensor]],
        head_outputs: dict[str, torch.Tensor],
        anchors: list[torch.Tensor],
        matched_idxs: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """FCOS's three losses over the locations FCOS assigned (``matched_idxs``: the object of each location, -1
        for background), each summed and divided by the number of positive locations; with GIoU and centre-ness,
        torchvision's losses."""
        logits, regression = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        matched = torch.stack(matched_idxs)
        positive = matched >= 0
        boxes = torch.stack(
            [
                t["boxes"][m.clamp(min=0)] if len(t["boxes"]) else t["boxes"].new_zeros((len(m), 4))
                for t, m in zip(targets, matched_idxs)
            ]
        )[positive]
        labels = torch.stack(
            [t["labels"][m.clamp(min=0)] if len(t["labels"]) else m.clamp(min=0) for t, m in zip(targets, matched_idxs)]
        )[positive]
        locations = torch.stack(anchors)[positive]
        distances = self.box_coder.encode(locations, boxes)  # to the four sides, in strides (anchors are one wide)
        predicted = self.box_coder.decode(regression[positive].float(), locations)  # float: the box arithmetic
        count = max(1, int(positive.sum()))
        box_loss = BOX_LOSSES[self.box_loss](predicted, boxes, reduction="sum")
        quality_logits = head_outputs["bbox_ctrness"].squeeze(dim=2)[positive]
        if self.scores == "iou":
            quality = paired_iou(predicted.detach(), boxes)
            soft = torch.zeros_like(logits, dtype=torch.float32)
            soft[positive] = F.one_hot(labels, logits.shape[-1]).to(soft) * quality[:, None]
            class_loss = quality_focal_loss(logits.float(), soft)
        else:
            quality = torch.sqrt(
                (distances[:, [0, 2]].min(dim=-1).values / distances[:, [0, 2]].max(dim=-1).values)
                * (distances[:, [1, 3]].min(dim=-1).values / distances[:, [1, 3]].max(dim=-1).values)
            )
            hard = torch.zeros_like(logits, dtype=torch.float32)
            hard[positive] = F.one_hot(labels, logits.shape[-1]).to(hard)
            class_loss = sigmoid_focal_loss(logits.float(), hard, reduction="sum")
        quality_loss = F.binary_cross_entropy_with_logits(quality_logits.float(), quality, reduction="sum")
        losses = {
            "classification": class_loss / count,
            "bbox_regression": box_loss / count,
            "bbox_ctrness": quality_loss / count,
        }
        if "bbox_distribution" in head_outputs:
            dfl = distribution_focal_loss(head_outputs["bbox_distribution"][positive], distances)
            losses["bbox_distribution"] = DFL_WEIGHT * dfl / count
        return losses


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
    box_loss: str = "giou",
    scores: str = "centerness",
    head_convs: int = 4,
    dfl_bins: int = 0,
) -> FCOS:
    """FCOS (anchor-free: one point per location, centre-ness) on P3-P7 by default. Its heads always use GroupNorm,
    as FCOS was designed; its "anchors" are one square per location the size of the stride, which FCOS uses to
    normalise box offsets and to assign objects to levels by size. ``head_convs``: the 3x3 convolutions of each of
    the two towers (FCOS has 4; fewer make the head cheaper where the budget buys passes). ``box_loss`` and
    ``scores`` and ``dfl_bins``: see :class:`NormFCOSHead`."""
    _check_counts(num_classes, max_detections)
    body = build_backbone(backbone, in_channels, norm, fpn_channels, tuple(strides), extra_p6p7)
    anchors = AnchorGenerator(tuple((s,) for s in body.strides), ((1.0,),) * len(body.strides))
    if head_convs < 1:
        raise ValueError(f"head_convs must be at least 1, got {head_convs}")
    head = NormFCOSHead(
        fpn_channels, num_classes + 1, group_norm, head_convs, box_loss=box_loss, scores=scores, dfl_bins=dfl_bins
    )
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
