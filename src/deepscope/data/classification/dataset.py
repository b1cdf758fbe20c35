"""Labelled image sets for classification: class-folder trees and ``.npz`` arrays.

A data set that fits in memory becomes one (N, H, W, C) uint8/uint16 array plus integer
labels (:class:`ImageSet`), so that training can hold it on the device and slice batches
without per-sample Python. A folder too large for memory stays on disk as a
:class:`FileImageSet` whose images are read one at a time by a DataLoader.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepscope.data.io.images import is_image_file, probe_image, read_image
from deepscope.data.io.splits import SPLITS
from deepscope.data.io.volumes import read_npz
from deepscope.errors import DataError


@dataclass
class ImageSet:
    """Images (N, H, W, C) of one dtype and size, their labels and where each came from."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], [self.sources[i] for i in index])

    @property
    def scale(self) -> float:
        """Value of full intensity for this dtype (255 or 65535)."""
        return float(np.iinfo(self.images.dtype).max)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.images.shape[1:])

    def image(self, i: int) -> np.ndarray:
        return self.images[i]


@dataclass
class FileImageSet:
    """Images left on disk and read one at a time, for data sets larger than memory.

    ``shape`` and ``dtype`` come from the file headers, checked when the set is made, so a
    wrong-sized image is reported before training starts, not deep inside a DataLoader worker.
    """

    paths: list[str]
    labels: np.ndarray
    shape: tuple[int, int, int]
    dtype: np.dtype
    resize: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sources(self) -> list[str]:
        return self.paths

    @property
    def scale(self) -> float:
        return float(np.iinfo(self.dtype).max)

    def subset(self, index: np.ndarray) -> FileImageSet:
        return FileImageSet([self.paths[i] for i in index], self.labels[index], self.shape, self.dtype, self.resize)

    def image(self, i: int) -> np.ndarray:
        image = read_image(self.paths[i])
        if self.resize is not None:
            image = resize_image(image, self.resize)
        if image.shape[:2] != self.shape[:2]:
            raise DataError(
                f"{self.paths[i]}: image is {image.shape[0]}x{image.shape[1]}, expected {self.shape[0]}x{self.shape[1]}"
            )
        return conform(image, self.shape[2], self.dtype)


AnyImageSet = ImageSet | FileImageSet


@dataclass
class ClassificationData:
    """The splits found at a data path; ``val`` may be carved out of ``train`` later."""

    splits: dict[str, AnyImageSet]
    class_names: list[str]
    source: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images, as models expect."""
        h, w, c = next(iter(self.splits.values())).shape
        return (c, h, w)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) integer image with antialiasing, keeping its dtype."""
    if image.shape[:2] == tuple(size):
        return image
    tensor = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(tensor, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    info = np.iinfo(image.dtype)
    return out[0].permute(1, 2, 0).round().clamp(info.min, info.max).numpy().astype(image.dtype)


def stack_images(images: list[np.ndarray], sources: list[str], resize: tuple[int, int] | None) -> np.ndarray:
    """Stack images into one array, unifying channels (grey to RGB) and bit depth (8 to 16 bit).

    Mixed sizes are an error unless ``resize`` is given, since silently resizing changes the data.
    """
    if resize is not None:
        images = [resize_image(im, resize) for im in images]
    else:
        check_sizes([im.shape[:2] for im in images], sources)
    channels = max(im.shape[2] for im in images)
    dtype = np.dtype(np.uint16) if any(im.dtype == np.uint16 for im in images) else np.dtype(np.uint8)
    out = np.empty((len(images), *images[0].shape[:2], channels), dtype=dtype)
    for i, im in enumerate(images):
        out[i] = conform(im, channels, dtype)
    return out


def check_sizes(sizes: list[tuple[int, ...]], sources: list[str]) -> None:
    """All (H, W) equal, or an error naming the first file that differs."""
    for size, source in zip(sizes, sources):
        if tuple(size) != tuple(sizes[0]):
            raise DataError(
                f"{source}: image size {size[0]}x{size[1]} differs from {sources[0]} "
                f"({sizes[0][0]}x{sizes[0][1]}); pass --resize H W to resize all images"
            )


def conform(image: np.ndarray, channels: int, dtype: np.dtype) -> np.ndarray:
    """Grey to RGB when ``channels`` is 3, and 8 to 16 bit (x257, so 255 maps to 65535) when ``dtype`` is uint16.

    Works on one (H, W, C) image or a stack (N, H, W, C): channels are the last axis.
    """
    if image.dtype != dtype:
        image = image.astype(np.uint16) * 257
    if image.shape[-1] != channels:
        image = np.repeat(image, channels, axis=-1)
    return image


def read_images(paths: list[Path], resize: tuple[int, int] | None) -> np.ndarray:
    """Decode many files in threads (the decoders release the GIL) and stack them."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(pool.map(read_image, paths, chunksize=64))
    return stack_images(images, [str(p) for p in paths], resize)


def class_folders(root: Path) -> list[Path]:
    if not root.exists():
        raise DataError(f"{root}: folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected one subfolder per class, or an .npz file)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class subfolders found (expected one subfolder of images per class)")
    return folders


def scan_class_tree(root: Path, class_names: list[str] | None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image paths and labels of ``root/<class>/<image>``; ``class_names`` fixes the label order across splits."""
    folders = class_folders(root)
    names = [f.name for f in folders]
    if class_names is not None:
        extra = sorted(set(names) - set(class_names))
        if extra:
            raise DataError(f"{root}: class folder(s) {', '.join(extra)} do not exist in the training split")
    else:
        class_names = names
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        if not files:
            raise DataError(f"{folder}: class folder holds no images (PNG, JPEG or TIFF)")
        paths += files
        labels += [class_names.index(folder.name)] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), class_names


def file_image_set(paths: list[Path], labels: np.ndarray, resize: tuple[int, int] | None) -> FileImageSet:
    """Check every header (size, channels, depth) and describe the images without decoding them."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        probes = list(pool.map(probe_image, paths, chunksize=256))
    if resize is None:
        check_sizes([p[:2] for p in probes], [str(p) for p in paths])
    h, w = resize if resize is not None else probes[0][:2]
    channels = max(p[2] for p in probes)
    dtype = np.dtype(np.uint16) if any(p[3] == np.uint16 for p in probes) else np.dtype(np.uint8)
    return FileImageSet([str(p) for p in paths], labels, (h, w, channels), dtype, resize)


def read_class_tree(
    root: Path, class_names: list[str] | None, resize: tuple[int, int] | None, lazy: bool
) -> tuple[AnyImageSet, list[str]]:
    """A class-folder tree, decoded into memory or (``lazy``) described for reading on demand."""
    paths, labels, class_names = scan_class_tree(root, class_names)
    if lazy:
        return file_image_set(paths, labels, resize), class_names
    return ImageSet(read_images(paths, resize), labels, [str(p) for p in paths]), class_names


def too_large_for_memory(root: Path, resize: tuple[int, int] | None) -> bool:
    """Estimate a folder's decoded size from its file count and first image; True above half the RAM."""
    files = [p for p in root.rglob("*") if is_image_file(p)]
    if not files:
        return False
    h, w, _c, dtype = probe_image(files[0])
    if resize is not None:
        h, w = resize
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return len(files) * h * w * 3 * dtype.itemsize > 0.5 * ram


def load_folder(root: Path, resize: tuple[int, int] | None, lazy: bool | None) -> ClassificationData:
    """A class-folder tree, or ``train/``, ``test/`` and optional ``val/`` each holding one.

    ``lazy``: True leaves images on disk, False decodes them all, None decides by size.
    """
    class_folders(root)  # clear errors for a missing or empty folder before anything else
    if lazy is None:
        lazy = too_large_for_memory(root, resize)
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in split_dirs:
        data, names = read_class_tree(root, None, resize, lazy)
        return ClassificationData({"all": data}, names, str(root))
    train, names = read_class_tree(split_dirs["train"], None, resize, lazy)
    splits = {"train": train}
    for split in ("val", "test"):
        if split in split_dirs:
            splits[split] = read_class_tree(split_dirs[split], names, resize, lazy)[0]
    return ClassificationData(splits, names, str(root))


def load_npz(path: Path, resize: tuple[int, int] | None) -> ClassificationData:
    """Arrays ``x_train``/``y_train`` (and ``x_test``/``y_test``, ``x_val``/``y_val``, ``class_names``)."""
    arrays = read_npz(path)
    if "x_train" not in arrays or "y_train" not in arrays:
        raise DataError(f"{path}: missing arrays x_train and/or y_train (found: {', '.join(sorted(arrays)) or 'none'})")
    num_classes = None
    names = None
    if "class_names" in arrays:
        if arrays["class_names"].ndim != 1:
            raise DataError(
                f"{path}: class_names has shape {arrays['class_names'].shape}; expected a list of names (K,)"
            )
        names = [str(n) for n in arrays["class_names"]]
        num_classes = len(names)
    splits: dict[str, AnyImageSet] = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays:
            continue
        if f"y_{split}" not in arrays:
            raise DataError(f"{path}: x_{split} has no labels y_{split}")
        splits[split] = npz_split(path, split, arrays[f"x_{split}"], arrays[f"y_{split}"], resize)
    if num_classes is None:
        images = sum(len(data.labels) for data in splits.values())
        num_classes = int(splits["train"].labels.max()) + 1
        if num_classes > images:  # also keeps a stray label such as 10**12 from making a name per class
            raise DataError(
                f"{path}: label {num_classes - 1} in y_train implies {num_classes} classes for {images} "
                "images; number the classes 0..K-1 or give class_names"
            )
        names = [str(i) for i in range(num_classes)]
    for split, data in splits.items():
        bad = (data.labels < 0) | (data.labels >= num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}: y_{split}[{i}] = {data.labels[i]} is out of range for {num_classes} classes "
                f"(labels must be 0..{num_classes - 1})"
            )
    assert names is not None  # set with num_classes: from class_names or from the labels
    return ClassificationData(splits, names, str(path))


def npz_split(path: Path, split: str, x: np.ndarray, y: np.ndarray, resize: tuple[int, int] | None) -> ImageSet:
    if x.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: x_{split} has dtype {x.dtype}; expected uint8 or uint16 images")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or 0 in x.shape:
        raise DataError(
            f"{path}: x_{split} has shape {x.shape}; expected (N, H, W) or (N, H, W, C) with C = 1 or 3, no axis 0 long"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: y_{split} has shape {y.shape}; expected ({len(x)},), one label per image")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y_{split} has dtype {y.dtype}; expected integer class labels")
    if resize is not None:
        x = np.stack([resize_image(im, resize) for im in x])
    sources = [f"{path}:x_{split}[{i}]" for i in range(len(x))]
    return ImageSet(np.ascontiguousarray(x), y.astype(np.int64), sources)


def load_classification(
    path: str | Path, resize: tuple[int, int] | None = None, lazy: bool | None = False
) -> ClassificationData:
    """Load a class-folder tree or an ``.npz`` file, checking it can be trained on.

    ``lazy`` applies to folders (see :func:`load_folder`); an ``.npz`` archive is always read whole.
    """
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        data = load_npz(path, resize)
    else:
        data = load_folder(path, resize, lazy)
    first = next(iter(data.splits.values()))
    if len(np.unique(first.labels)) < 2:
        raise DataError(
            f"{path}: only one class ({data.class_names[int(first.labels[0])]}) found; classification needs at least two"
        )
    shapes = {name: s.shape for name, s in data.splits.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{path}: splits have different image shapes {shapes}; pass --resize H W")
    return data


def stratified_split(data: AnyImageSet, val_fraction: float, seed: int) -> tuple[AnyImageSet, AnyImageSet]:
    """Seeded split keeping class proportions; each class keeps at least one training image.

    scikit-learn is imported here: importing it costs over a second of every command's start-up."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(data))
    n_classes = len(np.unique(data.labels))
    n_val = max(n_classes, round(val_fraction * len(data)))
    if n_val >= len(data) - n_classes + 1:
        raise DataError(f"{len(data)} images are too few for a validation split of {val_fraction:.0%}")
    counts = np.bincount(data.labels)
    stratify = data.labels if counts[counts > 0].min() >= 2 else None
    train_idx, val_idx = train_test_split(index, test_size=n_val, random_state=seed, stratify=stratify)
    return data.subset(np.sort(train_idx)), data.subset(np.sort(val_idx))


def channel_stats(data: AnyImageSet, sample: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale: of every image in memory, of a seeded sample on disk."""
    if isinstance(data, ImageSet):
        return array_stats(data.images)
    index = np.random.default_rng(seed).permutation(len(data))[:sample]
    return array_stats(np.stack([data.image(int(i)) for i in index]))


def array_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of an (N, H, W, C) integer array, computed in chunks to bound memory."""
    scale = float(np.iinfo(images.dtype).max)
    c = images.shape[-1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    count = 0
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].reshape(-1, c).astype(np.float64) / scale
        total += chunk.sum(0)
        total_sq += (chunk**2).sum(0)
        count += len(chunk)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.tolist(), std.tolist()
