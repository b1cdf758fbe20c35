"""Segmentation data sets: (image, labels) pairs read from disk, normalized on read, sampled as training patches.

Images stay as stored (uint8/uint16 in RAM, or lazy HDF5/zarr volumes) and are normalized patch by patch with
percentiles computed once per image, so a data set costs its size on disk in memory, not four times that as float32.
Layouts follow :mod:`deepscope.data.io.volumes`: 2D images (H, W) or (H, W, C), 3D (D, H, W) or (C, D, H, W).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepscope.data.io.splits import SPLITS
from deepscope.data.io.views import ChannelsFirst, Normalized, appearance, channel_count, normalized
from deepscope.data.io.volumes import CONTAINER_SUFFIXES, LAZY_SUFFIXES, LazyVolume, is_volume, read_volume
from deepscope.data.segmentation.pairs import PatchSampler, check_pair, find_pairs
from deepscope.errors import DataError, DeepscopeError


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


def find_items(
    root: str | Path, raw_key: str, label_key: str, labels: str | None = None
) -> dict[str, list[tuple[str, Path, str | None, Path, str | None]]]:
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
        return {
            split: [(img.stem, img, None, lab, None) for img, lab in pairs]
            for split, pairs in find_pairs(root, labels).items()
        }
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


def _index_files(root: Path) -> list[Path]:
    """``index.csv`` beside the images: in ``root`` itself and in its train/val/test folders (as find_items reads them)."""
    return [f for f in (root / "index.csv", *(root / split / "index.csv" for split in SPLITS)) if f.is_file()]


def _index_column(root: Path, column: str) -> tuple[dict[str, str], str]:
    """image_id -> value of ``column`` from every index.csv under ``root``, and the files' names for messages."""
    files = _index_files(root)
    if not files:
        raise DataError(
            f"{root / 'index.csv'}: not found (nor in {', '.join(SPLITS)}/); it must hold columns image_id and {column}"
        )
    values: dict[str, str] = {}
    for file in files:
        with open(file, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("image_id", column) if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{file}: no column {' or '.join(missing)} (columns: {', '.join(reader.fieldnames or [])})"
                )
            values.update((row["image_id"], row[column]) for row in reader)
    return values, ", ".join(str(f) for f in files)


def image_groups(items: Sequence[SegItem], by: str, root: str | Path | None = None) -> list[str]:
    """A group name per item, for :func:`balanced_weights`.

    ``by="auto"`` groups by appearance (:func:`deepscope.data.io.views.appearance`); any other value is a column of the data set's ``index.csv`` under
    ``root`` (in ``root`` or its split folders), whose ``image_id`` column holds the image names without extension.
    """
    if by == "auto":
        return [appearance(item.stored, item.labels.ndim, item.image.low, item.image.high) for item in items]
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

    def __init__(
        self,
        items: Sequence[SegItem],
        patch_shape: Sequence[int],
        length: int,
        channels: int,
        min_foreground: float = 0.0,
        seed: int = 0,
        weights: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        self.sampler = PatchSampler(
            [(item.image, item.labels) for item in items],
            patch_shape,
            min_foreground,
            names=[item.name for item in items],
            weights=weights,
        )
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

    def __init__(
        self,
        dataset: PatchDataset,
        batch_size: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.dataset, self.device = dataset, device
        self.loader = DataLoader(
            dataset,
            batch_size,
            sampler=range(rank, len(dataset), world),
            num_workers=num_workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __iter__(self) -> Any:
        for image, labels in self.loader:
            yield image.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
