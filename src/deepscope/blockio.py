"""Inputs and outputs for block-by-block prediction: only the blocks being read or written are in memory.

HDF5 and zarr are chunked formats read and written by slices. A TIFF output is created as an uncompressed,
memory-mapped file (``tifffile.memmap``) so that writing a block touches only its pages; a TIFF input is memory-mapped
when it is stored uncompressed and contiguously, and read whole otherwise (compressed TIFF pages cannot be sliced).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import tifffile
import zarr

from deepscope.data.seg_dataset import LAZY_SUFFIXES, LazyVolume
from deepscope.data.segmentation import HDF5_SUFFIXES, TIFF_SUFFIXES, read_volume
from deepscope.errors import DataError

CONTAINER_OUTPUTS = HDF5_SUFFIXES | {".zarr"}


def open_input(path: str | Path, key: str | None = None) -> Any:
    """An array-like image: lazy for HDF5/zarr and uncompressed TIFF, read whole for other files."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in LAZY_SUFFIXES:
        return LazyVolume(path, key)
    if suffix in TIFF_SUFFIXES and path.is_file():
        try:
            return tifffile.memmap(path, mode="r")
        except (ValueError, OSError, tifffile.TiffFileError):
            pass  # compressed or tiled: fall back to reading it whole (read_volume names the file if it is corrupt)
    return read_volume(path, key)


class Output:
    """One output array (created with its final shape) and the file handle to close when done."""

    def __init__(self, path: Path, key: str, shape: Sequence[int], dtype: Any, chunks: Sequence[int]) -> None:
        self.path, self.key = path, key
        self._file: Any = None
        suffix = path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, shape))
        try:
            if suffix in HDF5_SUFFIXES:
                self._file = h5py.File(path, "a")
                if key in self._file:
                    del self._file[key]
                self.array: Any = self._file.create_dataset(key, shape=tuple(shape), dtype=dtype, chunks=chunks, compression="gzip", compression_opts=1)
            elif suffix == ".zarr":
                group = zarr.open_group(str(path), mode="a")
                self.array = group.create_array(key, shape=tuple(shape), dtype=dtype, chunks=chunks, overwrite=True)
            elif suffix in TIFF_SUFFIXES:
                colour = len(shape) == 3 and shape[-1] in (3, 4)  # (H, W, RGB[A]); anything else is stored as grey planes
                self.array = tifffile.memmap(path, shape=tuple(shape), dtype=dtype, photometric="rgb" if colour else "minisblack")
            else:
                raise DataError(f"{path}: output must be TIFF, HDF5 (.h5) or zarr (.zarr), or a folder")
        except OSError as exc:
            raise DataError(f"{path}: cannot write output ({exc})") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif isinstance(self.array, np.memmap):
            self.array.flush()
            del self.array


def output_paths(out: str | Path, stem: str, single: bool, labels_name: str) -> tuple[tuple[Path, str], tuple[Path, str]]:
    """Where probabilities and labels go: datasets ``probabilities`` and ``labels_name`` in a container, a TIFF and
    its ``_<labels_name>.tif`` sibling, or ``<stem>_probabilities.tif`` and ``<stem>_<labels_name>.tif`` in a folder."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in CONTAINER_OUTPUTS | TIFF_SUFFIXES:
        if not single:
            raise DataError(f"{out}: several inputs need an output folder, not one file")
        if suffix in CONTAINER_OUTPUTS:
            return (out, "probabilities"), (out, labels_name)
        return (out, ""), (out.with_name(f"{out.stem}_{labels_name}.tif"), "")
    return (out / f"{stem}_probabilities.tif", ""), (out / f"{stem}_{labels_name}.tif", "")
