"""Images and volumes in every format deepscope reads (TIFF, PNG/JPEG, HDF5, zarr, NPZ), 2D or 3D, whole or lazily.

Channel convention, used everywhere: a 2D image is (H, W) or (H, W, C), as image files store it; a 3D image is
(D, H, W) or (C, D, H, W), as HDF5/zarr/TIFF volumes for deep learning usually store it. Label images never have a
channel axis. HDF5 and zarr volumes open lazily (:func:`open_volume`, :class:`LazyVolume`), so a volume larger than
memory is never loaded whole.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile
from numpy.lib.npyio import NpzFile

from deepscope.data.io.images import DECODE_ERRORS, read_image, unreadable
from deepscope.errors import DataError

if TYPE_CHECKING:
    import h5py

TIFF_SUFFIXES = {".tif", ".tiff"}
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
HDF5_SUFFIXES = {".h5", ".hdf5"}
FILE_SUFFIXES = TIFF_SUFFIXES | PICTURE_SUFFIXES | HDF5_SUFFIXES | {".npz"}
MAX_COLOURS = 4  # a 3-axis array whose last axis is at most this long is a 2D colour image, otherwise a 3D volume
# How np.load and zipfile report a malformed archive: OSError, ValueError (also for a pickled array, which is refused),
# EOFError, BadZipFile, NotImplementedError (unknown compression), RuntimeError (encrypted member), zlib.error, and
# MemoryError for a member whose header states an absurd shape.
NPZ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    NotImplementedError,
    RuntimeError,
    zlib.error,
    MemoryError,
)
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
            raise DataError(
                f"{path}: same name as {found[path.stem].name}; pairs are matched by name, so keep only one"
            )
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


def _hdf5_datasets(file: h5py.File) -> list[str]:
    import h5py

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
            # h5py and zarr are imported when a volume is opened, not by every command
            import h5py

            file = h5py.File(path, "r")
        except OSError as exc:
            raise unreadable(path, exc, "HDF5 file") from None
        try:
            return _checked_shape(
                file[_select(path, None if key is None else key.lstrip("/"), _hdf5_datasets(file), "dataset")], path
            )
        except DataError:
            file.close()
            raise
    if suffix == ".zarr":
        try:
            import zarr

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
    raise DataError(
        f"{path}: unsupported file type {suffix or '(none)'}; expected TIFF, PNG, JPEG, BMP, NPZ, HDF5 or zarr"
    )


def spatial_shape(image_shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Spatial shape of an image under the module's channel convention (channels last in 2D, first in 3D)."""
    shape = tuple(image_shape)
    if len(shape) == ndim:
        return shape
    return shape[:-1] if ndim == 2 else shape[1:]


LAZY_SUFFIXES = HDF5_SUFFIXES | {".zarr"}
CONTAINER_SUFFIXES = LAZY_SUFFIXES | {".npz"}


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
