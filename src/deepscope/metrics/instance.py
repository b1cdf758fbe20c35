"""Metrics for instance segmentation: label images (2D or 3D integers, 0 = background, one positive id per object).

Objects are matched one to one by IoU at several thresholds, as in the DSB2018 challenge and StarDist's ``matching``;
variation of information and the adapted Rand error add pixel-level views of splits and merges.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import skimage.metrics
from scipy.optimize import linear_sum_assignment

from deepscope.data.segmentation import match_by_stem, read_volume
from deepscope.errors import DataError

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))


def check_labels(truth: np.ndarray, pred: np.ndarray, name: str = "") -> None:
    """Refuse inputs that would give silently wrong metrics: other shapes, non-integer or negative labels."""
    prefix = f"{name}: " if name else ""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise DataError(f"{prefix}truth has shape {truth.shape} but prediction has shape {pred.shape}")
    for role, labels in (("truth", truth), ("prediction", pred)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{prefix}labels must be integers, got {labels.dtype} in the {role}")
        if labels.size and labels.min() < 0:
            raise DataError(f"{prefix}labels must not be negative, the {role} has {labels.min()}")


def _sparse_overlaps(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (truth, pred) pair as (rows, cols, ious), plus the object ids.

    Only pixels where both labels are foreground can contribute, so the pair codes are built from those alone;
    ``np.unique`` without ``return_inverse`` plus ``searchsorted`` on the overlap relabels ids to 0..n-1 several
    times faster than ``return_inverse`` on the whole image, which sorts every pixel with an argsort.
    """
    check_labels(truth, pred)
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    truth_ids, truth_area = np.unique(truth, return_counts=True)
    pred_ids, pred_area = np.unique(pred, return_counts=True)
    truth_fg, pred_fg = truth_ids > 0, pred_ids > 0
    truth_ids, truth_area, pred_ids, pred_area = truth_ids[truth_fg], truth_area[truth_fg], pred_ids[pred_fg], pred_area[pred_fg]
    both = (truth > 0) & (pred > 0)
    rows = np.searchsorted(truth_ids, truth[both]).astype(np.int64)
    cols = np.searchsorted(pred_ids, pred[both]).astype(np.int64)
    pairs, inter = np.unique(rows * len(pred_ids) + cols, return_counts=True)
    rows, cols = np.divmod(pairs, len(pred_ids))
    ious = inter / (truth_area[rows] + pred_area[cols] - inter)
    return rows, cols, ious, truth_ids, pred_ids


def overlap_table(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU matrix of shape (n_truth, n_pred), background excluded, with the object ids of its rows and columns."""
    rows, cols, ious, truth_ids, pred_ids = _sparse_overlaps(truth, pred)
    table = np.zeros((len(truth_ids), len(pred_ids)))
    table[rows, cols] = ious
    return table, truth_ids, pred_ids


def _max_matches(rows: np.ndarray, cols: np.ndarray) -> int:
    """Size of the maximum one-to-one matching among the candidate pairs (rows[i], cols[i]).

    A pair whose truth and prediction have no other candidate is in every maximum matching, so only the
    conflicting rest (never any above a threshold of 0.5) goes to the assignment, which keeps its matrix small.
    """
    row_degree, col_degree = np.bincount(rows), np.bincount(cols)
    alone = (row_degree[rows] == 1) & (col_degree[cols] == 1)
    rows, cols = rows[~alone], cols[~alone]
    if not len(rows):
        return int(alone.sum())
    _, rows = np.unique(rows, return_inverse=True)
    _, cols = np.unique(cols, return_inverse=True)
    candidate = np.zeros((rows.max() + 1, cols.max() + 1))
    candidate[rows, cols] = 1.0
    # Maximising the number of candidates assigned, not their summed IoU, which could prefer one
    # high-IoU match over two lower ones that both pass the threshold.
    assigned = linear_sum_assignment(candidate, maximize=True)
    return int(alone.sum() + candidate[assigned].sum())


def match_counts(
    truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> dict[float, tuple[int, int, int]]:
    """(tp, fp, fn) per threshold; a pair can match when IoU >= threshold, as StarDist's ``matching``."""
    rows, cols, ious, truth_ids, pred_ids = _sparse_overlaps(truth, pred)
    counts = {}
    for threshold in thresholds:
        ok = ious >= threshold
        tp = _max_matches(rows[ok], cols[ok])
        counts[float(threshold)] = (tp, len(pred_ids) - tp, len(truth_ids) - tp)
    return counts


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, F1 and the DSB2018/StarDist ``score`` (``accuracy`` there); 0/0 counts as 0."""
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "score": _ratio(tp, tp + fp + fn),
    }


def variation_of_information(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(split, merge) in bits: split = H(pred | truth) grows with over-segmentation, merge = H(truth | pred) with
    under-segmentation.

    Pixels that are background in the truth are ignored, as in ``adapted_rand`` (and the SNEMI3D/CREMI
    convention): a spurious object there costs nothing here, only in the matching's fp. Inside truth objects
    predicted background is one more predicted segment. With no truth object at all both are 0.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if not truth.any():
        return 0.0, 0.0
    # skimage returns (H(image1 | image0), H(image0 | image1)), i.e. false splits then false merges.
    split, merge = skimage.metrics.variation_of_information(truth, pred, ignore_labels=(0,))
    return float(split), float(merge)


def adapted_rand(truth: np.ndarray, pred: np.ndarray) -> float:
    """Adapted Rand error (SNEMI3D; 0 is perfect); truth background is ignored, and 0 with no truth object."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if not truth.any():
        return 0.0
    return float(skimage.metrics.adapted_rand_error(truth, pred, ignore_labels=(0,))[0])


def _threshold_report(counts: dict[float, tuple[int, int, int]]) -> dict[str, dict[str, float]]:
    return {f"{t:g}": {"tp": tp, "fp": fp, "fn": fn, **scores(tp, fp, fn)} for t, (tp, fp, fn) in counts.items()}


def image_scores(name: str, truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
    """Matching counts and scores at every threshold, VOI and adapted Rand error of one image."""
    check_labels(truth, pred, name)
    split, merge = variation_of_information(truth, pred)
    report = _threshold_report(match_counts(truth, pred, thresholds))
    return {"name": str(name), "thresholds": report, "voi_split": split, "voi_merge": merge, "arand": adapted_rand(truth, pred)}


def summarize(per_image: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Data-set report from ``image_scores`` records; matching counts are summed over images before ratios are taken.

    Summing (StarDist's ``matching_dataset(..., by_image=False)``) weights every object equally, so an image
    with one object cannot swing the score as much as one with hundreds. VOI and ARand are means over images.
    """
    if not per_image:
        raise DataError("no images to evaluate")
    keys = list(per_image[0]["thresholds"])
    totals = {float(k): tuple(int(sum(image["thresholds"][k][c] for image in per_image)) for c in ("tp", "fp", "fn")) for k in keys}
    summed = _threshold_report(totals)
    return {
        "thresholds": summed,
        "mean_score": float(np.mean([entry["score"] for entry in summed.values()])),
        "voi_split": float(np.mean([image["voi_split"] for image in per_image])),
        "voi_merge": float(np.mean([image["voi_merge"] for image in per_image])),
        "arand": float(np.mean([image["arand"] for image in per_image])),
        "per_image": list(per_image),
    }


def evaluate_instances(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, Any]:
    """Data-set report as plain JSON for (name, truth, prediction) label images (see ``summarize``)."""
    return summarize([image_scores(name, truth, pred, thresholds) for name, truth, pred in pairs])


def evaluate_label_folders(pred_dir: str | Path, truth_dir: str | Path, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
    """Score saved label images against the truth, files matched by name, so any tool's results can be compared.

    Images are read one pair at a time, so the folders may hold more than fits in memory.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    for folder in (pred_dir, truth_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found")
    pairs = match_by_stem(truth_dir, pred_dir, "truth", "prediction")
    report = evaluate_instances((path.stem, read_volume(path), read_volume(pred)) for path, pred in pairs)
    return {"pred": str(pred_dir), "truth": str(truth_dir), "images": len(pairs), **report}
