"""The folder that ``deepscope serve`` shows: safe path resolution, the image list, and images opened for viewing.

Every path a browser sends goes through :meth:`ServedFolder.resolve`, which refuses anything that could leave the
folder (absolute paths, "..", symlinks pointing outside) or reach the server's own state (``.deepscope/``). Images
are read with the project's readers and channel conventions, so what the viewer shows, the labels it saves and
what ``deepscope pixel train --images FOLDER --labels FOLDER/labels`` later reads agree on layout and pairing.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from deepscope.data.denoise.dataset import guess_ndim
from deepscope.data.io.images import is_image_file, probe_image
from deepscope.data.io.views import channel_count
from deepscope.data.io.volumes import TIFF_SUFFIXES, spatial_shape
from deepscope.errors import DataError, DeepscopeError
from deepscope.inference.blockio import open_input
from deepscope.serve.tiles import Pyramid

LABELS_DIR = "labels"
STATE_DIR = ".deepscope"
IMAGES_DIR = "images"  # the DSB layout: images in FOLDER/images, served instead of the folder's own files
OPEN_IMAGES = 4  # images kept open (LRU); each holds its pixels or a memory map, and its pyramids
OPEN_PLANES = 4  # pyramids kept per image (slices of a stack being browsed)
CONTRAST_SAMPLES = 2**20  # values read per image to pick default contrast limits
CONTRAST_PERCENTILES = (1.0, 99.8)


class AccessError(DeepscopeError):
    """A path outside the served folder, or inside it but not allowed (the server's state)."""


class UnknownImageError(DataError):
    """A name that is not one of the served images (the app answers 404)."""


@dataclass
class ImageEntry:
    name: str  # posix path relative to the served folder, e.g. "cells.tif" or "images/a.png"
    shape: list[int] | None  # stored shape, None when unreadable
    error: str | None  # one-line reason the file cannot be shown, else None


def _layout(shape: tuple[int, ...], dtype: np.dtype, path: Path) -> tuple[int, int, tuple[int, ...]]:
    """(spatial ndim, channels, spatial shape) of a stored array by the project's convention: (Y, X) and (Y, X, C<=4)
    are 2D, (Z, Y, X) and (C, Z, Y, X) are 3D; DataError naming the file for anything else."""
    ndim = guess_ndim(shape, None)
    if len(shape) not in (ndim, ndim + 1) or min(shape, default=0) < 1:
        raise DataError(
            f"{path}: cannot show an array of shape {tuple(shape)}; expected (Y, X), (Y, X, C), "
            "(Z, Y, X) or (C, Z, Y, X)"
        )
    if dtype.kind not in "biuf":
        raise DataError(f"{path}: unsupported pixel type {dtype}")
    return ndim, channel_count(shape, ndim), tuple(int(s) for s in spatial_shape(shape, ndim))


def _probe(path: Path) -> tuple[list[int], np.dtype]:
    """Stored shape and dtype from the file's header (TIFF) or a CRC check of its chunks (pictures), without decoding
    the pixels, so listing a folder of large images stays fast; DataError naming the file when it is corrupt."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return [int(s) for s in series.shape], np.dtype(series.dtype)
        except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
            raise DataError(f"{path}: corrupt or unreadable TIFF ({type(exc).__name__}: {exc})") from None
    height, width, channels, dtype = probe_image(path)
    try:
        with Image.open(path) as img:
            img.verify()  # a truncated or damaged picture fails here rather than when its tiles are requested
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: corrupt or unreadable image ({type(exc).__name__}: {exc})") from None
    return ([height, width] if channels == 1 else [height, width, channels]), dtype


class ServedImage:
    """One image opened for viewing and labelling: its layout, raw planes, default contrast and tile pyramids.

    TIFFs stored uncompressed are memory-mapped (``deepscope.inference.blockio.open_input``), so a level-0 tile of a large
    image reads only its own region; other files are read whole.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        array = open_input(path)
        self.ndim, self.channels, self.spatial = _layout(tuple(array.shape), array.dtype, path)
        self.dtype = array.dtype.name
        # (C, *spatial) view in the stored dtype: moving or adding the channel axis of a memory map reads nothing
        if len(array.shape) == self.ndim:
            self.stored: np.ndarray = array[None]
        else:
            self.stored = np.moveaxis(array, -1, 0) if self.ndim == 2 else array
        self._contrast: list[tuple[float, float]] | None = None
        self._pyramids: OrderedDict[int, Pyramid] = OrderedDict()
        self._lock = threading.Lock()

    def _z(self, z: int | None) -> int:
        """The slice index, checked; a 2D image has only slice 0, and None means slice 0."""
        z = 0 if z is None else z
        depth = self.spatial[0] if self.ndim == 3 else 1
        if not isinstance(z, int | np.integer) or isinstance(z, bool) or not 0 <= z < depth:
            raise DeepscopeError(f"{self.name}: slice {z!r} is out of range; the image has {depth} slice(s)")
        return int(z)

    def raw(self, z: int | None = None) -> np.ndarray:
        """(C, Y, X) view of slice ``z`` in the stored dtype, unread when memory-mapped."""
        z = self._z(z)
        return self.stored if self.ndim == 2 else self.stored[:, z]

    def plane(self, z: int | None = None) -> np.ndarray:
        """(C, Y, X) float32 raw values of slice ``z`` (2D: None or 0), a contiguous copy."""
        return np.ascontiguousarray(self.raw(z), dtype=np.float32)

    def contrast(self) -> list[tuple[float, float]]:
        """Per channel default display limits: the 1st and 99.8th percentiles of at most ~1M values of the whole
        image (a regular grid subsample: every k-th pixel along each spatial axis), ignoring NaN and infinity."""
        with self._lock:
            if self._contrast is None:
                step = max(1, math.ceil((math.prod(self.spatial) / CONTRAST_SAMPLES) ** (1 / self.ndim)))
                grid = (slice(None),) + (slice(None, None, step),) * self.ndim
                samples = np.array(self.stored[grid], dtype=np.float32).reshape(self.channels, -1)  # a writable copy
                samples[~np.isfinite(samples)] = np.nan
                with warnings.catch_warnings():  # an all-NaN channel warns, then gets the fallback below
                    warnings.simplefilter("ignore", RuntimeWarning)
                    limits = np.nanpercentile(samples, CONTRAST_PERCENTILES, axis=1).T
                self._contrast = [
                    (float(lo), float(hi)) if np.isfinite([lo, hi]).all() else (0.0, 1.0) for lo, hi in limits
                ]
            return list(self._contrast)

    def pyramid(self, z: int | None = None) -> Pyramid:
        """The tile pyramid of slice ``z``, kept for the few most recently viewed slices."""
        z = self._z(z)
        with self._lock:
            if z not in self._pyramids:
                self._pyramids[z] = Pyramid(self.raw(z))
                while len(self._pyramids) > OPEN_PLANES:
                    self._pyramids.popitem(last=False)
            self._pyramids.move_to_end(z)
            return self._pyramids[z]


class ServedFolder:
    """A folder of images served to the browser, with its labels in ``labels/`` and server state in ``.deepscope/``."""

    def __init__(self, root: str | Path) -> None:
        path = Path(root)
        if not path.is_dir():
            raise DataError(f"{path}: not a folder; serve a folder of images")
        self.root = path.resolve()
        self._open: OrderedDict[str, tuple[tuple[int, int], ServedImage]] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, relative: str) -> Path:
        """The real path of ``relative`` (a posix path from the browser) inside the folder; AccessError for absolute
        paths, "..", NUL, backslashes, symlinks leading outside the folder and anything under ``.deepscope/``."""
        if not isinstance(relative, str) or "\0" in relative or "\\" in relative:
            raise AccessError(f"path {relative!r}: not allowed (NUL or backslash)")
        if relative.startswith("/") or Path(relative).is_absolute():
            raise AccessError(f"path {relative!r}: absolute paths are not allowed")
        if ".." in relative.split("/"):
            raise AccessError(f"path {relative!r}: '..' is not allowed")
        try:
            path = (self.root / relative).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise AccessError(f"path {relative!r}: cannot be resolved") from None
        if not path.is_relative_to(self.root):
            raise AccessError(f"path {relative!r}: leads outside the served folder")
        inside = path.relative_to(self.root).parts
        if inside and inside[0].casefold() == STATE_DIR:  # casefold: the same folder on case-insensitive disks
            raise AccessError(f"path {relative!r}: the server's state folder {STATE_DIR}/ is not served")
        return path

    def _image_dir(self) -> Path:
        images = self.root / IMAGES_DIR
        return images if images.is_dir() else self.root

    def _candidates(self) -> list[tuple[str, Path]]:
        """(name, resolved path) of the image files to serve, sorted; files that resolve outside are left out."""
        folder = self._image_dir()
        prefix = "" if folder == self.root else f"{IMAGES_DIR}/"
        found = []
        for path in sorted(folder.iterdir()):
            if not is_image_file(path):
                continue
            try:
                found.append((prefix + path.name, self.resolve(prefix + path.name)))
            except AccessError:
                continue
        return found

    @staticmethod
    def _duplicate(name: str, earlier: dict[str, str]) -> str | None:
        """Why an image cannot be labelled when an earlier one has its stem: both would pair with one label file."""
        stem = Path(name).stem
        if stem in earlier:
            return f"same name as {earlier[stem]}; labels are paired by name, so keep only one"
        earlier[stem] = Path(name).name
        return None

    def images(self) -> list[ImageEntry]:
        """The served images, sorted: those of ``images/`` when that folder exists, else the folder's own; an
        unreadable file is an entry with its error rather than an exception."""
        entries: list[ImageEntry] = []
        stems: dict[str, str] = {}
        for name, path in self._candidates():
            error = self._duplicate(name, stems)
            shape = None
            if error is None:
                try:
                    stored, dtype = _probe(path)
                    _layout(tuple(stored), dtype, path)
                    shape = stored
                except DataError as exc:
                    error = str(exc).removeprefix(f"{path}: ").replace(str(path), name)  # no server paths
            entries.append(ImageEntry(name, shape, error))
        return entries

    def _check_served(self, name: str, path: Path) -> None:
        """UnknownImageError unless ``name`` is one of the listed images, DataError when it shares its stem."""
        stems: dict[str, str] = {}
        for candidate, _ in self._candidates():
            error = self._duplicate(candidate, stems)
            if candidate == name:
                if error is not None:
                    raise DataError(f"{path}: {error}")
                return
        raise UnknownImageError(f"{name}: not an image of the served folder")

    def open(self, name: str) -> ServedImage:
        """The image ``name``, kept open for the next requests (reopened when the file changes on disk); DataError
        naming the file when it cannot be read. Only a cache miss lists the folder, so tile requests stay cheap."""
        path = self.resolve(name)
        try:
            stat = path.stat()
        except OSError:
            raise UnknownImageError(f"{name}: not an image of the served folder") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._open.get(name)
            if cached is not None and cached[0] == stamp:
                self._open.move_to_end(name)
                return cached[1]
        self._check_served(name, path)
        image = ServedImage(name, path)
        with self._lock:
            self._open[name] = (stamp, image)
            self._open.move_to_end(name)
            while len(self._open) > OPEN_IMAGES:
                self._open.popitem(last=False)
        return image

    def labels_path(self, name: str) -> Path:
        """``labels/<stem>.tif``: flat and by stem, the pairing ``deepscope pixel train`` uses."""
        self.resolve(name)
        return self.root / LABELS_DIR / f"{PurePosixPath(name).stem}.tif"
