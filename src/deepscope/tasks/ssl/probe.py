"""Linear probes of frozen self-supervised features at several label fractions, and the rows of the report table.

The linear probe is the standard measure of a self-supervised encoder (SimCLR, VICReg): a logistic regression on the
frozen pre-projection features. Training it on 1 % and 10 % of the labels as well as on all of them shows what the
features are worth when labels are scarce, which is why one would pre-train without labels in the first place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepscope.errors import DataError, DeepscopeError


def stratified_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random sample of about ``size`` items, each distinct label value drawn in proportion.

    Every value gets at least one item, so the sample can exceed ``size`` only when there are more values than ``size``;
    otherwise it has exactly ``size`` items (largest remainders decide which values get the rounding).
    """
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n = len(labels)
    size = min(n, max(int(size), len(values)))
    exact = counts * size / max(n, 1)
    quota = np.maximum(1, np.floor(exact)).astype(np.int64)
    remaining = size - int(quota.sum())
    if remaining > 0:
        quota[np.argsort(quota - exact, kind="stable")[:remaining]] += 1
    order = np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(inverse[order], kind="stable")]
    starts = np.cumsum(counts) - counts
    rank = np.arange(n) - starts[inverse[order]]
    return np.sort(order[rank < quota[inverse[order]]])


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified ``fraction`` of the labelled items (label >= 0), one per class at least."""
    if not 0 < fraction <= 1:
        raise DeepscopeError(f"label fraction must be in (0, 1], got {fraction}")
    labelled = np.flatnonzero(labels >= 0)
    if fraction == 1 or len(labelled) == 0:
        return labelled
    return labelled[stratified_indices(labels[labelled], round(fraction * len(labelled)), seed)]


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    fractions: Sequence[float],
    seed: int = 0,
) -> dict[float, float]:
    """Test accuracy of a logistic regression on frozen features, trained on ``label_subset(train_y, f, seed)`` for each f.

    Features are standardised with statistics of the training subset (without it lbfgs needs many more iterations on
    raw network features, whose scales differ widely between dimensions); C = 1 is scikit-learn's default, a mild L2
    penalty that keeps the 1 % fits from memorising a handful of images.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    test_mask = test_y >= 0
    if not (train_y >= 0).any():
        raise DataError("no labels in the training images (all are -1): the linear probe needs labelled images")
    if not test_mask.any():
        raise DataError("no labels in the test images (all are -1): the linear probe needs labelled images")
    test_x, test_y = test_x[test_mask], test_y[test_mask]
    result = {}
    for fraction in fractions:
        idx = label_subset(train_y, fraction, seed)
        if len(np.unique(train_y[idx])) < 2:
            raise DataError("only one class is labelled in the training images: the linear probe needs at least two")
        scaler = StandardScaler().fit(train_x[idx])
        model = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(train_x[idx]), train_y[idx])
        result[float(fraction)] = int((model.predict(scaler.transform(test_x)) == test_y).sum()) / len(test_y)
    return result


def fraction_name(fraction: float) -> str:
    """0.01 -> '1%', 0.1 -> '10%', 1.0 -> '100%'."""
    return f"{fraction * 100:.4g}%"


def probe_rows(results: dict[str, dict[float, float]], knn: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per encoder ("self-supervised", "random init", ...): its linear-probe accuracy per fraction, then kNN."""
    fractions = sorted({f for per_fraction in results.values() for f in per_fraction})
    names = list(results) + [name for name in knn or {} if name not in results]
    rows = []
    for name in names:
        row: dict[str, Any] = {"encoder": name}
        row.update({f"linear {fraction_name(f)}": results.get(name, {}).get(f, "") for f in fractions})
        if knn is not None:
            row["kNN"] = knn.get(name, "")
        rows.append(row)
    return rows
