"""Pixel metrics of semantic output: a confusion matrix summed over images, then IoU and Dice per class.

Counts are summed before ratios are taken, so large images weigh by their pixels and a class missing from one image
does not produce an undefined per-image score.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion(truth: np.ndarray, pred: np.ndarray, classes: int, ignore: int = -1) -> np.ndarray:
    """(classes, classes) int64 counts, rows = truth, columns = prediction; pixels where truth is ``ignore`` are skipped."""
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    keep = truth != ignore
    codes = truth[keep].astype(np.int64) * classes + pred[keep].astype(np.int64)
    return np.bincount(codes, minlength=classes * classes).reshape(classes, classes)


def confusion_scores(matrix: np.ndarray, names: list[str] | None = None) -> dict[str, Any]:
    """IoU and Dice per class, their means over classes present in truth or prediction, and pixel accuracy."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    truth, pred = matrix.sum(1), matrix.sum(0)
    union = truth + pred - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    dice = np.divide(2 * tp, truth + pred, out=np.zeros_like(tp), where=present)
    names = names or [str(i) for i in range(len(tp))]
    return {
        "mean_iou": float(iou[present].mean()) if present.any() else 0.0,
        "mean_dice": float(dice[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / max(1.0, matrix.sum())),
        "per_class": {n: {"iou": float(i), "dice": float(d)} for n, i, d in zip(names, iou, dice)},
    }
