"""Inputs and outputs for block-by-block prediction: only the blocks being read or written are in memory.

HDF5 and zarr are chunked formats read and written by slices. A TIFF output is created as an uncompressed,
memory-mapped file (``tifffile.memmap``) so that writing a block touches only its pages; a TIFF input is memory-mapped
when it is stored uncompressed and contiguously, and read whole otherwise (compressed TIFF pages cannot be sliced).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from deepscope.atomic import WriteError, temporary
from deepscope.data.io.volumes import HDF5_SUFFIXES, LAZY_SUFFIXES, TIFF_SUFFIXES, LazyVolume, read_volume
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
    """One output array, written where it cannot harm what ``path`` held before: a temporary TIFF beside it, or a
    temporary dataset (array) inside the HDF5 file (zarr group). Leaving the ``with`` block commits it, replacing the
    target; an error inside the block (a full disk, a bad input) discards it, so a failed prediction never leaves a
    half-written file where a previous one was. A TIFF's space is reserved when it is created, so a full disk is an
    error here and not a crash (SIGBUS) at the first write into the memory map."""

    def __init__(self, path: Path, key: str, shape: Sequence[int], dtype: Any, chunks: Sequence[int]) -> None:
        self.path, self.key = path, key
        self._file: Any = None
        self._partial = f"{key}.partial-{os.getpid()}"  # inside a container
        self._tmp = temporary(path)  # for a TIFF
        self._created = not path.exists()  # a container this output creates goes again if it ends up empty
        suffix = path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, shape))
        try:
            if suffix in HDF5_SUFFIXES:
                # imported by the outputs that need it, not by every command
                import h5py

                self._file = h5py.File(path, "a")
                self.array: Any = self._file.create_dataset(
                    self._partial,
                    shape=tuple(shape),
                    dtype=dtype,
                    chunks=chunks,
                    compression="gzip",
                    compression_opts=1,
                )
            elif suffix == ".zarr":
                import zarr

                group = zarr.open_group(str(path), mode="a")
                self.array = group.create_array(
                    self._partial, shape=tuple(shape), dtype=dtype, chunks=chunks, overwrite=True
                )
            elif suffix in TIFF_SUFFIXES:
                # (H, W, RGB[A]); anything else is stored as grey planes
                colour = len(shape) == 3 and shape[-1] in (3, 4)
                self.array = tifffile.memmap(
                    self._tmp, shape=tuple(shape), dtype=dtype, photometric="rgb" if colour else "minisblack"
                )
                with open(self._tmp, "r+b") as handle:
                    os.posix_fallocate(handle.fileno(), 0, os.path.getsize(self._tmp))
            else:
                raise DataError(f"{path}: output must be TIFF, HDF5 (.h5) or zarr (.zarr), or a folder")
        except OSError as exc:
            self.discard()
            raise WriteError(f"{path}: cannot write output ({exc.strerror or exc}); {self._kept()}") from None

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if kind is not None:
            self.discard()
            if isinstance(error, OSError):
                raise WriteError(
                    f"{self.path}: could not write output ({error.strerror or error}); {self._kept()}"
                ) from None
            return
        try:
            self.commit()
        except OSError as exc:
            self.discard()
            raise WriteError(f"{self.path}: could not write output ({exc.strerror or exc}); {self._kept()}") from None

    def _kept(self) -> str:
        return "the previous one is intact" if self.path.exists() else "nothing was written"

    def commit(self) -> None:
        """Flush the array and put it where the target was."""
        if self._file is not None:
            if self.key in self._file:
                del self._file[self.key]
            self._file.move(self._partial, self.key)
            self._file.close()
        elif isinstance(self.array, np.memmap):
            self.array.flush()
            del self.array
            os.replace(self._tmp, self.path)
        else:  # zarr on disk: swap the array folders (zarr cannot rename an array)
            done, old = self.path / self._partial, self.path / f".{self.key}.old-{os.getpid()}"
            if (self.path / self.key).exists():
                os.replace(self.path / self.key, old)
            os.replace(done, self.path / self.key)
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Forget what was written; the target stays as it was."""
        if self._file is not None:
            if self._partial in self._file:
                del self._file[self._partial]
            empty = not len(self._file)
            self._file.close()
            if empty and self._created:
                self.path.unlink(missing_ok=True)
        elif self.path.suffix.lower() == ".zarr":
            shutil.rmtree(self.path / self._partial, ignore_errors=True)
            if self._created and not any(p.name != "zarr.json" for p in self.path.iterdir()):
                shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.__dict__.pop("array", None)
            self._tmp.unlink(missing_ok=True)


def output_paths(
    out: str | Path, stem: str, single: bool, labels_name: str
) -> tuple[tuple[Path, str], tuple[Path, str]]:
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
