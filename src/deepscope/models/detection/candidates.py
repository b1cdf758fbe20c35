"""A detector's network up to its candidate boxes as one tensor in, one tensor out, so that ONNX and TorchScript can
hold it, and the steps from candidates to detections that stay outside the file.

What goes into the file: normalisation, padding to a multiple of 32, backbone, heads, box decoding, clipping to the
image and each pyramid level's best ``topk_candidates`` (the dense part, with shapes that follow the input's). What
stays out: the score threshold, class-wise NMS and the detection limit, whose output lengths depend on the data; that
is where ultralytics' exports stop too (its NMS is outside the ONNX by default), and every runtime has an NMS.

The candidates are rows ``x1 y1 x2 y2 score label`` (label 1..K) in the pixels of the input, each level's sorted by
score; rows scoring 0 (CenterNet's non-peaks) are all zeros, so that which of them a runtime's sort puts where does
not change the output. :class:`CandidateDetector` turns candidates into torchvision-style detections exactly as the
detectors' own ``forward`` does (tested equal), whether the candidates come from the eager module or an exported
file. Two-stage R-CNNs (region proposals, then RoIAlign on a data-dependent number of boxes) and DETR are not
covered: FCOS, RetinaNet and CenterNet are, the detectors the plan picks among.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, remove_small_boxes

from deepscope.errors import DataError
from deepscope.models.detection.backbones import FPNBackbone
from deepscope.models.detection.centernet import CENTERNET_STRIDE, CenterNet, centre_candidates
from deepscope.models.detection.torchvision_detectors import MIN_BOX_SIZE

SIZE_DIVISIBLE = 32  # torchvision's transform pads every batch to multiples of this
ROW = 6  # x1, y1, x2, y2, score, label


@dataclass
class Finish:
    """How candidates become detections, as the detector's own ``forward`` does it: scores above
    ``score_threshold``, class-wise NMS at ``nms_iou`` (None: none), the best ``max_detections``, and boxes with a side
    under ``min_side`` pixels dropped (0: none)."""

    score_threshold: float
    nms_iou: float | None
    max_detections: int
    min_side: float

    def __call__(self, rows: Tensor) -> dict[str, Tensor]:
        rows = rows[rows[:, 4] > self.score_threshold]
        boxes, scores, labels = rows[:, :4], rows[:, 4], rows[:, 5].round().long()
        keep = (
            batched_nms(boxes, scores, labels, self.nms_iou)
            if self.nms_iou is not None
            else scores.argsort(descending=True, stable=True)
        )[: self.max_detections]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.min_side:
            kept = remove_small_boxes(boxes, self.min_side)
            boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
        return {"boxes": boxes, "scores": scores, "labels": labels}


class Candidates(nn.Module, ABC):
    """(N, C, H, W) [0, 1] images, already resized as the detector's transform resizes them, -> (N, M, 6) candidate
    rows (see the module's docstring). Normalised and padded inside, as the transform does it."""

    mean: Tensor
    std: Tensor

    def __init__(self, transform: GeneralizedRCNNTransform, backbone: FPNBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.strides = tuple(backbone.strides)
        self.register_buffer("mean", torch.tensor(transform.image_mean)[None, :, None, None])
        self.register_buffer("std", torch.tensor(transform.image_std)[None, :, None, None])

    def min_side(self) -> int:
        """The smallest image side the graph takes: the coarsest level must be at least two pixels (a traced or
        exported graph assumes so)."""
        return max(self.strides) + 1

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        padded = F.pad((x - self.mean) / self.std, (0, (-width) % SIZE_DIVISIBLE, 0, (-height) % SIZE_DIVISIBLE))
        boxes, scores, labels = self.decode(padded, height, width)
        rows = torch.cat([clip(boxes, height, width), scores[..., None], labels[..., None].to(scores.dtype)], -1)
        return rows * (scores[..., None] > 0).to(rows.dtype)

    @abstractmethod
    def decode(self, x: Tensor, height: Any, width: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(boxes (N, M, 4), scores (N, M), labels (N, M)) of the padded, normalised batch ``x`` whose images are
        ``height`` x ``width`` before padding."""


def clip(boxes: Tensor, height: Any, width: Any) -> Tensor:
    """Boxes clipped to the image, as torchvision's ``clip_boxes_to_image`` (written with tensor bounds so that a
    traced or exported graph keeps the image size as a variable)."""
    limit = torch.stack([boxes.new_full((), 1) * width, boxes.new_full((), 1) * height]).repeat(2)
    return torch.minimum(boxes.clamp(min=0), limit)


def best_per_level(scores: Tensor, boxes: Tensor, sizes: Sequence[Any], topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each level's ``topk`` best (location, class) pairs, as torchvision's one-stage detectors keep them before NMS:
    ``scores`` (N, A, K) and ``boxes`` (N, A, 4) over all levels' locations, ``sizes`` the locations per level. A
    sort and a slice rather than ``topk``, so that a level with fewer than ``topk`` pairs needs no shape test."""
    classes = scores.shape[-1]
    found = []
    for level_scores, level_boxes in zip(scores.split(list(sizes), 1), boxes.split(list(sizes), 1)):
        best, index = level_scores.flatten(1).sort(1, descending=True)
        best, index = best[:, :topk], index[:, :topk]
        location = (index // classes)[..., None].expand(-1, -1, 4)
        found.append((level_boxes.gather(1, location), best, index % classes + 1))
    return torch.cat([f[0] for f in found], 1), torch.cat([f[1] for f in found], 1), torch.cat([f[2] for f in found], 1)


class OneStageCandidates(Candidates):
    """FCOS's or RetinaNet's candidates: their anchors (one square per location for FCOS) made from the feature maps'
    sizes as torchvision's ``AnchorGenerator`` makes them, their box coders, and column 0 (never a class here: see
    ``torchvision_detectors``) left out."""

    def __init__(self, model: FCOS | RetinaNet) -> None:
        super().__init__(model.transform, model.backbone)
        self.head, self.topk = model.head, model.topk_candidates
        self.fcos = isinstance(model, FCOS)
        self.box_coder = model.head.box_coder if self.fcos else model.box_coder
        for level, cell in enumerate(model.anchor_generator.cell_anchors):
            self.register_buffer(f"cell{level}", cell.float())
        self.levels = len(model.anchor_generator.cell_anchors)

    def anchors(self, x: Tensor, features: list[Tensor]) -> list[Tensor]:
        """Each level's anchors, location by location and within a location cell anchor by cell anchor; the stride
        is the padded input's size over the map's, as torchvision computes it (on P6/P7 that is not always 2^k)."""
        found = []
        for level, feature in enumerate(features):
            rows, cols = feature.shape[-2:]
            ys = torch.arange(rows, device=x.device, dtype=torch.float32) * (x.shape[-2] // rows)
            xs = torch.arange(cols, device=x.device, dtype=torch.float32) * (x.shape[-1] // cols)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([grid_x, grid_y, grid_x, grid_y], -1).reshape(-1, 1, 4)
            found.append((shifts + getattr(self, f"cell{level}").view(1, -1, 4)).reshape(-1, 4))
        return found

    def decode(self, x: Tensor, height: Any, width: Any) -> tuple[Tensor, Tensor, Tensor]:
        features = list(self.backbone(x).values())
        out = self.head(features)
        anchors = self.anchors(x, features)
        logits = out["cls_logits"][..., 1:].float()
        regression = out["bbox_regression"].float()
        everywhere = torch.cat(anchors)
        if self.fcos:
            scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(out["bbox_ctrness"].float()))
            boxes = self.box_coder.decode(regression, everywhere[None])
        else:
            scores = torch.sigmoid(logits)
            flat = self.box_coder.decode_single(regression.reshape(-1, 4), everywhere.repeat(len(x), 1))
            boxes = flat.reshape(len(x), -1, 4)
        return best_per_level(scores, boxes, [a.shape[0] for a in anchors], self.topk)


class CenterNetCandidates(Candidates):
    """CenterNet's candidates: its heatmap peaks inside the image (not its padding), the best ``max_detections``."""

    def __init__(self, model: CenterNet) -> None:
        super().__init__(model.transform, model.backbone)
        self.heads = nn.ModuleList([model.heatmap_head, model.size_head, model.offset_head])
        self.max_detections = model.max_detections

    def decode(self, x: Tensor, height: Any, width: Any) -> tuple[Tensor, Tensor, Tensor]:
        feature = self.backbone(x)["0"]
        heatmap, size, offset = (head(feature) for head in self.heads)
        rows = torch.arange(heatmap.shape[-2], device=x.device)[:, None]
        cols = torch.arange(heatmap.shape[-1], device=x.device)[None, :]
        valid = (rows * CENTERNET_STRIDE < height) & (cols * CENTERNET_STRIDE < width)
        return centre_candidates(heatmap.sigmoid() * valid.to(heatmap.dtype), size, offset, self.max_detections)


def candidates_of(model: nn.Module) -> tuple[Candidates, Finish]:
    """The candidate module of a trained detector and how its ``forward`` finishes them; ValueError for a detector
    whose detections cannot be made from dense candidates (the R-CNNs, DETR)."""
    if isinstance(model, (FCOS, RetinaNet)):
        finish = Finish(model.score_thresh, model.nms_thresh, model.detections_per_img, MIN_BOX_SIZE)
        return OneStageCandidates(model).eval(), finish
    if isinstance(model, CenterNet):
        finish = Finish(model.score_thresh, model.nms_thresh, model.max_detections, 0.0)
        return CenterNetCandidates(model).eval(), finish
    raise ValueError(
        f"{type(model).__name__} finds its boxes in two stages or by set prediction, which a file of dense candidates "
        "cannot hold; FCOS, RetinaNet and CenterNet can be exported"
    )


class CandidateDetector(nn.Module):
    """Candidates (an eager :class:`Candidates`, or the ONNX / TorchScript file of one) and their :class:`Finish`,
    behind the detectors' interface: a list of (C, H, W) [0, 1] images of any sizes in, one dict of ``boxes``,
    ``scores``, ``labels`` per image out, in that image's pixels. Images are resized by the detector's ``transform``;
    consecutive images of one size (a large image's tiles) go through the candidates as one batch."""

    def __init__(
        self, candidates: nn.Module, finish: Finish, transform: GeneralizedRCNNTransform, min_side: int = 1
    ) -> None:
        super().__init__()
        self.candidates, self.finish, self.transform, self.min_side = candidates, finish, transform, min_side

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        resized = [self.transform.resize(image)[0] for image in images]
        small = [tuple(r.shape[-2:]) for r in resized if min(r.shape[-2:]) < self.min_side]
        if small:
            raise DataError(
                f"an image (or tile) of {small[0][0]}x{small[0][1]} pixels after resizing is smaller than the "
                f"{self.min_side} pixels a side this exported detector takes"
            )
        detections: list[dict[str, Tensor]] = []
        for _, same_size in itertools.groupby(resized, key=lambda r: r.shape):
            detections += [self.finish(r.float()) for r in self.candidates(torch.stack(list(same_size)))]
        sizes = [(int(r.shape[-2]), int(r.shape[-1])) for r in resized]
        originals = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        return self.transform.postprocess(detections, sizes, originals)
