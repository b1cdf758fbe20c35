"""CenterNet (Zhou et al. 2019, "Objects as Points"): every object is the peak of a class heatmap at stride 4, plus
its box size and the sub-pixel offset of its centre read at that peak.

Why CenterNet and not FCOS-style l/t/r/b distances at stride 4: the images this is for hold hundreds of small,
touching objects (nuclei). FCOS assigns every pixel inside a box to that box, so touching or overlapping boxes fight
over pixels and need an ambiguity rule; a centre heatmap gives each object its own peak, needs no anchor or
pixel-to-box assignment, and decodes with a 3x3 max-pool instead of NMS, so hundreds of detections per image cost
nothing extra. Class-wise NMS is kept only as a safety net against twin peaks.

Torchvision has no CenterNet, so the heads, the target rendering, the focal loss and the decoding are written here;
resizing, normalising, batching and mapping boxes back use torchvision's ``GeneralizedRCNNTransform`` as the
torchvision detectors do, so every detector sees the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from deepscope.models.detection.backbones import STRIDES, build_backbone, detection_transform

# sigmoid(-2.19) = 0.1: the paper's start, so the focal loss is not swamped by background at step 0
HEATMAP_PRIOR_BIAS = -2.19
CENTERNET_STRIDE = 4
SIZE_LOSS_WEIGHT = 0.1  # the paper's lambda_size; offsets weigh 1
GAUSSIAN_MIN_OVERLAP = 0.7  # the paper's radius rule: a box whose corners move by the radius keeps IoU >= 0.7


def box_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Boxes, labels and crowd flags only: the transform would otherwise resize every instance mask, which box-only
    detectors never read. A missing ``iscrowd`` means no crowd objects."""
    return [
        {
            "boxes": t["boxes"],
            "labels": t["labels"],
            "iscrowd": t.get(
                "iscrowd", torch.zeros(len(t["labels"]), dtype=torch.bool, device=t["labels"].device)
            ).bool(),
        }
        for t in targets
    ]


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = GAUSSIAN_MIN_OVERLAP) -> Tensor:
    """CornerNet's radius rule as CenterNet's code applies it: the smallest of the three cases' radii (both corners
    inside, both outside, one of each) at which a box whose corners move by the radius still overlaps by ``min_overlap``."""
    area = height * width
    side_sum = height + width
    r1 = (side_sum + torch.sqrt(side_sum**2 - 4 * area * (1 - min_overlap) / (1 + min_overlap))) / 2
    r2 = (2 * side_sum + torch.sqrt(4 * side_sum**2 - 16 * (1 - min_overlap) * area)) / 2
    r3 = (
        -2 * min_overlap * side_sum
        + torch.sqrt(4 * min_overlap**2 * side_sum**2 - 16 * min_overlap * (min_overlap - 1) * area)
    ) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@dataclass
class CenterTargets:
    """What one image's objects ask of the heads on a (H, W) map: heatmaps, plus size and offset at each centre."""

    heatmap: Tensor  # (K, H, W) in [0, 1], exactly 1 at each object's centre pixel
    index: Tensor  # (N,) int64 flat centre pixel y * W + x
    size: Tensor  # (N, 2) box width, height in map pixels
    offset: Tensor  # (N, 2) centre minus its pixel (x, y), in [0, 1)
    ignore: Tensor  # (H, W) bool: inside a crowd box, where background is not penalised either


def render_targets(
    boxes: Tensor,
    labels: Tensor,
    num_classes: int,
    map_size: tuple[int, int],
    stride: int = CENTERNET_STRIDE,
    crowd: Tensor | None = None,
) -> CenterTargets:
    """Gaussian splats (sigma = diameter / 6) at the object centres, drawn for all objects at once: every object's
    (2R+1)^2 window (R the largest radius) is scattered into the heatmaps with ``amax``, cut to its own radius and the
    map. ``boxes`` (N, 4) xyxy in input pixels, ``labels`` (N,) in 1..K; crowd objects are not targets but mark
    their boxes as ignored."""
    height, width = map_size
    crowd = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device) if crowd is None else crowd.bool()
    ignore = _inside_boxes(boxes[crowd] / stride, map_size)
    boxes, labels = boxes[~crowd].float() / stride, labels[~crowd]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    pixel = centre.floor().long()
    pixel[:, 0].clamp_(0, width - 1)
    pixel[:, 1].clamp_(0, height - 1)
    size = boxes[:, 2:] - boxes[:, :2]
    radius = gaussian_radius(size[:, 1].ceil(), size[:, 0].ceil()).long().clamp(min=0)
    reach = int(radius.max()) if len(radius) else 0
    steps = torch.arange(-reach, reach + 1, device=boxes.device)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    sigma = (2 * radius + 1).float() / 6
    value = torch.exp(-(dx**2 + dy**2)[None] / (2 * sigma[:, None, None] ** 2))
    xs, ys = pixel[:, 0, None, None] + dx, pixel[:, 1, None, None] + dy
    r = radius[:, None, None]
    keep = (dx.abs() <= r) & (dy.abs() <= r) & (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    flat = ((labels[:, None, None] - 1) * height + ys) * width + xs
    heatmap = torch.zeros(num_classes * height * width, device=boxes.device)
    heatmap.scatter_reduce_(0, flat[keep], value[keep], reduce="amax")
    index = pixel[:, 1] * width + pixel[:, 0]
    return CenterTargets(heatmap.view(num_classes, height, width), index, size, centre - pixel, ignore)


def _inside_boxes(boxes: Tensor, map_size: tuple[int, int]) -> Tensor:
    """(H, W) True at map pixels that any of ``boxes`` (map units) touches."""
    ys = torch.arange(map_size[0], device=boxes.device)[None, :, None]
    xs = torch.arange(map_size[1], device=boxes.device)[None, None, :]
    b = boxes[:, :, None, None]
    return ((xs + 1 > b[:, 0]) & (xs < b[:, 2]) & (ys + 1 > b[:, 1]) & (ys < b[:, 3])).any(0)


def centre_focal_loss(logits: Tensor, target: Tensor, ignore: Tensor) -> Tensor:
    """The paper's pixel-wise focal loss (alpha 2, beta 4) over heatmap logits, summed and divided by the number of
    centres; ``ignore`` (B, H, W) switches background terms off. Log-sigmoids keep it finite without clamping."""
    prob = logits.sigmoid()
    positive = target.eq(1)
    pos_term = (1 - prob) ** 2 * F.logsigmoid(logits)
    neg_term = (1 - target) ** 4 * prob**2 * F.logsigmoid(-logits) * (~ignore[:, None]).float()
    return -torch.where(positive, pos_term, neg_term).sum() / positive.sum().clamp(min=1)


def centre_candidates(
    heatmap: Tensor, size: Tensor, offset: Tensor, max_detections: int, stride: int = CENTERNET_STRIDE
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``max_detections`` best peaks over all classes of heatmap probabilities (B, K, H, W), the local maxima of
    a 3x3 window, as (boxes (B, M, 4) in input pixels, scores (B, M), labels (B, M) in 1..K), best first; sizes and
    offsets (B, 2, H, W). A sort and a slice rather than ``topk``, so that an exported graph needs no shape test for
    maps with fewer pixels than ``max_detections``."""
    classes, height, width = heatmap.shape[1:]
    peaks = heatmap * (F.max_pool2d(heatmap, 3, stride=1, padding=1) == heatmap)
    scores, flat = peaks.flatten(1).sort(1, descending=True)
    scores, flat = scores[:, :max_detections], flat[:, :max_detections]
    # x, y and class of every heatmap entry, looked up rather than computed with % and //, which ONNX's exporter
    # cannot write when the map's size is a variable
    grid = [torch.arange(n, device=heatmap.device) for n in (width, height, classes)]
    shape = (classes, height, width)
    table = torch.stack([grid[0].view(1, 1, -1).expand(shape), grid[1].view(1, -1, 1).expand(shape)])
    xy = table.flatten(1)[:, flat]  # (2, B, M)
    labels = grid[2].view(-1, 1, 1).expand(shape).flatten()[flat] + 1
    at_peak = (xy[1] * width + xy[0])[:, None].expand(-1, 2, -1)
    wh = size.flatten(2).gather(2, at_peak).clamp(min=0) * stride  # an untrained size head can predict negative sizes
    centre = (xy.permute(1, 0, 2) + offset.flatten(2).gather(2, at_peak)) * stride
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], 1).transpose(1, 2)
    return boxes, scores, labels


def decode_centres(
    heatmap: Tensor,
    size: Tensor,
    offset: Tensor,
    max_detections: int,
    score_threshold: float,
    stride: int = CENTERNET_STRIDE,
) -> list[dict[str, Tensor]]:
    """Boxes from heatmap probabilities (B, K, H, W), sizes and offsets (B, 2, H, W): the :func:`centre_candidates`
    above ``score_threshold``; boxes in input pixels."""
    boxes, scores, labels = centre_candidates(heatmap, size, offset, max_detections, stride)
    keep = scores > score_threshold
    return [
        {"boxes": boxes[i][keep[i]], "scores": scores[i][keep[i]], "labels": labels[i][keep[i]]}
        for i in range(len(boxes))
    ]


def _head(channels: int, out_channels: int, bias: float = 0.0) -> nn.Sequential:
    """The paper's head: 3x3 conv, ReLU, 1x1 conv to the outputs."""
    head = nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, out_channels, 1)
    )
    last = cast(nn.Conv2d, head[-1])
    assert last.bias is not None  # a Conv2d has a bias unless built with bias=False
    nn.init.constant_(last.bias, bias)
    return head


class CenterNet(nn.Module):
    """Backbone's stride-4 FPN map -> heatmap (K), size (2) and offset (2) heads; torchvision's detector interface."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "tiny",
        norm: str = "group",
        fpn_channels: int = 64,
        min_size: int | Sequence[int] = 512,
        max_size: int = 1024,
        max_detections: int = 500,
        score_thresh: float = 0.05,
        nms_thresh: float | None = 0.6,
    ) -> None:
        super().__init__()
        if num_classes < 1 or max_detections < 1:
            raise ValueError(
                f"num_classes and max_detections must be at least 1, got {num_classes} and {max_detections}"
            )
        self.num_classes, self.max_detections = num_classes, max_detections
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.transform = detection_transform(in_channels, min_size, max_size)
        # all levels, of which only the finest is read: the stride-4 map then carries the coarser levels' context
        self.backbone = build_backbone(backbone, in_channels, norm, fpn_channels, strides=STRIDES)
        channels = self.backbone.out_channels
        self.heatmap_head = _head(channels, num_classes, HEATMAP_PRIOR_BIAS)
        self.size_head = _head(channels, 2)
        self.offset_head = _head(channels, 2)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("CenterNet needs targets in training mode")
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        batch, targets = self.transform(images, box_targets(targets) if targets is not None else None)
        feature = self.backbone(batch.tensors)["0"]
        heatmap, size, offset = self.heatmap_head(feature), self.size_head(feature), self.offset_head(feature)
        if self.training:
            return self._losses(heatmap, size, offset, targets)
        valid = torch.zeros_like(heatmap[:, :1])
        for i, (h, w) in enumerate(batch.image_sizes):
            valid[i, :, : -(-h // CENTERNET_STRIDE), : -(-w // CENTERNET_STRIDE)] = 1
        detections = decode_centres(heatmap.sigmoid() * valid, size, offset, self.max_detections, self.score_thresh)
        for detection, image_size in zip(detections, batch.image_sizes):
            detection["boxes"] = clip_boxes_to_image(detection["boxes"], image_size)
            if self.nms_thresh is not None:
                keep = batched_nms(detection["boxes"], detection["scores"], detection["labels"], self.nms_thresh)
                detection.update({key: value[keep] for key, value in detection.items()})
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def _losses(
        self, heatmap: Tensor, size: Tensor, offset: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Focal loss on the heatmaps; L1 on size (weighted 0.1) and offset at the object centres, per object."""
        map_size = (heatmap.shape[-2], heatmap.shape[-1])
        rendered = [
            render_targets(t["boxes"], t["labels"], self.num_classes, map_size, crowd=t["iscrowd"]) for t in targets
        ]
        image = torch.cat([torch.full_like(r.index, i) for i, r in enumerate(rendered)])
        index = torch.cat([r.index for r in rendered])
        objects = max(len(index), 1)
        size_error = F.l1_loss(size.flatten(2)[image, :, index], torch.cat([r.size for r in rendered]), reduction="sum")
        offset_error = F.l1_loss(
            offset.flatten(2)[image, :, index], torch.cat([r.offset for r in rendered]), reduction="sum"
        )
        return {
            "loss_heatmap": centre_focal_loss(
                heatmap, torch.stack([r.heatmap for r in rendered]), torch.stack([r.ignore for r in rendered])
            ),
            "loss_size": SIZE_LOSS_WEIGHT * size_error / objects,
            "loss_offset": offset_error / objects,
        }


centernet = CenterNet  # the name the detector registry builds it by
