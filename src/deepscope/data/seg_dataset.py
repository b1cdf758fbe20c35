"""Segmentation data sets: (image, labels) pairs read from disk, normalized on read, sampled as training patches.

Images stay as stored (uint8/uint16 in RAM, or lazy HDF5/zarr volumes) and are normalized patch by patch with
percentiles computed once per image, so a data set costs its size on disk in memory, not four times that as float32.
Layouts follow ``deepscope.data.segmentation``: 2D images (H, W) or (H, W, C), 3D (D, H, W) or (C, D, H, W).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepscope.data.readers import SPLITS
from deepscope.data.segmentation import (
    HDF5_SUFFIXES,
    MAX_COLOURS,
    PatchSampler,
    check_pair,
    find_pairs,
    is_volume,
    open_volume,
    read_volume,
    spatial_shape,
)
from deepscope.errors import DataError, DeepscopeError

PERCENTILE_SAMPLES = 2**22  # values read to estimate an image's percentiles; a strided subset of larger volumes
NORMALIZE_EPS = 1e-6  # added to the percentile range so a constant image (or channel) normalizes to 0, not inf
INVERT_MODES = ("never", "always", "auto")
LAZY_SUFFIXES = HDF5_SUFFIXES | {".zarr"}
CONTAINER_SUFFIXES = LAZY_SUFFIXES | {".npz"}


def channel_count(shape: Sequence[int], ndim: int) -> int:
    """Channels of an image of ``shape`` in the storage layout (1 when it has no channel axis)."""
    if len(shape) == ndim:
        return 1
    return int(shape[-1] if ndim == 2 else shape[0])


def channel_axis(shape: Sequence[int], ndim: int) -> int | None:
    if len(shape) == ndim:
        return None
    return len(shape) - 1 if ndim == 2 else 0


class LazyVolume:
    """An HDF5 dataset or zarr array opened on first read in each process, so it survives DataLoader workers
    (an h5py handle inherited across ``fork`` is not safe to read) and pickles as just a path and a key."""

    def __init__(self, path: Path, key: str | None) -> None:
        self.path, self.key = Path(path), key
        volume = open_volume(self.path, key)
        self.shape, self.dtype, self.ndim = tuple(volume.shape), volume.dtype, len(volume.shape)
        self._open: tuple[int, Any] | None = (os.getpid(), volume)

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._open is None or self._open[0] != os.getpid():
            self._open = (os.getpid(), open_volume(self.path, self.key))
        return np.asarray(self._open[1][key])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": None}


def _samples(image: Any, ndim: int) -> np.ndarray:
    """(C, N) float32 values of an image, at most ``PERCENTILE_SAMPLES`` of them, to estimate its statistics.

    Larger images are subsampled by taking every k-th plane (row in 2D) along the first spatial axis, which
    reads whole contiguous planes of a lazy volume rather than scattered voxels.
    """
    shape = tuple(image.shape)
    axis = 1 if ndim == 3 and len(shape) == 4 else 0
    step = max(1, math.ceil(np.prod(shape, dtype=np.float64) / PERCENTILE_SAMPLES))
    index = [slice(None)] * len(shape)
    index[axis] = slice(None, None, step)
    values = np.asarray(image[tuple(index)], dtype=np.float32)
    c_axis = channel_axis(shape, ndim)
    return values.reshape(1, -1) if c_axis is None else np.moveaxis(values, c_axis, 0).reshape(values.shape[c_axis], -1)


def _percentiles(samples: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    p_low, p_high = np.percentile(samples, [low, high], axis=1).astype(np.float32)
    return p_low, p_high


def percentiles(image: Any, ndim: int, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) percentiles, float32 of shape (C,), from at most ``PERCENTILE_SAMPLES`` values."""
    return _percentiles(_samples(image, ndim), low, high)


def _bright_background(samples: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    """Whether the median pixel, percentile-normalized and averaged over channels, is above 0.5.

    Nuclei and cells usually cover well under half of an image, so the median pixel is background; percentile
    normalization puts a dark (fluorescence) background near 0 and a bright (bright-field, H&E) one near 1. On the
    DSB2018 training images the median is at most 0.19 for all 541 grey fluorescence images and at least 0.52 for
    all 107 H&E and 0.82 for all 16 grey bright-field ones, so this rule sorts all 664 by modality. It fails on
    images that objects fill more than half of; give ``invert="always"`` or ``"never"`` for those.
    """
    normalized = (samples - low[:, None]) / (high - low + np.float32(NORMALIZE_EPS))[:, None]
    return bool(np.median(normalized.mean(0)) > 0.5)


def _is_colour(samples: np.ndarray) -> bool:
    """Channels that differ somewhere; a grey picture saved as RGB has three equal ones."""
    return bool(np.any(samples != samples[:1]))


class Normalized:
    """Read-only view of an image whose reads come back as float32 ``(x - low) / (high - low + eps)`` per channel,
    or 1 minus that when ``inverted``.

    Inversion is the same one-pass expression with another offset and sign, ``1 - (x - low) / s == (x - (low + s)) / -s``,
    so tiled prediction reads inverted blocks at no extra cost. Indexing with slices only (as patch sampling and
    tiling do) keeps every axis, so the per-channel scale broadcasts on the same axis of the block as of the image.
    """

    def __init__(self, image: Any, ndim: int, low: np.ndarray, high: np.ndarray, eps: float = NORMALIZE_EPS,
                 inverted: bool = False) -> None:
        self.image, self.shape, self.ndim = image, tuple(image.shape), len(image.shape)
        self.low, self.high, self.inverted = np.asarray(low, np.float32), np.asarray(high, np.float32), bool(inverted)
        axis = channel_axis(self.shape, ndim)
        view = [1] * self.ndim
        if axis is not None:
            view[axis] = -1
        scale = self.high - self.low + np.float32(eps)
        self.offset = (self.low + scale if inverted else self.low).reshape(view)
        self.scale = (-scale if inverted else scale).reshape(view)

    def __getitem__(self, key: Any) -> np.ndarray:
        return (np.asarray(self.image[key], dtype=np.float32) - self.offset) / self.scale


def normalized(image: Any, ndim: int, low: float, high: float, invert: str = "never", name: str = "image") -> Normalized:
    """``image`` normalized between its ``low`` and ``high`` percentiles per channel, inverted as ``invert`` says:
    "never", "always", or "auto" (when the background is bright, see :func:`_bright_background`); ``name`` (the file)
    is named when the values read are not all finite."""
    if invert not in INVERT_MODES:
        raise DeepscopeError(f"invert must be one of {', '.join(INVERT_MODES)}, got {invert!r}")
    samples = _samples(image, ndim)
    if not np.isfinite(samples).all():  # NaN percentiles would make every normalized value NaN, and the loss with it
        raise DataError(f"{name}: holds NaN or infinite values")
    p_low, p_high = _percentiles(samples, low, high)
    inverted = invert == "always" or (invert == "auto" and _bright_background(samples, p_low, p_high))
    return Normalized(image, ndim, p_low, p_high, inverted=inverted)


class ChannelsFirst:
    """(C, *spatial) view of a stored image, as tiled prediction reads it; a grey image is repeated to ``channels``."""

    def __init__(self, image: Any, ndim: int, channels: int | None = None) -> None:
        shape = tuple(image.shape)
        self.image, self.spatial_ndim = image, ndim
        self.axis = channel_axis(shape, ndim)
        stored = channel_count(shape, ndim)
        self.channels = stored if channels is None else channels
        if stored not in (1, self.channels):
            raise DataError(f"image of shape {shape} has {stored} channels but {self.channels} are expected")
        self.shape = (self.channels, *spatial_shape(shape, ndim))
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        spatial = tuple(key[1:])
        if self.axis is None:
            block = np.asarray(self.image[spatial])[None]
        elif self.spatial_ndim == 2:
            block = np.moveaxis(np.asarray(self.image[spatial + (slice(None),)]), -1, 0)
        else:
            block = np.asarray(self.image[(slice(None),) + spatial])
        if block.shape[0] != self.channels:
            block = np.repeat(block, self.channels, axis=0)
        return block[key[0]]


def input_view(image: Any, ndim: int, channels: int, name: str, normalize: Sequence[float] | None,
               invert: str = "never") -> Any:
    """A stored image checked against a ``ndim``-D model of ``channels`` input channels, as a (C, *spatial) view,
    percentile-normalized per channel (and inverted as ``invert`` says, see :func:`normalized`) unless ``normalize``
    is None; errors name the file."""
    shape = tuple(image.shape)
    if ndim == 2 and len(shape) == 3 and shape[-1] not in (1, channels):
        if shape[-1] <= MAX_COLOURS:
            raise DataError(f"{name}: image has {shape[-1]} channels but the model takes {channels}")
        raise DataError(f"{name}: 3D volume {shape} given to a 2D model (2D images are (H, W) or (H, W, {channels}))")
    if len(shape) not in (ndim, ndim + 1):
        layout = "(H, W) or (H, W, C)" if ndim == 2 else "(D, H, W) or (C, D, H, W)"
        raise DataError(f"{name}: image of shape {shape} does not fit a {ndim}D model; expected {layout}")
    if normalize is not None:
        image = normalized(image, ndim, *normalize, invert=invert, name=name)
    elif invert != "never":
        raise DeepscopeError(f"invert={invert!r} needs percentile normalization, but normalize is off")
    try:
        return ChannelsFirst(image, ndim, channels)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None


@dataclass
class SegItem:
    """One image with its labels; ``image`` is the normalized view, ``stored`` the image as read."""

    name: str
    stored: Any
    labels: Any
    image: Normalized
    label_source: str = ""  # the label file (and key), for messages about the labels

    @property
    def inverted(self) -> bool:
        """Whether normalization inverted the image (bright background made dark)."""
        return self.image.inverted

    def channels_first(self, channels: int) -> ChannelsFirst:
        return ChannelsFirst(self.image, self.labels.ndim, channels)


def _open(path: Path, key: str | None) -> Any:
    """HDF5/zarr lazily, everything else read whole."""
    return LazyVolume(path, key) if path.suffix.lower() in LAZY_SUFFIXES else read_volume(path, key)


def _containers(folder: Path) -> list[Path]:
    """Files that can hold both an image and its labels under two keys."""
    return sorted(p for p in folder.iterdir() if is_volume(p) and p.suffix.lower() in CONTAINER_SUFFIXES)


def find_items(root: str | Path, raw_key: str, label_key: str,
               labels: str | None = None) -> dict[str, list[tuple[str, Path, str | None, Path, str | None]]]:
    """Per split, (name, image path, image key, label path, label key) for every pair under ``root``.

    ``root`` is an ``images/`` + ``masks/``|``labels/`` folder (optionally in train/val/test; ``labels`` names the label
    folder, needed when both are there), a folder of NPZ/HDF5/zarr containers each holding ``raw_key`` and ``label_key``
    (optionally in split folders), or one container.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: not found")
    if root.is_file() or root.suffix.lower() == ".zarr":
        return {"all": [(root.stem, root, raw_key, root, label_key)]}
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    folders = {s: root / s for s in split_dirs} or {"all": root}
    if all((folder / "images").is_dir() for folder in folders.values()):
        return {split: [(img.stem, img, None, lab, None) for img, lab in pairs] for split, pairs in find_pairs(root, labels).items()}
    found: dict[str, list[tuple[str, Path, str | None, Path, str | None]]] = {}
    for split, folder in folders.items():
        files = _containers(folder)
        if not files:
            raise DataError(
                f"{folder}: no images/ + masks/ (or labels/) folders and no NPZ, HDF5 or zarr files holding "
                f"{raw_key!r} and {label_key!r}"
            )
        found[split] = [(f.stem, f, raw_key, f, label_key) for f in files]
    return found


def load_items(
    entries: Sequence[tuple[str, Path, str | None, Path, str | None]],
    ndim: int | None,
    low: float,
    high: float,
    require_objects: bool = True,
    invert: str = "never",
) -> list[SegItem]:
    """Open and check every pair (labels must be integers, aligned, and hold objects when ``require_objects``);
    images are normalized between their ``low`` and ``high`` percentiles and inverted as ``invert`` says."""
    items = []
    for name, image_path, image_key, label_path, label_key in entries:
        image, labels = _open(image_path, image_key), _open(label_path, label_key)
        dims = labels.ndim if ndim is None else ndim
        label_name = f"{label_path}" + (f" [{label_key}]" if label_key else "")
        image_name = f"{image_path}" + (f" [{image_key}]" if image_key else "")
        check_pair(image, labels, image_name, label_name, dims, require_objects)
        items.append(SegItem(name, image, labels, normalized(image, dims, low, high, invert, image_name), label_name))
    return items


def common_channels(items: Sequence[SegItem], ndim: int) -> int:
    """The channel count of the data set: grey images may join colour ones (they are repeated), other mixes fail."""
    counts = {item.name: channel_count(item.stored.shape, ndim) for item in items}
    channels = max(counts.values())
    for name, c in counts.items():
        if c not in (1, channels):
            raise DataError(f"{name}: image has {c} channels but others have {channels}")
    return channels


def appearance(item: SegItem) -> str:
    """"grey-dark", "grey-bright", "colour-dark" or "colour-bright": channels equal or not, and the background
    rule of :func:`_bright_background` on the stored image, whether or not normalization inverted it."""
    samples = _samples(item.stored, item.labels.ndim)
    colour = "colour" if _is_colour(samples) else "grey"
    return f"{colour}-{'bright' if _bright_background(samples, item.image.low, item.image.high) else 'dark'}"


def _index_files(root: Path) -> list[Path]:
    """``index.csv`` beside the images: in ``root`` itself and in its train/val/test folders (as find_items reads them)."""
    return [f for f in (root / "index.csv", *(root / split / "index.csv" for split in SPLITS)) if f.is_file()]


def _index_column(root: Path, column: str) -> tuple[dict[str, str], str]:
    """image_id -> value of ``column`` from every index.csv under ``root``, and the files' names for messages."""
    files = _index_files(root)
    if not files:
        raise DataError(f"{root / 'index.csv'}: not found (nor in {', '.join(SPLITS)}/); it must hold columns image_id and {column}")
    values: dict[str, str] = {}
    for file in files:
        with open(file, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("image_id", column) if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{file}: no column {' or '.join(missing)} (columns: {', '.join(reader.fieldnames or [])})")
            values.update((row["image_id"], row[column]) for row in reader)
    return values, ", ".join(str(f) for f in files)


def image_groups(items: Sequence[SegItem], by: str, root: str | Path | None = None) -> list[str]:
    """A group name per item, for :func:`balanced_weights`.

    ``by="auto"`` groups by :func:`appearance`; any other value is a column of the data set's ``index.csv`` under
    ``root`` (in ``root`` or its split folders), whose ``image_id`` column holds the image names without extension.
    """
    if by == "auto":
        return [appearance(item) for item in items]
    if root is None:
        raise DeepscopeError(f"grouping images by the index.csv column {by!r} needs the data folder")
    values, files = _index_column(Path(root), by)
    for item in items:
        if item.name not in values:
            raise DataError(f"{files}: no row with image_id {item.name!r}, so no {by!r} for it")
    return [values[item.name] for item in items]


def balanced_weights(items: Sequence[SegItem], groups: Sequence[str], power: float = 0.5) -> np.ndarray:
    """Draw probabilities that sum to 1: a group's total is proportional to its volume ** ``power``, and within a
    group images are drawn by volume.

    ``power`` 1 is plain volume sampling, 0 gives every group the same share; in between (0.5, the square root)
    a rare modality is seen more often without repeating its few images as often as the common ones.
    """
    if len(groups) != len(items):
        raise DeepscopeError(f"{len(groups)} groups given for {len(items)} images")
    if not power >= 0:
        raise DeepscopeError(f"group balance power must be >= 0, got {power}")
    volumes = np.array([np.prod(item.labels.shape, dtype=np.float64) for item in items])
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    group_volume = np.bincount(index, weights=volumes, minlength=len(names))
    share = group_volume**power
    return share[index] / share.sum() * volumes / group_volume[index]


class PatchDataset(Dataset):
    """``length`` random patches per epoch; patch ``i`` of epoch ``e`` depends only on (seed, e, i), so it is the
    same in any DataLoader worker and when a run resumes mid-epoch."""

    def __init__(self, items: Sequence[SegItem], patch_shape: Sequence[int], length: int, channels: int,
                 min_foreground: float = 0.0, seed: int = 0, weights: Sequence[float] | None = None) -> None:
        self.sampler = PatchSampler([(item.image, item.labels) for item in items], patch_shape, min_foreground,
                                    names=[item.name for item in items], weights=weights)
        self.length, self.channels, self.seed, self.epoch = length, channels, seed, 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.sampler.sample(np.random.default_rng([self.seed, self.epoch, index]))
        if image.shape[0] != self.channels:
            image = np.repeat(image, self.channels, axis=0)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(labels.astype(np.int64))


class PatchLoader:
    """Batches of (image, labels) patches on the device for one process: its share of the epoch's patch indices."""

    def __init__(self, dataset: PatchDataset, batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                 num_workers: int = 0) -> None:
        self.dataset, self.device = dataset, device
        self.loader = DataLoader(dataset, batch_size, sampler=range(rank, len(dataset), world), num_workers=num_workers,
                                 drop_last=True, pin_memory=device.type == "cuda")

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __iter__(self) -> Any:
        for image, labels in self.loader:
            yield image.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
