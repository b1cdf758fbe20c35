"""Paired images and label images for segmentation, 2D or 3D: finding and checking the pairs, and random patches from them.

Layouts follow :mod:`deepscope.data.io.volumes`: 2D images (H, W) or (H, W, C), 3D (D, H, W) or (C, D, H, W); label
images never have a channel axis. Patches come out channels-first, (C, *patch_shape), as models expect. Volumes in
HDF5 or zarr are opened lazily, so that :class:`PatchSampler` reads only the patches it needs; a volume larger than
memory is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepscope.data.io.splits import SPLITS
from deepscope.data.io.volumes import match_by_stem, spatial_shape
from deepscope.errors import DataError

LABEL_FOLDERS = ("masks", "labels")


def _label_dir(folder: Path, labels: str | None) -> Path:
    """The label folder beside ``folder/images``: ``labels`` when given, else the one of masks/ and labels/ present.

    Both are there in a folder served by ``deepscope serve`` (painted class labels in labels/, proofread instance
    masks in masks/), so with both and no choice the error names the setting that chooses.
    """
    if labels is not None:
        if not (folder / labels).is_dir():
            raise DataError(f"{folder}: no {labels}/ folder next to images/ (the label folder chosen with --labels)")
        return folder / labels
    label_dirs = [folder / name for name in LABEL_FOLDERS if (folder / name).is_dir()]
    if not label_dirs:
        raise DataError(f"{folder}: no masks/ or labels/ folder next to images/")
    if len(label_dirs) > 1:
        raise DataError(
            f"{folder}: both masks/ and labels/ found; choose the label folder with --labels masks or "
            "--labels labels (labels: in a config file)"
        )
    return label_dirs[0]


def _pairs_in(folder: Path, labels: str | None) -> list[tuple[Path, Path]]:
    """(image, label) paths of ``folder/images`` and its label folder (see :func:`_label_dir`), sorted by name."""
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise DataError(
            f"{folder}: no images/ folder (expected images/ and masks/ or labels/, maybe in train/, val/, test/)"
        )
    return match_by_stem(images_dir, _label_dir(folder, labels), "image", "label")


def find_pairs(root: str | Path, labels: str | None = None) -> dict[str, list[tuple[Path, Path]]]:
    """(image, label) paths per split: ``root/{train,val,test}/images|masks`` if split folders exist, else "all";
    ``labels`` names the label folder (masks, labels or another) where the choice is not clear."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        return {"all": _pairs_in(root, labels)}
    return {split: _pairs_in(root / split, labels) for split in splits}


def _has_objects(labels: Any) -> bool:
    """Any non-zero label, read one slab at a time so a lazy volume is never held whole."""
    step = max(1, 2**24 // max(1, int(np.prod(labels.shape[1:], dtype=np.int64))))
    return any(np.any(np.asarray(labels[i : i + step])) for i in range(0, labels.shape[0], step))


def check_pair(
    image: Any, labels: Any, image_name: str, label_name: str, ndim: int, require_objects: bool = True
) -> tuple[int, ...]:
    """Check an image and its labels can train a ``ndim``-D model; returns their spatial shape.

    ``require_objects`` refuses label images without any non-zero label (instance labels; class maps may be all 0).

    Works on numpy arrays and lazy HDF5/zarr volumes alike (only ``labels`` is read, slab by slab).
    """
    if ndim not in (2, 3):
        raise DataError(f"{image_name}: models are 2D or 3D, got ndim={ndim}")
    if labels.ndim != ndim:
        if ndim == 2 and labels.ndim == 3:
            raise DataError(f"{label_name}: 3D volume given to a 2D model (labels have shape {tuple(labels.shape)})")
        raise DataError(f"{label_name}: labels must be {ndim}D, got shape {tuple(labels.shape)}")
    if image.ndim not in (ndim, ndim + 1):
        layout = "(H, W) or (H, W, C)" if ndim == 2 else "(D, H, W) or (C, D, H, W)"
        raise DataError(f"{image_name}: expected a {ndim}D image {layout}, got shape {tuple(image.shape)}")
    if spatial_shape(image.shape, ndim) != tuple(labels.shape):
        raise DataError(
            f"{image_name}: image shape {tuple(image.shape)} does not match labels {label_name} {tuple(labels.shape)}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{label_name}: labels must be integers, got {labels.dtype}")
    if np.dtype(image.dtype).kind not in "biuf":
        raise DataError(f"{image_name}: image values must be real numbers, got {image.dtype}")
    if require_objects and not _has_objects(labels):
        raise DataError(f"{label_name}: empty label image (no objects)")
    return tuple(labels.shape)


class PatchSampler:
    """Random patches from (image, labels) pairs, reading only the patch region of each (lazy) volume.

    A pair is drawn with probability proportional to its volume, so every voxel is about equally likely to be
    seen, unless ``weights`` gives its own per-pair probabilities (scaled to sum to 1), e.g. to balance groups of
    images; patches whose foreground fraction is below ``min_foreground`` are redrawn, up to ``max_tries`` times.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Any, Any]],
        patch_shape: Sequence[int],
        min_foreground: float = 0.0,
        max_tries: int = 50,
        rng: np.random.Generator | None = None,
        names: Sequence[str] | None = None,
        weights: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        if not pairs:
            raise DataError("PatchSampler needs at least one (image, labels) pair")
        self.pairs = list(pairs)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        self.ndim = len(self.patch_shape)
        self.min_foreground = float(min_foreground)
        self.max_tries = int(max_tries)
        if self.max_tries < 1 or not 0.0 <= self.min_foreground <= 1.0:
            raise DataError(
                f"max_tries must be >= 1 and min_foreground in [0, 1], got {max_tries} and {min_foreground}"
            )
        self.rng = rng if rng is not None else np.random.default_rng()
        self.names = list(names) if names is not None else [f"pair {i}" for i in range(len(self.pairs))]
        self.shapes: list[tuple[int, ...]] = []
        for (image, labels), name in zip(self.pairs, self.names):
            shape = tuple(labels.shape)
            if len(shape) != self.ndim or image.ndim not in (self.ndim, self.ndim + 1):
                raise DataError(
                    f"{name}: image {tuple(image.shape)} and labels {shape} do not fit a {self.ndim}D patch shape"
                )
            if spatial_shape(image.shape, self.ndim) != shape:
                raise DataError(f"{name}: image shape {tuple(image.shape)} does not match label shape {shape}")
            if any(p > s for p, s in zip(self.patch_shape, shape)):
                raise DataError(f"{name}: patch shape {self.patch_shape} is larger than the image {shape}")
            self.shapes.append(shape)
        if weights is None:
            given = np.array([np.prod(s, dtype=np.float64) for s in self.shapes])
        else:
            given = np.asarray(weights, dtype=np.float64)
            if given.shape != (len(self.pairs),) or not np.all(np.isfinite(given) & (given >= 0)) or given.sum() <= 0:
                raise DataError(
                    f"PatchSampler needs {len(self.pairs)} finite weights >= 0 with a positive sum, got "
                    f"{given.size} with minimum {given.min(initial=np.inf):g} and sum {given.sum():g}"
                )
        self.weights = given / given.sum()

    def _image_patch(self, image: Any, region: tuple[slice, ...]) -> np.ndarray:
        """(C, *patch_shape) float32, moving a 2D channel-last axis to the front."""
        if image.ndim == self.ndim:
            return np.asarray(image[region], dtype=np.float32)[None]
        if self.ndim == 2:
            return np.moveaxis(np.asarray(image[region + (slice(None),)], dtype=np.float32), -1, 0)
        return np.asarray(image[(slice(None),) + region], dtype=np.float32)

    def sample(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image patch (C, *patch_shape) float32, label patch (*patch_shape) as stored); labels are read first.

        ``rng`` replaces the sampler's own generator for this draw (a per-patch seed makes patches reproducible).
        """
        rng = self.rng if rng is None else rng
        tried: set[str] = set()
        for _ in range(self.max_tries):
            i = int(rng.choice(len(self.pairs), p=self.weights))
            corner = [int(rng.integers(0, s - p + 1)) for s, p in zip(self.shapes[i], self.patch_shape)]
            region = tuple(slice(c, c + p) for c, p in zip(corner, self.patch_shape))
            image, labels = self.pairs[i]
            label_patch = np.asarray(labels[region])
            if np.count_nonzero(label_patch) >= self.min_foreground * label_patch.size:
                return self._image_patch(image, region), label_patch
            tried.add(self.names[i])
        raise DataError(
            f"no patch of shape {self.patch_shape} with at least {self.min_foreground * 100:g}% foreground found in "
            f"{', '.join(sorted(tried))} after {self.max_tries} tries"
        )
