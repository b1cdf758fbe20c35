"""Fuzzed readers of images, volumes and arrays: files with wrong headers, sizes and dtypes, and hostile archives.

Each test writes what a strategy draws into a fresh folder per example and calls the functions the commands read data
with. The contract (``refused_or_read``): a result that passes the test's sanity checks, or a DeepscopeError of one
short line naming the file; never another exception, never a file written into the data folder. Examples are few and
derandomized, so the suite stays fast and every run tries the same inputs. The helpers here serve the other
``test_fuzz_*`` files too.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from deepscope.data.classification.dataset import FileImageSet, load_classification
from deepscope.data.denoise.dataset import find_denoise_files, load_split
from deepscope.data.io.images import probe_image, read_image
from deepscope.data.io.volumes import read_volume
from deepscope.data.scribbles import read_sparse_labels
from deepscope.data.segmentation.dataset import find_items, load_items
from deepscope.data.segmentation.label_checks import label_warnings
from deepscope.errors import DataError, DeepscopeError

T = TypeVar("T")

FUZZ = settings(
    max_examples=80,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# characters an error line may hold besides the paths it names: enough to explain, too few to echo a file
MAX_MESSAGE = 600

# ---------------------------------------------------------------------------------------------------- the contract


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder for one example (pytest's tmp_path is one folder for all the examples of a test)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time: any write changes it."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def assert_one_line(error: DeepscopeError, *named: str) -> str:
    """The message is one line, names one of ``named`` (a file or a setting) and does not echo a whole input."""
    message = str(error)
    assert len(message.splitlines()) == 1, repr(message)
    assert any(name in message for name in named), f"{message!r} names none of {named}"
    rest = message
    for name in named:
        rest = rest.replace(name, "")
    assert len(rest) <= MAX_MESSAGE, f"{len(rest)} characters: {message[:300]!r}..."
    return message


def refused_or_read(read: Callable[[], T], folder: Path, *named: str) -> T | None:
    """``read()``'s result, or None when it raised a DeepscopeError of one line naming one of ``named``; either way
    nothing under ``folder`` changed. Any other exception fails the test with its traceback."""
    before = listing(folder)
    try:
        return read()
    except DeepscopeError as error:
        assert_one_line(error, *named)
        return None
    finally:
        assert listing(folder) == before, "the reader wrote into the data folder"


# ------------------------------------------------------------------------------------------------------- file makers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header states ``width`` x ``height`` grey pixels but whose data holds a few bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + _chunk(b"IEND", b"")
    )


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF of one deflated 8-bit strip stating ``width`` x ``height`` pixels, holding 64 bytes."""
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 8),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 64),
    ]
    entries = b"".join(
        struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in tags
    )
    return b"II*\0" + struct.pack("<I", 72) + b"\0" * 64 + struct.pack("<H", len(tags)) + entries + b"\0" * 4


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...]) -> bytes:
    """An .npy member that states ``shape`` (uint8) but holds 16 bytes of data."""
    header = repr({"descr": "|u1", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 16


class Marker:
    """Unpickling this creates the file ``path``: proof that a reader unpickled what it was given."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return Path.touch, (Path(self.path),)


HOSTILE = {  # name -> bytes of files that no reader may crash on, hang on, or act on
    "empty": b"",
    "png-bomb": png_header(100_000, 100_000),  # 10 gigapixels stated in a 70-byte file
    "png-zero-width": png_header(0, 10),
    "tiff-bomb": tiff_header(200_000, 200_000),  # 37 GiB stated
    "npy-not-npz": npy(np.zeros((3, 4), np.uint8)),
    "npz-truncated": zipped({"raw.npy": npy(np.zeros((6, 6), np.uint8))})[:90],
    "npz-not-npy-member": zipped({"raw": b"plain bytes"}),
    "npz-huge-header": zipped({"raw.npy": npy_header((1_000_000, 1_000_000))}),
    "npz-object-array": zipped({"raw.npy": npy(np.array([1, "a"], dtype=object))}),
    "npz-70-axes": zipped({"raw.npy": npy_header((1,) * 70)}),  # NumPy arrays have at most 64
}
PICTURES = ("png", "tif", "jpg", "bmp")
SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".bmp", ".npz", ".h5")


def encode(array: np.ndarray, fmt: str, key: str = "raw") -> bytes:
    """``array`` as the bytes of a ``fmt`` file; NPZ when ``fmt`` cannot hold it (PIL takes few dtypes and shapes)."""
    buffer = io.BytesIO()
    try:
        if fmt in ("png", "jpg", "bmp"):
            Image.fromarray(array).save(buffer, format="JPEG" if fmt == "jpg" else fmt.upper())
        elif fmt == "tif":
            tifffile.imwrite(buffer, array)
        elif fmt == "h5":
            with h5py.File(buffer, "w") as file:
                file[key] = array
        else:
            raise TypeError("npz")
    except (TypeError, ValueError, KeyError, IndexError, OSError, RuntimeError):  # the writers' refusals
        buffer = io.BytesIO()
        np.savez(buffer, **{key: array})
    return buffer.getvalue()


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """``data`` truncated, with a few bytes overwritten, or as it is."""
    edit = draw(st.sampled_from(["keep", "truncate", "overwrite"]))
    if edit == "keep" or not data:
        return data
    if edit == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


DTYPES = [
    np.uint8,
    np.uint16,
    np.int8,
    np.int32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex64,
]


def any_array(max_dims: int = 4) -> st.SearchStrategy[np.ndarray]:
    """Arrays of any of ``DTYPES`` (NaN, inf and the extreme integers included), 0 to ``max_dims`` axes, 0-sized ones too."""
    shapes = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5)
    return st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(dtype, shapes))


@st.composite
def picture(draw: st.DrawFn) -> np.ndarray:
    """A small valid 8- or 16-bit grey or RGB image."""
    shape = (draw(st.integers(1, 7)), draw(st.integers(1, 7)), *draw(st.sampled_from([(), (3,)])))
    return draw(hnp.arrays(draw(st.sampled_from([np.uint8, np.uint16])), shape))


@st.composite
def image_file(draw: st.DrawFn) -> bytes:
    """Random bytes, a hostile file, or a valid image or array file, maybe truncated or overwritten."""
    kind = draw(st.sampled_from(["random", "hostile", "file", "file"]))
    if kind == "random":
        return draw(st.binary(max_size=80))
    if kind == "hostile":
        return HOSTILE[draw(st.sampled_from(sorted(HOSTILE)))]
    array = draw(st.one_of(picture(), any_array()))
    return mutate(encode(array, draw(st.sampled_from([*PICTURES, "npz", "h5"]))), draw)


# ----------------------------------------------------------------------------------------------------- junk values

# text that parsers of numbers, names and markup trip on
NASTY_TEXT = [
    "",
    " ",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e400",
    "-5",
    "0",
    "1.5",
    "99999999999999999999999999",
    "١٢",
    "a\nb",
    "tab\there",
    "\u2028",
    "名前",
    "x" * 5000,
    "<x>",
    "&amp;",
    "0x10",
    "1_0",
    "+3",
    "None",
    "true",
]
# values a JSON field may hold instead of the right one
JUNK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.sampled_from([10**400, -(10**400)]),
        st.text(max_size=8),
        st.sampled_from(NASTY_TEXT),
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["id", "name", "bbox", "x", ""]), inner, max_size=3)
    ),
    max_leaves=6,
)


# a YAML flow mapping of lists a..i, each holding the one before nine times: *i is a list of 9**9 items
BOMB = (
    "{"
    + ", ".join(
        [f"a: &a [{', '.join('x' * 9)}]"]
        + [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    )
    + "}"
)


def edit_json(doc: Any, draw: st.DrawFn) -> Any:
    """``doc`` (JSON-like: a COCO file, a config) with one value somewhere replaced by junk, removed, duplicated or
    wrapped in a list (at the root: ``doc`` replaced or wrapped)."""
    parent, key, node = None, None, doc
    for _ in range(draw(st.integers(0, 4))):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        parent, key = node, draw(st.sampled_from(keys))
        node = parent[key]
    edit = draw(st.sampled_from(["replace", "remove", "duplicate", "wrap"]))
    if parent is None:
        return draw(JUNK) if edit == "replace" else [doc] if edit == "wrap" else doc
    if edit == "replace":
        parent[key] = draw(JUNK)
    elif edit == "remove":
        parent.pop(key)
    elif edit == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(node))
    elif edit == "wrap":
        parent[key] = [node]
    return doc


# ------------------------------------------------------------------------------------------------------------- tests


@FUZZ
@given(image_file(), st.sampled_from(SUFFIXES))
def test_image_files_with_wrong_headers_are_refused_in_one_line(content: bytes, suffix: str) -> None:
    with scratch() as folder:
        path = folder / f"image{suffix}"
        path.write_bytes(content)
        volume = refused_or_read(lambda: read_volume(path), folder, str(path))
        assert volume is None or (isinstance(volume, np.ndarray) and volume.size > 0)
        image = refused_or_read(lambda: read_image(path), folder, str(path))
        probe = refused_or_read(lambda: probe_image(path), folder, str(path))
        if image is not None:
            assert image.dtype in (np.uint8, np.uint16) and image.ndim == 3 and image.shape[2] in (1, 3)
        if probe is not None:
            assert probe[2] in (1, 3) and probe[3] in (np.uint8, np.uint16)
        if image is not None and probe is not None:
            assert probe == (*image.shape, image.dtype)  # the header tells what decoding gives


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_are_refused_under_any_name(tmp_path: Path, name: str) -> None:
    """None of them is a usable image: each is refused in one line by the readers, whatever its suffix says. The
    header probe may only report what a header states (the TIFF bomb's 200000 x 200000) or refuse it."""
    for suffix in SUFFIXES:
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(HOSTILE[name])
        for read in (read_volume, read_image):
            with pytest.raises(DataError) as refused:
                read(path)
            assert_one_line(refused.value, str(path))
        refused_or_read(lambda: probe_image(path), tmp_path, str(path))  # noqa: B023 (called at once)


def test_pickled_arrays_are_never_unpickled(tmp_path: Path) -> None:
    """An object array in an .npz is pickled; loading it with allow_pickle would run the marker's code."""
    marker = tmp_path / "unpickled"
    payload = np.array([Marker(str(marker))], dtype=object)
    pickle.loads(pickle.dumps(Marker(str(tmp_path / "probe"))))
    assert (tmp_path / "probe").exists()  # the payload works: unpickling it writes a file
    np.savez(tmp_path / "volume.npz", raw=payload)
    np.savez(
        tmp_path / "classes.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]), class_names=payload
    )
    with pytest.raises(DataError, match="volume.npz: .*allow_pickle"):
        read_volume(tmp_path / "volume.npz")
    with pytest.raises(DataError, match="classes.npz: .*allow_pickle"):
        load_classification(tmp_path / "classes.npz")
    assert not marker.exists()


@st.composite
def almost_valid_pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """An image and its labels that would train, with either or both replaced by an array of any dtype and shape."""
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    image = draw(hnp.arrays(np.uint8, shape))
    labels = draw(hnp.arrays(np.uint16, shape, elements=st.integers(0, 3)))
    if draw(st.booleans()):
        image = draw(any_array())
    if draw(st.booleans()):
        labels = draw(any_array())
    return image, labels


@FUZZ
@given(
    almost_valid_pair(),
    st.sampled_from([*PICTURES, "npz", "h5"]),
    st.sampled_from(["png", "tif", "npz", "h5"]),
    st.booleans(),
)
def test_segmentation_pairs_of_any_dtype_and_shape(
    pair: tuple[np.ndarray, np.ndarray], image_fmt: str, label_fmt: str, semantic: bool
) -> None:
    image, labels = pair
    with scratch() as folder:
        for sub, array, fmt in (("images", image, image_fmt), ("masks", labels, label_fmt)):
            (folder / sub).mkdir()
            (folder / sub / f"a.{fmt}").write_bytes(encode(array, fmt))
        entries = refused_or_read(lambda: find_items(folder, "raw", "label"), folder, str(folder))
        items = entries and refused_or_read(
            lambda: load_items(entries["all"], None, 1.0, 99.8, not semantic), folder, str(folder)
        )
        for item in items or []:
            assert np.issubdtype(item.labels.dtype, np.integer) and 0 not in item.labels.shape
            assert np.isfinite(item.image[(slice(None),) * item.image.ndim]).all()


@st.composite
def container(draw: st.DrawFn) -> tuple[str, dict[str, np.ndarray]]:
    """A format and the arrays under keys raw and label, one maybe missing, renamed or of any dtype and shape."""
    image, labels = draw(almost_valid_pair())
    arrays = {"raw": image, draw(st.sampled_from(["label", "label", "labels"])): labels}
    if draw(st.booleans()):
        arrays.pop(draw(st.sampled_from(sorted(arrays))))
    return draw(st.sampled_from(["npz", "h5", "zarr"])), arrays


def write_container(path: Path, fmt: str, arrays: dict[str, np.ndarray]) -> None:
    if fmt == "npz":
        np.savez(path, **arrays)
    elif fmt == "h5":
        with h5py.File(path, "w") as file:
            for key, array in arrays.items():
                file[key] = array
    else:
        group = zarr.open_group(str(path), mode="w")
        for key, array in arrays.items():
            group.create_array(key, shape=array.shape, dtype=array.dtype)[...] = array


ZARR_JUNK = [None, -1, 2**70, "x" * 300, [], {}, [3, "a"], "object", {"name": "nope"}, [{"name": "gzip"}]]


@FUZZ
@given(container(), st.data())
def test_containers_with_missing_keys_and_junk_metadata(
    made: tuple[str, dict[str, np.ndarray]], data: st.DataObject
) -> None:
    fmt, arrays = made
    with scratch() as folder:
        path = folder / f"cells.{fmt}"
        write_container(path, fmt, arrays)
        if fmt == "zarr" and data.draw(st.booleans()):  # junk in one array's metadata, or random bytes for it
            meta = max(path.rglob("zarr.json"))
            doc = json.loads(meta.read_text())
            doc[
                data.draw(st.sampled_from(["shape", "data_type", "codecs", "chunk_grid", "fill_value", "node_type"]))
            ] = data.draw(st.sampled_from(ZARR_JUNK))
            meta.write_bytes(data.draw(st.sampled_from([json.dumps(doc).encode(), data.draw(st.binary(max_size=40))])))
        entries = refused_or_read(lambda: find_items(path, "raw", "label"), folder, str(path))
        items = entries and refused_or_read(lambda: load_items(entries["all"], None, 1.0, 99.8), folder, str(path))
        for item in items or []:
            assert np.issubdtype(item.labels.dtype, np.integer)
            assert np.isfinite(item.image[(slice(None),) * item.image.ndim]).all()


@pytest.mark.parametrize(
    "field", ["shape", "data_type", "codecs", "chunk_grid", "fill_value", "node_type", "zarr_format"]
)
def test_zarr_arrays_with_junk_metadata(tmp_path: Path, field: str) -> None:
    """Every junk value in every field: a fill value of 2**70 raised OverflowError, which no fuzzed example had drawn."""
    path = tmp_path / "cells.zarr"
    for junk in ZARR_JUNK:
        write_container(path, "zarr", {"raw": np.ones((3, 4), np.uint8)})
        meta = path / "raw" / "zarr.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), field: junk}))
        volume = refused_or_read(lambda: read_volume(path), tmp_path, str(path))
        assert volume is None or volume.size


@FUZZ
@given(any_array(), st.one_of(picture(), any_array()), st.sampled_from(["tif", "npz", "h5", "png"]))
def test_denoising_pairs_of_any_dtype_and_shape(noisy: np.ndarray, clean: np.ndarray, fmt: str) -> None:
    with scratch() as folder:
        for role, array in (("noisy", noisy), ("clean", clean)):
            (folder / role).mkdir()
            (folder / role / f"a.{fmt}").write_bytes(encode(array, fmt))
        files = refused_or_read(lambda: find_denoise_files(folder, synthetic=False), folder, str(folder))
        items = files and refused_or_read(lambda: load_split(files["all"], None, None), folder, str(folder))
        for item in items or []:
            for image in item.images.values():
                assert image.dtype == np.float32 and image.size and np.isfinite(image).all()


@FUZZ
@given(
    st.one_of(
        any_array(),
        hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=3, max_side=6), elements=st.integers(0, 3)),
    ),
    st.sampled_from(["tif", "npz", "h5"]),
)
def test_sparse_label_files_of_any_dtype_and_shape(labels: np.ndarray, fmt: str) -> None:
    with scratch() as folder:
        path = folder / f"labels.{fmt}"
        path.write_bytes(encode(labels, fmt))
        sparse = refused_or_read(lambda: read_sparse_labels(path), folder, str(path))
        assert sparse is None or (sparse.dtype == np.uint8 and sparse.ndim in (2, 3) and sparse.any())


@settings(FUZZ, max_examples=160)  # in memory: cheap
@given(
    st.one_of(
        any_array(),
        hnp.arrays(
            np.uint64,
            hnp.array_shapes(min_dims=2, max_dims=3, max_side=6),
            elements=st.sampled_from([0, 1, 2, 2**63 + 5, 2**64 - 1]),
        ),
    )
)
def test_label_checks_of_any_dtype_shape_and_ids(labels: np.ndarray) -> None:
    with scratch() as folder:
        found = refused_or_read(lambda: label_warnings(labels, "cells.tif"), folder, "cells.tif")
        for message in found or []:
            assert len(message.splitlines()) == 1 and message.startswith("cells.tif: ")


@st.composite
def npz_data_set(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """x_train/y_train (maybe x_test/y_test, class_names) that would load, with some arrays of any dtype and shape."""
    n = draw(st.integers(2, 6))
    arrays = {
        "x_train": draw(hnp.arrays(np.uint8, (n, 4, 4))),
        "y_train": draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 2))),
    }
    if draw(st.booleans()):
        arrays.update(x_test=arrays["x_train"][:2], y_test=arrays["y_train"][:2])
    if draw(st.booleans()):
        arrays["class_names"] = np.array(["a", "b", "c"])
    for key in draw(st.lists(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "class_names"]), max_size=2)):
        arrays[key] = draw(
            st.one_of(
                any_array(),
                hnp.arrays(np.int64, (n,), elements=st.sampled_from([-1, 0, 1, 10**12])),
                hnp.arrays(hnp.unicode_string_dtypes(), hnp.array_shapes(min_dims=0, max_dims=2)),
            )
        )
    return arrays


@FUZZ
@given(npz_data_set())
def test_classification_npz_of_any_dtype_and_shape(arrays: dict[str, np.ndarray]) -> None:
    with scratch() as folder:
        path = folder / "data.npz"
        np.savez(path, **arrays)
        data = refused_or_read(lambda: load_classification(path), folder, str(path))
        for split in data.splits.values() if data else []:
            assert (
                split.images.dtype in (np.uint8, np.uint16) and split.images.ndim == 4 and 0 not in split.images.shape
            )
            assert split.labels.min() >= 0 and split.labels.max() < len(data.class_names)


@FUZZ
@given(st.lists(image_file(), min_size=1, max_size=3), st.sampled_from([".png", ".tif", ".jpg"]), st.booleans())
def test_class_folders_with_broken_images(contents: list[bytes], suffix: str, lazy: bool) -> None:
    with scratch() as folder:
        for name in ("a", "b"):
            (folder / name).mkdir()
            Image.fromarray(np.full((4, 4), 9, np.uint8)).save(folder / name / "good.png")
        for i, content in enumerate(contents):
            (folder / "ab"[i % 2] / f"odd{i}{suffix}").write_bytes(content)
        data = refused_or_read(lambda: load_classification(folder, lazy=lazy), folder, str(folder))
        split = data.splits["all"] if data else None
        if isinstance(split, FileImageSet):
            for i in range(len(split)):  # read one at a time, as the training loader does
                image = refused_or_read(lambda i=i: split.image(i), folder, str(folder))
                assert image is None or image.shape == split.shape
