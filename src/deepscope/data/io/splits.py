"""Split folders (train/, val/, test/) and the seeded validation split of images when a data set has no val/."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

SPLITS = ("train", "val", "test")  # names of split folders, in this order


Item = TypeVar("Item")


def split_validation(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded random ``fraction`` of the images (at least one, never all) for validation; whole images, so no patch of a
    validation image is trained on."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]
