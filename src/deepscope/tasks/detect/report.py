"""The detect run's report: mAP tables, precision-recall curves, the best score threshold, the worst images drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from deepscope.data.detection.types import DetItem
from deepscope.data.io.images import read_image
from deepscope.engine.report import table
from deepscope.tasks.detect.draw import detection_gallery, plot_pr_curves

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def image_f1(truth: DetItem, pred: dict[str, np.ndarray], threshold: float, iou: float = 0.5) -> float:
    """F1 of one image's detections above ``threshold`` at IoU ``iou`` (class-aware, greedy by score), only to rank
    images for the report: the metric itself is COCO's. Crowd objects are left out of both sides' counts."""
    keep = pred["scores"] >= threshold
    boxes, labels = torch.as_tensor(pred["boxes"][keep]), torch.as_tensor(pred["labels"][keep])
    real = ~truth.crowd
    gt_boxes, gt_labels = torch.as_tensor(truth.boxes[real]), torch.as_tensor(truth.labels[real])
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return 1.0 if len(boxes) == len(gt_boxes) else 0.0
    overlap = box_iou(boxes, gt_boxes) * (labels[:, None] == gt_labels[None, :])
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
    hits = 0
    for row in overlap:  # predictions come sorted by score
        row = row.masked_fill(matched, 0)
        best = int(row.argmax())
        if row[best] >= iou:
            matched[best] = True
            hits += 1
    return 2 * hits / (len(boxes) + len(gt_boxes))


def score_threshold(metrics: dict[str, Any]) -> float:
    """The score threshold pictures use: the median over classes of the one maximising F1 at IoU 0.5 (0.5 without)."""
    thresholds = [
        c["threshold"] for c in (metrics.get("best_f1") or {}).values() if c and c.get("threshold") is not None
    ]
    return float(np.median(thresholds)) if thresholds else 0.5


def draw_worst(
    pairs: Sequence[tuple[DetItem, dict[str, np.ndarray]]],
    class_names: list[str],
    metrics: dict[str, Any],
    path: Path,
    count: int,
) -> None:
    """Truth (green) and detections above the best-F1 threshold (magenta) on the ``count`` images of lowest F1."""
    if not pairs:
        return
    threshold = score_threshold(metrics)
    scored = sorted(((image_f1(item, pred, threshold), i) for i, (item, pred) in enumerate(pairs)))[:count]
    shown = []
    for f1, i in scored:
        item, pred = pairs[i]
        truth = {"boxes": item.boxes, "labels": item.labels}
        shown.append(
            (item.name, read_image(item.path), truth, pred, f"{item.name}: F1 {f1:.2f} ({len(item.boxes)} objects)")
        )
    detection_gallery(shown, path, class_names, score_threshold=threshold)


def detect_report_sections(
    final: dict[str, Any], split: str, class_names: list[str], run_dir: Path
) -> list[tuple[str, str]]:
    """Sections of ``report.html``: COCO and VOC-style scores, per-class AP, PR curves, the best threshold, pictures."""
    if not final:
        return []
    limit = final.get("max_detections", 100)
    rows = [{"metric": k, "value": final[k]} for k in COCO_KEYS if k in final]
    rows += [
        {"metric": k, "value": v}
        for k, v in final.items()
        if k.startswith(("voc_ap", "mask_map", "map_maxdets", "mar_")) and k not in COCO_KEYS
    ]
    sections = [(f"{split.capitalize()} mAP (COCO, at most {limit} detections per image)", table(rows))]
    if final.get("per_class"):
        sections.append(
            ("AP per class (IoU 0.5:0.95)", table([{"class": k, "AP": v} for k, v in final["per_class"].items()]))
        )
    curves = final.get("pr")
    if curves:
        plot_pr_curves(
            {name: (np.asarray(c["recall"]), np.asarray(c["precision"])) for name, c in curves.items()},
            run_dir / "pr_curves.png",
        )
        sections.append(("Precision-recall at IoU 0.5", "<img src='pr_curves.png' alt='precision-recall curves'>"))
    best = {name: c for name, c in (final.get("best_f1") or {}).items() if c}
    if best:
        text = (
            "<p>Per class, the score threshold that maximises F1 at IoU 0.5 (use it as --score-threshold when counting "
            "objects; mAP itself uses every detection):</p>"
        )
        sections.append(("Best score threshold", text + table([{"class": name, **c} for name, c in best.items()])))
    if (run_dir / "detections.png").exists():
        caption = "truth green, detections above the best threshold magenta; lowest per-image F1 first"
        sections.append(
            (f"Detections ({split} images)", f"<p>{caption}</p><img src='detections.png' alt='detections'>")
        )
    return sections
