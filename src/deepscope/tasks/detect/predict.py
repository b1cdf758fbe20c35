"""Applying a detector to whole images or to large images tile by tile, and writing its detections as COCO, VOC or YOLO.

Tiled prediction follows the usual rule for detection on overlapping tiles (as SAHI and the remote-sensing
literature do it): every tile claims a *core* region, the tile minus half the overlap on each side it shares with a
neighbour, so that the cores of all tiles partition the image; a tile keeps only the boxes whose centre lies in its
core. An object smaller than the overlap lies whole in the tile that claims its centre, while the piece of it cut by
another tile's border has its centre outside that tile's core and is dropped. Class-wise NMS (or weighted box fusion)
then removes the duplicates left by objects larger than the overlap, and by the model's own near-duplicates.

Images are read tile by tile from the numpy array, so memory follows the tile, not the image. Masks are kept cropped
to their extent until the end and only then pasted into full-size boolean masks, for the kept detections only; since
those are (M, H, W), masks are refused on images above ``MAX_MASK_PIXELS`` rather than allocating gigabytes.
"""

from __future__ import annotations

import itertools
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms, box_iou

from deepscope.atomic import write_text
from deepscope.errors import DataError, DeepscopeError
from deepscope.metrics.coco_files import detections_to_coco
from deepscope.models import eval_mode

MERGES = ("nms", "wbf")
MAX_MASK_PIXELS = 4096 * 4096  # full-size masks of 100 detections on a larger image would need over 1.6 GB
Window = tuple[int, int, int, int, float, float, float, float]  # y0, y1, x0, x1 in pixels; core y_lo, y_hi, x_lo, x_hi
MaskCrop = tuple[np.ndarray, int, int]  # a boolean mask cut to its extent, and the image pixel (y, x) of its corner


@dataclass
class DetInferenceConfig:
    """How detections are made from a model's raw output."""

    # detections below are dropped (0.05 for mAP, as COCO evaluations do; raise it for pictures)
    score_threshold: float = 0.05
    # IoU above which boxes of one class are duplicates (the model's own NMS and the class-wise NMS after tiles): 0.7
    # as ultralytics validates and predicts; on Penn-Fudan the same weights of FCOS on the CSP trunk score 0.003-0.020
    # box mAP more than at 0.5, of FCOS on ResNet-18 within 0.003 (benchmarks/RESULTS.md, detect_ablation)
    nms_iou: float = 0.7
    # per image, highest scores first; None: the model's own limit (a training run plans it from the data)
    max_detections: int | None = None
    tile: list[int] | None = None  # [h, w] tile size for large images; None: the whole image in one call
    overlap: int = 64  # pixels shared by neighbouring tiles; objects smaller than this are never cut
    merge: str = "nms"  # nms | wbf: how boxes found more than once are merged
    mask_threshold: float = 0.5  # mask probability above which a pixel belongs to the object

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise DeepscopeError(f"inference: unknown merge {self.merge!r}; choose one of {', '.join(MERGES)}")
        if self.tile is not None and (len(self.tile) != 2 or min(self.tile) <= self.overlap):
            raise DeepscopeError(
                f"inference: tile must be [height, width], both larger than the overlap {self.overlap}, got {self.tile}"
            )
        if not (0 <= self.score_threshold <= 1 and 0 < self.nms_iou <= 1):
            raise DeepscopeError(
                f"inference: score_threshold must be in [0, 1] and nms_iou in (0, 1], got {self.score_threshold:g} "
                f"and {self.nms_iou:g}"
            )
        if self.overlap < 0 or (self.max_detections is not None and self.max_detections < 1):
            raise DeepscopeError(
                f"inference: overlap must be >= 0 and max_detections >= 1, got {self.overlap}, {self.max_detections}"
            )


def _axis_windows(size: int, tile: int, overlap: int) -> list[tuple[int, int, float, float]]:
    """(start, stop, core_lo, core_hi) of the tiles along one axis. Tiles are all ``tile`` long, the last one flush with
    the image end (it may overlap its neighbour by more); the core boundary between two tiles is the middle of their
    overlap, and the outer cores reach to infinity so that a box on the image border is always claimed."""
    if size <= tile:
        return [(0, size, -math.inf, math.inf)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    cuts = [(nxt + start + tile) / 2 for start, nxt in itertools.pairwise(starts)]
    return [(s, s + tile, lo, hi) for s, lo, hi in zip(starts, [-math.inf] + cuts, cuts + [math.inf])]


def merge_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices of the boxes kept, their boxes, their scores), highest score first.

    ``nms`` keeps the best box of each group of same-class boxes overlapping by more than ``iou``. ``wbf`` replaces it
    by the score-weighted mean of its group, with the group's mean score (weighted box fusion, Solovyev et al. 2021,
    with NMS's groups: each box joins the best kept box that suppressed it). Written here because the one package
    that does it, ensemble-boxes, is unmaintained; this is four vectorised lines on top of torchvision's NMS.
    """
    keep = batched_nms(boxes, scores, labels, iou)
    if method == "nms" or len(keep) == 0:
        return keep, boxes[keep], scores[keep]
    claims = (box_iou(boxes[keep], boxes) > iou) & (labels[keep, None] == labels[None])
    claims[torch.arange(len(keep)), keep] = True  # a kept (even zero-area) box always belongs to its own group
    owner = claims.float().argmax(0)  # first, i.e. best, kept box claiming each box: the one NMS suppressed it with
    weight = torch.zeros(len(keep), dtype=scores.dtype).index_add_(0, owner, scores)
    fused = torch.zeros(len(keep), 4, dtype=boxes.dtype).index_add_(0, owner, boxes * scores[:, None]) / weight[:, None]
    fused_scores = weight / torch.zeros(len(keep), dtype=scores.dtype).index_add_(0, owner, torch.ones_like(scores))
    order = fused_scores.argsort(descending=True)
    return keep[order], fused[order], fused_scores[order]


def _mask_extent(masks: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) bounding each boolean mask (an empty mask gives an empty extent), found on the masks' device."""
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[1:]
    y0, x0 = rows.int().argmax(1), cols.int().argmax(1)
    y1, x1 = h - rows.flip(1).int().argmax(1), w - cols.flip(1).int().argmax(1)
    empty = ~rows.any(1)
    y1, x1 = torch.where(empty, y0, y1), torch.where(empty, x0, x1)
    return [tuple(v) for v in torch.stack([y0, y1, x0, x1], 1).tolist()]


def image_tensor(block: np.ndarray, device: torch.device) -> torch.Tensor:
    """(C, h, w) float in [0, 1] on ``device`` of an (h, w, C) block: integers are divided by their dtype's maximum,
    floats kept."""
    scale = float(np.iinfo(block.dtype).max) if np.issubdtype(block.dtype, np.integer) else 1.0
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(block, -1, 0), dtype=np.float32)).to(device) / scale


class Detector:
    """A detection model applied to (H, W, C) numpy images: whole, or tile by tile when the image exceeds ``tile``,
    ``batch_size`` tiles per model call."""

    def __init__(
        self,
        model: nn.Module,
        config: DetInferenceConfig,
        device: torch.device,
        masks: bool = False,
        batch_size: int = 4,
    ) -> None:
        if batch_size < 1:
            raise DeepscopeError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.config, self.device = model.to(device), config, torch.device(device)
        self.masks, self.batch_size = masks, batch_size

    def windows(self, height: int, width: int) -> list[Window]:
        """The tiles of an image (one window over all of it without ``tile``), with the core region each claims."""
        tile_h, tile_w = self.config.tile or (height, width)
        rows = _axis_windows(height, tile_h, self.config.overlap)
        cols = _axis_windows(width, tile_w, self.config.overlap)
        return [
            (y0, y1, x0, x1, ylo, yhi, xlo, xhi)
            for (y0, y1, ylo, yhi), (x0, x1, xlo, xhi) in itertools.product(rows, cols)
        ]

    def _candidates(
        self, window: Window, out: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[MaskCrop]]:
        """Boxes (in image pixels), scores and labels of one tile that pass the score threshold and lie in its core, and
        their masks as (crop, y, x) in image pixels when masks are wanted."""
        y0, _, x0, _, ylo, yhi, xlo, xhi = window
        boxes = out["boxes"].detach().float().cpu() + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        scores, labels = out["scores"].detach().float().cpu(), out["labels"].detach().cpu().long()
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        keep = (scores >= self.config.score_threshold) & (cx >= xlo) & (cx < xhi) & (cy >= ylo) & (cy < yhi)
        # no degenerate box reaches the files or the metric
        keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        crops = []
        if self.masks:
            if "masks" not in out:
                raise DeepscopeError("masks were asked for but the model gives none (it is a box-only detector)")
            masks = out["masks"][keep.to(out["masks"].device), 0] > self.config.mask_threshold
            crops = [(m[a:b, c:d].cpu().numpy(), y0 + a, x0 + c) for m, (a, b, c, d) in zip(masks, _mask_extent(masks))]
        return boxes[keep], scores[keep], labels[keep], crops

    @torch.no_grad()
    def __call__(self, image: np.ndarray, progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
        """Detections of one (H, W, C) or (H, W) image: ``boxes`` (M, 4) float32 xyxy in image pixels, ``scores`` (M,),
        ``labels`` (M,) int64 in 1..K, highest score first, and with ``masks`` (M, H, W) bool when asked for.
        ``progress(done, total)`` hears of every batch of tiles done."""
        image = image[..., None] if image.ndim == 2 else image
        if image.ndim != 3:
            raise DataError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
        height, width = image.shape[:2]
        if self.masks and height * width > MAX_MASK_PIXELS:
            raise DeepscopeError(
                f"image of {height}x{width} pixels is too large for full-size masks "
                f"(at most {MAX_MASK_PIXELS} pixels); predict boxes only"
            )
        windows, found = self.windows(height, width), []
        with eval_mode(self.model):
            for i in range(0, len(windows), self.batch_size):
                batch = windows[i : i + self.batch_size]
                outputs = self.model([image_tensor(image[y0:y1, x0:x1], self.device) for y0, y1, x0, x1, *_ in batch])
                found += [self._candidates(window, out) for window, out in zip(batch, outputs)]
                if progress is not None:
                    progress(len(found), len(windows))
        boxes, scores, labels = (
            torch.cat([f[0] for f in found]),
            torch.cat([f[1] for f in found]),
            torch.cat([f[2] for f in found]),
        )
        keep, boxes, scores = merge_detections(boxes, scores, labels, self.config.nms_iou, self.config.merge)
        top = slice(self.config.max_detections)
        keep, boxes, scores = keep[top], boxes[top], scores[top]
        result: dict[str, np.ndarray] = {
            "boxes": boxes.numpy().astype(np.float32),
            "scores": scores.numpy().astype(np.float32),
            "labels": labels[keep].numpy().astype(np.int64),
        }
        if self.masks:
            crops = [c for f in found for c in f[3]]
            result["masks"] = np.zeros((len(keep), height, width), bool)
            for mask, k in zip(result["masks"], keep.tolist()):
                crop, y, x = crops[k]
                mask[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
        return result


def predict_items(detector: Detector, images: Iterable[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    """One record per (file name, image), as the writers below take them: ``id`` (1, 2, ...), ``file_name``,
    ``width``, ``height`` and the image's ``detections``."""
    records = []
    for index, (name, image) in enumerate(images, 1):
        try:
            found = detector(image)
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from None
        records.append(
            {
                "id": index,
                "file_name": name,
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "detections": found,
            }
        )
    return records


# ---- files -------------------------------------------------------------------------------------------------------


def _boxes(record: dict[str, Any]) -> Iterable[tuple[list[float], int, float]]:
    """(x1 y1 x2 y2, label, score) of each detection of a record."""
    found = record["detections"]
    return zip(found["boxes"].tolist(), found["labels"].tolist(), found["scores"].tolist())


def write_coco(path: str | Path, records: Sequence[dict[str, Any]], class_names: list[str]) -> Path:
    """A COCO file of the records: images, categories and the detections as annotations with a ``score`` (and an RLE
    ``segmentation`` when the detections have masks)."""
    path = Path(path)
    images = [{k: r[k] for k in ("id", "file_name", "width", "height")} for r in records]
    coco = detections_to_coco(images, class_names, [r["detections"] for r in records], masks_rle=True)
    write_text(path, json.dumps(coco), "prediction")
    return path


def write_voc_xml(folder: str | Path, records: Sequence[dict[str, Any]], class_names: list[str]) -> Path:
    """One Pascal VOC ``<stem>.xml`` per image in ``folder``, boxes 1-based and inclusive as VOC stores them
    (xmin = x1 + 1, xmax = x2), with each object's ``<score>`` added (VOC readers ignore unknown tags)."""
    folder = Path(folder)
    for record in records:
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = record["file_name"]
        size = ET.SubElement(root, "size")
        for key in ("width", "height"):
            ET.SubElement(size, key).text = str(record[key])
        for (x1, y1, x2, y2), label, score in _boxes(record):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = class_names[label - 1]
            ET.SubElement(obj, "score").text = f"{score:.5f}"
            ET.SubElement(obj, "difficult").text = "0"
            bndbox = ET.SubElement(obj, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1 + 1, y1 + 1, x2, y2)):
                ET.SubElement(bndbox, key).text = f"{value:.2f}"
        ET.indent(root)
        write_text(
            folder / f"{Path(record['file_name']).stem}.xml", ET.tostring(root, encoding="unicode") + "\n", "prediction"
        )
    return folder


def write_yolo_txt(folder: str | Path, records: Sequence[dict[str, Any]], scores: bool = True) -> Path:
    """One ``<stem>.txt`` per image in ``folder``, a line per box: 0-based class, centre x, centre y, width, height
    normalised by the image size, then the score: the 6-field format of Ultralytics'
    ``predict(save_txt=True, save_conf=True)``. ``scores=False`` writes the 5-field YOLO label format instead, for
    using detections as training labels."""
    folder = Path(folder)
    for record in records:
        w, h = record["width"], record["height"]
        lines = []
        for (x1, y1, x2, y2), label, score in _boxes(record):
            fields = [
                str(label - 1),
                *(f"{v:.6f}" for v in ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)),
            ]
            lines.append(" ".join(fields + ([f"{score:.5f}"] if scores else [])))
        write_text(
            folder / f"{Path(record['file_name']).stem}.txt", "".join(line + "\n" for line in lines), "prediction"
        )
    return folder
