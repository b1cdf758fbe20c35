"""Training targets from label images: 2D (H, W) or 3D (D, H, W) integers, 0 = background.

Instance targets follow the torch-em convention (foreground, ``find_boundaries`` boundaries, per-object distances)
and come as float32 with a leading channel axis, ready to stack into a batch; ``postprocess`` turns predictions of
them back into instances. Semantic targets are int64 class maps without a channel axis, as cross-entropy wants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import find_boundaries

from deepscope.errors import DataError

BOUNDARY_MODES = ("thick", "inner", "outer")


def _prefix(name: str) -> str:
    return f"{name}: " if name else ""


def _checked(labels: np.ndarray, name: str) -> np.ndarray:
    """Refuse float/bool masks (a probability map or a binary mask is not a label image) and other dimensions."""
    prefix = _prefix(name)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{prefix}labels must be integers, got {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise DataError(f"{prefix}labels must be 2D (H, W) or 3D (D, H, W), got shape {labels.shape}")
    return labels


def _instances(labels: np.ndarray, name: str) -> np.ndarray:
    """As ``_checked``, and no negative ids: ``labels > 0`` would call them background but boundaries an object."""
    labels = _checked(labels, name)
    if labels.size and labels.min() < 0:
        raise DataError(f"{_prefix(name)}instance labels must not be negative, got {labels.min()}")
    return labels


def foreground(labels: np.ndarray, *, name: str = "") -> np.ndarray:
    """(1, *shape) float32: 1 inside any object."""
    return (_instances(labels, name) > 0).astype(np.float32)[None]


def boundaries(labels: np.ndarray, mode: str = "thick", *, name: str = "") -> np.ndarray:
    """(1, *shape) float32: ``find_boundaries(labels, mode=mode)`` with its default 1-connectivity.

    "thick" (the default, as torch-em) marks the pixels on both sides of every label change, so it also covers the
    background ring just outside each object, not only the foreground; "inner" keeps the object pixels only.
    """
    labels = _instances(labels, name)
    if mode not in BOUNDARY_MODES:
        raise DataError(f"{_prefix(name)}unknown boundary mode {mode!r}; choose one of {', '.join(BOUNDARY_MODES)}")
    return find_boundaries(labels, mode=mode).astype(np.float32)[None]


def foreground_and_boundaries(labels: np.ndarray, *, name: str = "") -> np.ndarray:
    """(2, *shape) float32: channel 0 foreground, channel 1 thick boundaries."""
    return np.concatenate([foreground(labels, name=name), boundaries(labels, name=name)])


def distance_map(labels: np.ndarray, normalize: bool = True, *, name: str = "") -> np.ndarray:
    """(1, *shape) float32: Euclidean distance of each object pixel to its own object's border.

    The inner boundary (every object pixel touching another label, background included) is cut away before the
    distance transform, so touching objects do not see each other as foreground; those border pixels get 0.
    With ``normalize`` each object is divided by its own maximum, so large and small objects both peak at 1.
    """
    labels = _instances(labels, name)
    distance = ndimage.distance_transform_edt((labels > 0) & ~find_boundaries(labels, mode="inner")).astype(np.float32)
    if normalize:
        # Per-object maxima indexed by position in the sorted ids, so sparse ids (say 10**9) cost no huge table.
        ids = np.unique(labels)
        peak = np.asarray(ndimage.maximum(distance, labels, ids), dtype=np.float32)[np.searchsorted(ids, labels)]
        distance = np.divide(distance, peak, out=np.zeros_like(distance), where=peak > 0)
    return distance[None]


def semantic_target(labels: np.ndarray, ignore_label: int | None = None, *, name: str = "") -> np.ndarray:
    """int64 class map (no channel axis); ``ignore_label`` becomes -1, the losses' ``ignore_index``."""
    target = _checked(labels, name).astype(np.int64)
    if ignore_label is not None:
        target[target == ignore_label] = -1
    return target


TARGETS: dict[str, Callable[..., np.ndarray]] = {
    "foreground": foreground,
    "boundaries": boundaries,
    "foreground_boundaries": foreground_and_boundaries,
    "distance": distance_map,
}


def make_target(kind: str, labels: np.ndarray, name: str = "") -> np.ndarray:
    """The instance target ``kind`` (a key of ``TARGETS``) with its default settings."""
    if kind not in TARGETS:
        raise DataError(f"{_prefix(name)}unknown target {kind!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[kind](labels, name=name)


# ---- the same targets for a batch of label patches on the training device ------------------------------------------


def batch_boundaries(labels: torch.Tensor) -> torch.Tensor:
    """(N, 1, *spatial) float: thick boundaries of (N, *spatial) labels, equal to ``boundaries`` on every sample.

    A pixel is on a thick boundary when one of its 1-connected neighbours has another label; pixels outside the
    patch count as copies of the edge, as in ``find_boundaries``.
    """
    edge = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for axis in range(1, labels.ndim):
        n = labels.shape[axis]
        if n < 2:
            continue
        change = labels.narrow(axis, 1, n - 1) != labels.narrow(axis, 0, n - 1)
        edge.narrow(axis, 1, n - 1).logical_or_(change)
        edge.narrow(axis, 0, n - 1).logical_or_(change)
    return edge.unsqueeze(1).float()


def batch_class_map(
    labels: torch.Tensor, class_values: Sequence[int] | None = None, ignore_label: int | None = None
) -> torch.Tensor:
    """int64 class indices of (N, *spatial) labels: ``class_values[k]`` becomes k (labels are the classes when None)
    and ``ignore_label`` becomes -1. A value that is neither a class nor ignored is an error naming it."""
    labels = labels.long()
    ignored = labels == ignore_label if ignore_label is not None else torch.zeros_like(labels, dtype=torch.bool)
    if class_values is None:
        classes = labels.clone()
    else:
        values = torch.as_tensor(sorted(class_values), dtype=torch.long, device=labels.device)
        order = torch.as_tensor(np.argsort(np.asarray(class_values)), dtype=torch.long, device=labels.device)
        position = torch.searchsorted(values, labels.contiguous()).clamp(max=len(values) - 1)
        unknown = (values[position] != labels) & ~ignored
        if bool(unknown.any()):
            raise DataError(f"label value {int(labels[unknown][0])} is not one of the classes {list(class_values)}")
        classes = order[position]
    classes[ignored] = -1
    return classes


def batch_target(kind: str, labels: torch.Tensor) -> torch.Tensor:
    """Instance target ``kind`` for (N, *spatial) labels on their device, (N, C, *spatial) float32.

    Foreground and boundaries are tensor operations; distances need a Euclidean distance transform, which only
    scipy provides, so they are computed on the CPU one sample at a time.
    """
    if kind == "foreground":
        return (labels > 0).unsqueeze(1).float()
    if kind == "boundaries":
        return batch_boundaries(labels)
    if kind == "foreground_boundaries":
        return torch.cat([(labels > 0).unsqueeze(1).float(), batch_boundaries(labels)], dim=1)
    if kind == "distance":
        maps = [distance_map(sample) for sample in labels.cpu().numpy()]
        return torch.from_numpy(np.stack(maps)).to(labels.device)
    raise DataError(f"unknown target {kind!r}; choose one of {', '.join(TARGETS)}")
