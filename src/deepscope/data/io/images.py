"""Read single images (PNG, JPEG, TIFF; 8/16-bit; grey or RGB) into HWC numpy arrays.

Each failure names the file and the problem, because a corrupt file among thousands
is otherwise a needle in a haystack.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from deepscope.errors import DataError, exception_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# What the decoders raise for a malformed file: PIL raises OSError (UnidentifiedImageError), ValueError, SyntaxError (its
# plugins' "broken file") or, for a header stating gigapixels, DecompressionBombError; tifffile, as fuzzing found, also
# KeyError, TypeError, IndexError, ZeroDivisionError, struct.error and zlib.error from its parsing code, and MemoryError
# for absurd sizes.
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    KeyError,
    TypeError,
    IndexError,
    ZeroDivisionError,
    MemoryError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    tifffile.TiffFileError,
)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as an (H, W, C) array of uint8 or uint16; grey images get C = 1."""
    path = Path(path)
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            array = tifffile.imread(path)
        else:
            with Image.open(path) as opened:
                opened.load()
                img: Image.Image = opened
                if img.mode in {"P", "PA", "CMYK", "YCbCr", "LA", "RGBA", "1"}:
                    img = img.convert("RGB")
                array = np.array(img)  # a writable copy: torch warns about read-only buffers
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except DECODE_ERRORS as exc:
        raise unreadable(path, exc) from None
    return as_hwc(array, path)


def unreadable(path: Path, exc: BaseException, what: str = "image") -> DataError:
    """The error for a file a decoder failed on; the decoder's words say where it broke."""
    return DataError(f"{path}: corrupt or unreadable {what} ({exception_line(exc)})")


def probe_image(path: str | Path) -> tuple[int, int, int, np.dtype]:
    """(H, W, C, dtype) an image will have once read, from its header only (no pixel decoding)."""
    path = Path(path)
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            with tifffile.TiffFile(path) as tif:
                shape, dtype = tif.pages[0].shape, np.dtype(tif.pages[0].dtype)
        else:
            with Image.open(path) as img:
                (w, h), mode = img.size, img.mode
            shape = (h, w) if mode in {"L", "I", "I;16", "I;16B", "I;16L", "F"} else (h, w, 3)
            dtype = np.dtype(np.uint16) if mode.startswith("I") else np.dtype(np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except DECODE_ERRORS as exc:
        raise unreadable(path, exc) from None
    if dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: unsupported pixel type {dtype}; expected 8- or 16-bit unsigned integers")
    if len(shape) == 2:
        return shape[0], shape[1], 1, dtype
    if len(shape) != 3 or shape[2] not in (1, 3, 4):
        raise DataError(f"{path}: expected a 2D grey or RGB image, got array of shape {shape}")
    return shape[0], shape[1], min(shape[2], 3), dtype


def as_hwc(array: np.ndarray, path: Path | str) -> np.ndarray:
    """Check dtype and layout of a 2D image and return it as (H, W, C)."""
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() < 65536:
        array = array.astype(np.uint16)  # PIL reads 16-bit PNGs as int32 ("I" mode)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: unsupported pixel type {array.dtype}; expected 8- or 16-bit unsigned integers")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"{path}: expected a 2D grey or RGB image, got array of shape {array.shape}")
    if array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)
