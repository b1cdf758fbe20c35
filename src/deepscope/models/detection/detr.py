"""DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers"): a fixed set of learned queries, each
decoded by a transformer into one box or "no object", trained by matching predictions to objects one to one.

The transformer is torch's own encoder and decoder layers (pre-norm, which trains more steadily from scratch than
the paper's post-norm); the decoder layers are run one by one rather than through ``nn.TransformerDecoder`` because
the auxiliary losses need every layer's output. As in the paper's minimal PyTorch listing, the sine positional
encoding is added to the image tokens once and the learned queries are the decoder's input. Torchvision has neither
the sine encoding nor the set loss, so both are written here; matching uses scipy's Hungarian solver and box costs
and losses come from ``torchvision.ops``. Class 0 is "no object", so labels 1..K index the class logits directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MLP, box_convert, clip_boxes_to_image, generalized_box_iou, generalized_box_iou_loss

from deepscope.models.detection.backbones import STRIDES, build_backbone, detection_transform
from deepscope.models.detection.centernet import box_targets

CLASS_COST, L1_COST, GIOU_COST = 1.0, 5.0, 2.0  # the paper's weights, for the matching costs and the losses alike
NO_OBJECT_WEIGHT = 0.1  # the paper's down-weighting of the many "no object" queries in the class loss


def sine_position_encoding(padding: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised sine encoding, (B, dim, H, W) for a (B, H, W) padding mask: half the channels encode y, half
    x, each as sines and cosines of the position counted over valid pixels only and scaled to [0, 2 pi]."""
    valid = (~padding).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    half = dim // 2
    frequency = temperature ** (2 * (torch.arange(half, device=padding.device) // 2) / half)
    py, px = y[..., None] / frequency, x[..., None] / frequency
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], dim=4).flatten(3)
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], dim=4).flatten(3)
    return torch.cat([py, px], dim=3).permute(0, 3, 1, 2)


@torch.no_grad()
def hungarian_match(
    logits: Tensor,
    boxes: Tensor,
    labels: Tensor,
    target_boxes: Tensor,
    class_cost: float = CLASS_COST,
    l1_cost: float = L1_COST,
    giou_cost: float = GIOU_COST,
) -> tuple[Tensor, Tensor]:
    """The one-to-one assignment of queries to objects with the least total cost: minus the class probability, the
    L1 distance of normalised (cx, cy, w, h) boxes and minus their generalised IoU. ``logits`` (Q, K+1), ``boxes``
    (Q, 4), ``labels`` (T,), ``target_boxes`` (T, 4); returns (query indices, object indices), sorted by query."""
    if len(labels) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return empty, empty
    cost = (
        -class_cost * logits.softmax(-1)[:, labels]
        + l1_cost * torch.cdist(boxes, target_boxes, p=1)
        - giou_cost
        * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
    )
    # imported by DETR's first matching
    from scipy.optimize import linear_sum_assignment

    queries, objects = linear_sum_assignment(cost.float().cpu().numpy())
    return torch.as_tensor(queries, device=logits.device), torch.as_tensor(objects, device=logits.device)


def set_losses(
    logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], no_object_weight: float = NO_OBJECT_WEIGHT
) -> dict[str, Tensor]:
    """The paper's weighted losses for one decoder layer's predictions, ``logits`` (B, Q, K+1) and ``boxes`` (B, Q, 4):
    cross-entropy over all queries (matched ones to their object's class, the rest to "no object"), and L1 and GIoU
    of the matched boxes, each divided by the number of objects in the batch. ``targets`` hold ``labels`` and
    ``boxes`` as normalised (cx, cy, w, h)."""
    matches = [hungarian_match(logit, box, t["labels"], t["boxes"]) for logit, box, t in zip(logits, boxes, targets)]
    image = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(matches)])
    query = torch.cat([query for query, _ in matches])
    target_classes = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    target_classes[image, query] = torch.cat([t["labels"][obj] for t, (_, obj) in zip(targets, matches)])
    class_weight = torch.ones(logits.shape[-1], device=logits.device)
    class_weight[0] = no_object_weight
    matched = boxes[image, query]
    wanted = torch.cat([t["boxes"][obj] for t, (_, obj) in zip(targets, matches)])
    objects = max(len(wanted), 1)
    giou = generalized_box_iou_loss(
        box_convert(matched, "cxcywh", "xyxy"), box_convert(wanted, "cxcywh", "xyxy"), reduction="sum"
    )
    return {
        "loss_ce": CLASS_COST * F.cross_entropy(logits.transpose(1, 2), target_classes, weight=class_weight),
        "loss_bbox": L1_COST * F.l1_loss(matched, wanted, reduction="sum") / objects,
        "loss_giou": GIOU_COST * giou / objects,
    }


class DETR(nn.Module):
    """Backbone map at ``stride`` -> 1x1 projection + sine positions -> transformer encoder-decoder over learned
    queries -> class (K+1, index 0 "no object") and box (sigmoid cx, cy, w, h of the image) heads."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "resnet18",
        norm: str = "group",
        fpn_channels: int = 128,
        stride: int = 32,
        hidden_dim: int = 128,
        num_queries: int = 100,
        enc_layers: int = 3,
        dec_layers: int = 3,
        heads: int = 8,
        dim_feedforward: int = 512,
        dropout: float = 0.1,
        min_size: int | Sequence[int] = 512,
        max_size: int = 1024,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        if stride not in (16, 32):
            raise ValueError(f"stride must be 16 or 32, got {stride}")
        if hidden_dim % 4 or hidden_dim % heads:
            raise ValueError(f"hidden_dim must be a multiple of 4 and of heads ({heads}), got {hidden_dim}")
        if num_classes < 1 or not 1 <= max_detections <= num_queries:
            raise ValueError(
                f"need num_classes >= 1 and 1 <= max_detections <= num_queries ({num_queries}), "
                f"got {num_classes} and {max_detections}"
            )
        self.stride, self.max_detections = stride, max_detections
        self.transform = detection_transform(in_channels, min_size, max_size)
        # the coarser levels too, so a stride-16 map carries stride-32 context through the FPN's top-down path
        self.backbone = build_backbone(
            backbone, in_channels, norm, fpn_channels, tuple(s for s in STRIDES if s >= stride)
        )
        self.input_proj = nn.Conv2d(self.backbone.out_channels, hidden_dim, 1)
        layer: dict[str, Any] = {
            "d_model": hidden_dim,
            "nhead": heads,
            "dim_feedforward": dim_feedforward,
            "dropout": dropout,
            "batch_first": True,
            "norm_first": True,
        }
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer), enc_layers, norm=nn.LayerNorm(hidden_dim), enable_nested_tensor=False
        )
        self.decoder_layers = nn.ModuleList(nn.TransformerDecoderLayer(**layer) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_dim))
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        self.box_head = MLP(hidden_dim, [hidden_dim, hidden_dim, 4])

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("DETR needs targets in training mode")
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        batch, targets = self.transform(images, box_targets(targets) if targets is not None else None)
        layers = self._decode(batch.tensors, batch.image_sizes)
        if self.training:
            normalised = [_normalised_targets(t, size) for t, size in zip(targets, batch.image_sizes)]
            losses = [set_losses(logits, boxes, normalised) for logits, boxes in layers]
            # auxiliary losses folded in per kind; sum of at least one tensor (one per decoder layer)
            return {key: cast(Tensor, sum(layer[key] for layer in losses)) for key in losses[0]}
        logits, boxes = layers[-1]
        return self.transform.postprocess(
            self._detections(logits, boxes, batch.image_sizes), batch.image_sizes, original_sizes
        )

    def _decode(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        """(class logits, boxes) after every decoder layer, the last one's last."""
        feature = self.input_proj(self.backbone(images)["0"])
        padding = torch.ones(feature.shape[0], *feature.shape[-2:], dtype=torch.bool, device=feature.device)
        for i, (h, w) in enumerate(image_sizes):
            padding[i, : -(-h // self.stride), : -(-w // self.stride)] = False
        tokens = (feature + sine_position_encoding(padding, feature.shape[1])).flatten(2).transpose(1, 2)
        padding = padding.flatten(1)
        memory = self.encoder(tokens, src_key_padding_mask=padding)
        hidden = self.queries.expand(len(images), -1, -1)
        outputs = []
        for layer in self.decoder_layers:
            hidden = layer(hidden, memory, memory_key_padding_mask=padding)
            normed = self.decoder_norm(hidden)
            outputs.append((self.class_head(normed), self.box_head(normed).sigmoid()))
        return outputs

    def _detections(self, logits: Tensor, boxes: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """The ``max_detections`` queries with the best object class, boxes in the resized image's pixels."""
        scores, labels = logits.softmax(-1)[..., 1:].max(-1)
        detections = []
        for score, label, box, (h, w) in zip(scores, labels, boxes, image_sizes):
            top = score.topk(self.max_detections).indices
            pixels = box_convert(box[top], "cxcywh", "xyxy") * box.new_tensor([w, h, w, h])
            detections.append(
                {"boxes": clip_boxes_to_image(pixels, (h, w)), "scores": score[top], "labels": label[top] + 1}
            )
        return detections


def _normalised_targets(target: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
    """Non-crowd objects with boxes as (cx, cy, w, h) divided by the image's width and height, as the box head predicts."""
    h, w = image_size
    keep = ~target["iscrowd"]
    boxes = box_convert(target["boxes"][keep].float(), "xyxy", "cxcywh")
    return {"labels": target["labels"][keep], "boxes": boxes / boxes.new_tensor([w, h, w, h])}


detr = DETR  # the name the detector registry builds it by
