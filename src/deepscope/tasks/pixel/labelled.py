"""The scribbled images of a pixel-classification run: images matched to their sparse labels, and the labelled pixels
the forest is fitted on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepscope.data.io.views import channel_count
from deepscope.data.io.volumes import files_by_stem
from deepscope.data.scribbles import read_sparse_labels
from deepscope.data.segmentation.pairs import check_pair
from deepscope.errors import DataError, DeepscopeError
from deepscope.inference.blockio import open_input
from deepscope.tasks.pixel.config import PixelConfig


@dataclass
class LabelledImage:
    name: str
    source: Path
    image: Any  # as stored
    labels: np.ndarray  # sparse, 0 = unlabelled


def _files(path: Path, role: str) -> dict[str, Path]:
    if path.is_dir():
        found = files_by_stem(path)
        if not found:
            raise DataError(f"{path}: folder holds no {role}")
        return found
    if path.exists():
        return {path.stem: path}
    raise DataError(f"{path}: {role} not found")


def labelled_images(config: PixelConfig) -> list[LabelledImage]:
    """Images paired with their sparse labels by file name; every label file needs its image."""
    if not config.images or not config.labels:
        raise DeepscopeError("pixel train needs --images (file or folder) and --labels (file or folder)")
    images, labels = _files(Path(config.images), "images"), _files(Path(config.labels), "label images")
    if len(images) == 1 and len(labels) == 1:  # one file each: paired whatever their names
        labels = {next(iter(images)): next(iter(labels.values()))}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError(f"{config.labels}: no image for the label file(s) {', '.join(orphans[:5])} in {config.images}")
    items = []
    for stem, label_path in sorted(labels.items()):
        image = open_input(images[stem], config.raw_key)
        sparse = read_sparse_labels(label_path, config.label_key)
        check_pair(image, sparse, str(images[stem]), str(label_path), sparse.ndim, require_objects=False)
        items.append(LabelledImage(stem, images[stem], image, sparse))
    ndims = {item.labels.ndim for item in items}
    channels = {channel_count(item.image.shape, item.labels.ndim) for item in items}
    if len(ndims) > 1 or len(channels) > 1:
        raise DataError(
            f"{config.images}: all images must be 2D or all 3D, with one channel count; got "
            f"{sorted(ndims)}D and {sorted(channels)} channels"
        )
    return items


def labelled_indices(labels: np.ndarray) -> np.ndarray:
    """Flat indices of the labelled (nonzero) pixels. Sparse uint8 labels are scanned 8 pixels at a time, as 64-bit
    words, and only the nonzero words are looked into: a plain scan of a 4096x4096 label image takes 50 ms, which
    the live classifier of ``deepscope serve`` would pay at every stroke."""
    flat = np.ascontiguousarray(labels).ravel()
    if flat.dtype != np.uint8:
        return np.flatnonzero(flat)
    whole = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    candidates = np.concatenate([(words[:, None] * 8 + np.arange(8)).ravel(), np.arange(whole, flat.size)])
    return candidates[flat[candidates] != 0]


def training_pixels(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    where = labelled_indices(labels)
    x = np.asarray(features.reshape(features.shape[0], -1)[:, where]).T
    return np.ascontiguousarray(x, np.float32), labels.ravel()[where]
