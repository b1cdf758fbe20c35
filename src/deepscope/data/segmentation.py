"""Paired images and label images for segmentation, 2D or 3D, and random patches from them.

Channel convention, used by every function here: a 2D image is (H, W) or (H, W, C), as image files store it;
a 3D image is (D, H, W) or (C, D, H, W), as HDF5/zarr/TIFF volumes for deep learning usually store it. Label
images never have a channel axis. Patches come out channels-first, (C, *patch_shape), as models expect.

Volumes in HDF5 or zarr can be opened lazily (:func:`open_volume`) so that :class:`PatchSampler` reads only the
patches it needs; a volume larger than memory is never loaded whole.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import tifffile
import zarr
from numpy.lib.npyio import NpzFile

from deepscope.data.readers import DECODE_ERRORS, SPLITS, read_image, unreadable
from deepscope.errors import DataError

TIFF_SUFFIXES = {".tif", ".tiff"}
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
HDF5_SUFFIXES = {".h5", ".hdf5"}
FILE_SUFFIXES = TIFF_SUFFIXES | PICTURE_SUFFIXES | HDF5_SUFFIXES | {".npz"}
LABEL_FOLDERS = ("masks", "labels")
MAX_COLOURS = 4  # a 3-axis array whose last axis is at most this long is a 2D colour image, otherwise a 3D volume
# How np.load and zipfile report a malformed archive: OSError, ValueError (also for a pickled array, which is refused),
# EOFError, BadZipFile, NotImplementedError (unknown compression), RuntimeError (encrypted member), zlib.error, and
# MemoryError for a member whose header states an absurd shape.
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError, zlib.error, MemoryError)
# What h5py and zarr raise for a malformed file or metadata: zarr, as fuzzing found, TypeError, ValueError (its
# MetadataValidationError too), KeyError, and OverflowError for a fill value too large for the dtype.
VOLUME_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, OverflowError, NotImplementedError, MemoryError)


def is_volume(path: Path) -> bool:
    """A file (or ``.zarr`` folder) :func:`read_volume` can read; hidden files and sidecars are skipped."""
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    return (path.is_file() and suffix in FILE_SUFFIXES) or (path.is_dir() and suffix == ".zarr")


def files_by_stem(folder: Path) -> dict[str, Path]:
    """Volumes of ``folder`` keyed by file stem; two files with one stem (a.png, a.tif) would make pairing a guess."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if is_volume(p)):
        if path.stem in found:
            raise DataError(f"{path}: same name as {found[path.stem].name}; pairs are matched by name, so keep only one")
        found[path.stem] = path
    return found


def match_by_stem(first_dir: Path, second_dir: Path, first_role: str, second_role: str) -> list[tuple[Path, Path]]:
    """Files of two folders paired by name (stem); a file without its partner is an error naming it."""
    first, second = files_by_stem(first_dir), files_by_stem(second_dir)
    if not first:
        raise DataError(f"{first_dir}: no {first_role} files found (PNG, JPEG, TIFF, NPZ, HDF5 or zarr)")
    for stem, path in first.items():
        if stem not in second:
            raise DataError(f"{path} has no {second_role} file in {second_dir.name}/ (matched by name)")
    for stem, path in second.items():
        if stem not in first:
            raise DataError(f"{path} has no {first_role} file in {first_dir.name}/ (matched by name)")
    return [(first[stem], second[stem]) for stem in sorted(first)]


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
        raise DataError(f"{folder}: both masks/ and labels/ found; choose the label folder with --labels masks or "
                        "--labels labels (labels: in a config file)")
    return label_dirs[0]


def _pairs_in(folder: Path, labels: str | None) -> list[tuple[Path, Path]]:
    """(image, label) paths of ``folder/images`` and its label folder (see :func:`_label_dir`), sorted by name."""
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise DataError(f"{folder}: no images/ folder (expected images/ and masks/ or labels/, maybe in train/, val/, test/)")
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


def _hdf5_datasets(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _zarr_arrays(group: Any, prefix: str = "") -> list[str]:
    """Array paths in a zarr group, nested ones included (``arrays``/``groups`` exist in zarr 2 and 3)."""
    names = [prefix + name for name, _ in group.arrays()]
    for name, sub in group.groups():
        names += _zarr_arrays(sub, f"{prefix}{name}/")
    return names


def _select(path: Path, key: str | None, present: list[str], kind: str) -> str:
    """The key to read: ``key`` if present, the only entry when no key is given, else an error listing them."""
    found = ", ".join(sorted(present)) or "nothing"
    if key is None:
        if len(present) == 1:
            return present[0]
        raise DataError(f"{path}: holds {len(present)} {kind}s ({found}); give the key to read")
    if key not in present:
        raise DataError(f"{path}: no {kind} {key!r} (found: {found})")
    return key


def _checked_shape(volume: Any, path: Path) -> Any:
    """``volume`` unless an axis is 0 long: an empty array is never an image, and later steps would fail on it obscurely."""
    if 0 in volume.shape:
        raise DataError(f"{path}: empty array of shape {tuple(volume.shape)}")
    return volume


def open_volume(path: str | Path, key: str | None = None) -> Any:
    """The HDF5 dataset or zarr array at ``key``, unread: slicing it reads only that region from disk.

    An h5py dataset keeps its file open; open volumes in each DataLoader worker rather than before forking.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if suffix in HDF5_SUFFIXES:
        try:
            file = h5py.File(path, "r")
        except OSError as exc:
            raise unreadable(path, exc, "HDF5 file") from None
        try:
            return _checked_shape(file[_select(path, None if key is None else key.lstrip("/"), _hdf5_datasets(file), "dataset")], path)
        except DataError:
            file.close()
            raise
    if suffix == ".zarr":
        try:
            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Array):
                if key is not None:
                    raise DataError(f"{path}: a single zarr array, not a group; it has no array {key!r}")
                return _checked_shape(node, path)
            return _checked_shape(node[_select(path, key, _zarr_arrays(node), "array")], path)
        except VOLUME_ERRORS as exc:
            raise unreadable(path, exc, "zarr store") from None
    raise DataError(f"{path}: only HDF5 (.h5, .hdf5) and zarr (.zarr) volumes can be opened lazily")


def read_npz(path: Path, keys: Callable[[list[str]], list[str]] = list) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive that ``keys`` picks from the names it holds (all of them by default).

    Never unpickled (``allow_pickle=False``): an object array in a file is refused, not run. A single .npy saved under
    an .npz name, or a member that is not an .npy array, is refused too, where np.load would hand back something else.
    """
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, NpzFile):
            raise DataError(f"{path}: holds a single .npy array, not an .npz archive of named arrays")
        with archive:
            arrays = {key: archive[key] for key in keys(archive.files)}
    except NPZ_ERRORS as exc:
        raise unreadable(path, exc, "NPZ archive") from None
    for key, array in arrays.items():
        if not isinstance(array, np.ndarray):
            raise DataError(f"{path}: {key!r} is not a NumPy array (.npy member)")
    return arrays


def _read_npz(path: Path, key: str | None) -> np.ndarray:
    (array,) = read_npz(path, lambda present: [_select(path, key, present, "array")]).values()
    return array


def read_volume(path: str | Path, key: str | None = None) -> np.ndarray:
    """Read a 2D image or 3D volume whole (TIFF, PNG, JPEG, BMP, NPZ, HDF5, zarr), keeping the layout on disk.

    ``key`` names the array inside NPZ/HDF5/zarr; it may be left out when there is only one. Pictures come as
    (H, W) when grey and (H, W, C) otherwise.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES or suffix == ".zarr":
        volume = open_volume(path, key)
        try:
            return np.asarray(volume[...])
        except VOLUME_ERRORS as exc:
            raise unreadable(path, exc, f"data in {key or 'volume'}") from None
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if suffix == ".npz":
        return _checked_shape(_read_npz(path, key), path)
    if suffix in TIFF_SUFFIXES:
        try:
            return _checked_shape(tifffile.imread(path), path)
        except DECODE_ERRORS as exc:
            raise unreadable(path, exc, "TIFF") from None
    if suffix in PICTURE_SUFFIXES:
        image = read_image(path)
        return image[:, :, 0] if image.shape[2] == 1 else image
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; expected TIFF, PNG, JPEG, BMP, NPZ, HDF5 or zarr")


def spatial_shape(image_shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Spatial shape of an image under the module's channel convention (channels last in 2D, first in 3D)."""
    shape = tuple(image_shape)
    if len(shape) == ndim:
        return shape
    return shape[:-1] if ndim == 2 else shape[1:]


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


def percentile_normalize(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, eps: float = 1e-6, channel_axis: int | None = None
) -> np.ndarray:
    """float32 ``(x - p_low) / (p_high - p_low + eps)``, percentiles per channel along ``channel_axis``.

    Percentiles rather than min/max so a few hot pixels do not squash the intensities of everything else;
    ``eps`` keeps a constant image (or channel) at 0 instead of dividing by zero.
    """
    x = np.asarray(image, dtype=np.float32)
    axes = None if channel_axis is None else tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    p_low, p_high = np.percentile(x, [low, high], axis=axes, keepdims=True).astype(np.float32)
    return (x - p_low) / (p_high - p_low + np.float32(eps))


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
        weights: Sequence[float] | None = None,
    ) -> None:
        if not pairs:
            raise DataError("PatchSampler needs at least one (image, labels) pair")
        self.pairs = list(pairs)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        self.ndim = len(self.patch_shape)
        self.min_foreground = float(min_foreground)
        self.max_tries = int(max_tries)
        if self.max_tries < 1 or not 0.0 <= self.min_foreground <= 1.0:
            raise DataError(f"max_tries must be >= 1 and min_foreground in [0, 1], got {max_tries} and {min_foreground}")
        self.rng = rng if rng is not None else np.random.default_rng()
        self.names = list(names) if names is not None else [f"pair {i}" for i in range(len(self.pairs))]
        self.shapes: list[tuple[int, ...]] = []
        for (image, labels), name in zip(self.pairs, self.names):
            shape = tuple(labels.shape)
            if len(shape) != self.ndim or image.ndim not in (self.ndim, self.ndim + 1):
                raise DataError(f"{name}: image {tuple(image.shape)} and labels {shape} do not fit a {self.ndim}D patch shape")
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
                raise DataError(f"PatchSampler needs {len(self.pairs)} finite weights >= 0 with a positive sum, got "
                                f"{given.size} with minimum {given.min(initial=np.inf):g} and sum {given.sum():g}")
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
