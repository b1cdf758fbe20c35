"""Metrics for instance segmentation: label images (2D or 3D integers, 0 = background, one positive id per object).

Objects are matched one to one by IoU at several thresholds, as in the DSB2018 challenge and StarDist's ``matching``;
variation of information and the adapted Rand error add pixel-level views of splits and merges. Two published
summaries come from the same overlaps: the Kaggle DSB2018 score and panoptic quality (Kirillov et al., CVPR 2019).

Matching rule at an IoU exactly equal to a threshold: the per-threshold counts (``match_counts``, the
``thresholds`` report) accept IoU >= t, as StarDist's ``matching``; the Kaggle score and panoptic quality
accept only IoU > t, as their definitions say ("greater than", "strictly greater than 0.5"). The two differ only
for pairs whose IoU is exactly a threshold, e.g. 12/20 at 0.6.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import skimage.metrics

from deepscope.data.io.volumes import match_by_stem, read_volume
from deepscope.errors import DataError

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))
KAGGLE_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5, 0.55, ..., 0.95


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


def _sparse_overlaps(
    truth: np.ndarray, pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    truth_ids, truth_area, pred_ids, pred_area = (
        truth_ids[truth_fg],
        truth_area[truth_fg],
        pred_ids[pred_fg],
        pred_area[pred_fg],
    )
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


def _max_matching(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Indices of the candidate pairs (rows[i], cols[i]) that form a maximum one-to-one matching.

    A pair whose truth and prediction have no other candidate is in every maximum matching, so only the
    conflicting rest (never any above a threshold of 0.5) goes to the assignment, which keeps its matrix small.
    """
    row_degree, col_degree = np.bincount(rows), np.bincount(cols)
    alone = (row_degree[rows] == 1) & (col_degree[cols] == 1)
    rest = np.flatnonzero(~alone)
    if not len(rest):
        return np.flatnonzero(alone)
    _, sub_rows = np.unique(rows[rest], return_inverse=True)
    _, sub_cols = np.unique(cols[rest], return_inverse=True)
    candidate = np.full((sub_rows.max() + 1, sub_cols.max() + 1), -1)
    candidate[sub_rows, sub_cols] = rest
    # Maximising the number of candidates assigned, not their summed IoU, which could prefer one
    # high-IoU match over two lower ones that both pass the threshold.
    # scipy.optimize takes a tenth of a second to import: when first scored
    from scipy.optimize import linear_sum_assignment

    assigned = candidate[linear_sum_assignment(candidate >= 0, maximize=True)]
    return np.concatenate([np.flatnonzero(alone), assigned[assigned >= 0]])


def _counts(
    rows: np.ndarray, cols: np.ndarray, ious: np.ndarray, n_truth: int, n_pred: int, thresholds: Sequence[float]
) -> dict[float, tuple[int, int, int]]:
    """``match_counts`` from overlaps already computed, so ``image_scores`` passes over the pixels once."""
    counts = {}
    for threshold in thresholds:
        ok = ious >= threshold
        tp = len(_max_matching(rows[ok], cols[ok]))
        counts[float(threshold)] = (tp, n_pred - tp, n_truth - tp)
    return counts


def match_counts(
    truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> dict[float, tuple[int, int, int]]:
    """(tp, fp, fn) per threshold; a pair can match when IoU >= threshold, as StarDist's ``matching``."""
    rows, cols, ious, truth_ids, pred_ids = _sparse_overlaps(truth, pred)
    return _counts(rows, cols, ious, len(truth_ids), len(pred_ids), thresholds)


def unmatched_ids(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(missed truth ids, spurious prediction ids) under ``match_counts``' rule, so they number its fn and fp."""
    rows, cols, ious, truth_ids, pred_ids = _sparse_overlaps(truth, pred)
    ok = np.flatnonzero(ious >= threshold)
    matched = ok[_max_matching(rows[ok], cols[ok])]
    return np.setdiff1d(truth_ids, truth_ids[rows[matched]]), np.setdiff1d(pred_ids, pred_ids[cols[matched]])


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


def _kaggle(ious: np.ndarray, n_truth: int, n_pred: int) -> float:
    """Mean over ``KAGGLE_THRESHOLDS`` of tp / (tp + fp + fn), a pair matching when its IoU is above the threshold.

    Above 0.5 a truth object and a prediction can each have at most one partner (two would each need more than
    half of it), so counting the pairs above a threshold is the one-to-one matching and needs no assignment.
    No truth and no prediction scores 1 (nothing to find, nothing invented); one side empty scores 0.
    """
    if not n_truth and not n_pred:
        return 1.0
    tp = (ious[None, :] > np.array(KAGGLE_THRESHOLDS)[:, None]).sum(axis=1)
    return float(np.mean(tp / (n_truth + n_pred - tp)))


def panoptic(iou_sum: float, tp: int, fp: int, fn: int) -> dict[str, float]:
    """Panoptic quality from matched-IoU sum and counts: SQ = mean matched IoU, RQ = tp / (tp + fp/2 + fn/2), PQ = SQ * RQ.

    Nothing on either side counts as perfect (1), as in the Kaggle score; with no match SQ is 0 (panopticapi).
    """
    if not tp + fp + fn:
        return {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    sq, rq = _ratio(iou_sum, tp), tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"pq": sq * rq, "sq": sq, "rq": rq}


def _panoptic_record(ious: np.ndarray, n_truth: int, n_pred: int) -> dict[str, float | int]:
    """Per-image PQ with the sums ``summarize`` pools; pairs match at IoU > 0.5, which is one to one (see ``_kaggle``)."""
    matched = ious[ious > 0.5]
    tp = len(matched)
    iou_sum = float(matched.sum())
    return {
        **panoptic(iou_sum, tp, n_pred - tp, n_truth - tp),
        "pq_iou_sum": iou_sum,
        "pq_tp": tp,
        "pq_fp": n_pred - tp,
        "pq_fn": n_truth - tp,
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


def image_scores(
    name: str, truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, Any]:
    """Matching counts and scores at every threshold, VOI, adapted Rand error, Kaggle score and PQ of one image.

    The matching scores all come from one overlap table, the costly pass over the pixels.
    """
    check_labels(truth, pred, name)
    rows, cols, ious, truth_ids, pred_ids = _sparse_overlaps(truth, pred)
    n_truth, n_pred = len(truth_ids), len(pred_ids)
    split, merge = variation_of_information(truth, pred)
    report = _threshold_report(_counts(rows, cols, ious, n_truth, n_pred, thresholds))
    return {
        "name": str(name),
        "thresholds": report,
        "voi_split": split,
        "voi_merge": merge,
        "arand": adapted_rand(truth, pred),
        "kaggle": _kaggle(ious, n_truth, n_pred),
        **_panoptic_record(ious, n_truth, n_pred),
    }


def summarize(per_image: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Data-set report from ``image_scores`` records; matching counts are summed over images before ratios are taken.

    Summing (StarDist's ``matching_dataset(..., by_image=False)``) weights every object equally, so an image
    with one object cannot swing the score as much as one with hundreds; PQ is pooled the same way (summed
    matched IoUs and counts). VOI, ARand and ``kaggle_score`` are means over images, the last as the challenge
    ranked entries, so there every image weighs the same whatever its number of objects.
    """
    if not per_image:
        raise DataError("no images to evaluate")
    keys = list(per_image[0]["thresholds"])
    totals = {
        # three counts: tp, fp, fn
        float(k): cast(
            tuple[int, int, int],
            tuple(int(sum(image["thresholds"][k][c] for image in per_image)) for c in ("tp", "fp", "fn")),
        )
        for k in keys
    }
    summed = _threshold_report(totals)
    return {
        "thresholds": summed,
        "mean_score": float(np.mean([entry["score"] for entry in summed.values()])),
        "voi_split": float(np.mean([image["voi_split"] for image in per_image])),
        "voi_merge": float(np.mean([image["voi_merge"] for image in per_image])),
        "arand": float(np.mean([image["arand"] for image in per_image])),
        "kaggle_score": float(np.mean([image["kaggle"] for image in per_image])),
        **panoptic(*(sum(image[k] for image in per_image) for k in ("pq_iou_sum", "pq_tp", "pq_fp", "pq_fn"))),
        "per_image": list(per_image),
    }


def evaluate_instances(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, Any]:
    """Data-set report as plain JSON for (name, truth, prediction) label images (see ``summarize``)."""
    return summarize([image_scores(name, truth, pred, thresholds) for name, truth, pred in pairs])


def evaluate_label_folders(
    pred_dir: str | Path, truth_dir: str | Path, thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, Any]:
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
