"""serve.folder: traversal refused, the image list (layouts, exclusions, corrupt files), images read by the
project's channel conventions, default contrast, and memory-mapped tiles."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from deepscope.errors import DataError, DeepscopeError
from deepscope.serve.folder import AccessError, ImageEntry, ServedFolder, UnknownImageError


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "a.png")
    (root / "labels").mkdir()
    tifffile.imwrite(root / "labels" / "a.tif", np.zeros((6, 8), np.uint8))
    (root / ".deepscope" / "journal").mkdir(parents=True)
    (root / ".deepscope" / "journal" / "a.jsonl").write_text("{}\n")
    tifffile.imwrite(root / ".deepscope" / "hidden.tif", np.zeros((6, 8), np.uint8))
    (tmp_path / "secret.png").write_bytes((root / "a.png").read_bytes())
    return ServedFolder(root)


@pytest.mark.parametrize(
    "relative",
    [
        "../x",
        "../secret.png",
        "/etc/passwd",
        "a/../../x",
        "labels/../../secret.png",
        ".deepscope",
        ".deepscope/journal/a.jsonl",
        "./.deepscope/hidden.tif",
        "a\0.png",
        "..\\secret.png",
        ".DeepScope/hidden.tif",
    ],
)
def test_resolve_refuses_traversal_and_state(served, relative):
    with pytest.raises(AccessError):
        served.resolve(relative)


def test_resolve_refuses_symlinks_leaving_the_folder_or_into_state(served):
    (served.root / "out.png").symlink_to(served.root.parent / "secret.png")
    (served.root / "outdir").symlink_to(served.root.parent)
    (served.root / "state").symlink_to(served.root / ".deepscope")
    (served.root / "loop").symlink_to(served.root / "loop")
    for relative in ["out.png", "outdir/secret.png", "state/hidden.tif", "loop"]:
        with pytest.raises(AccessError):
            served.resolve(relative)
    assert [e.name for e in served.images()] == ["a.png"]  # the outward link is not listed
    with pytest.raises(AccessError):
        served.open("out.png")


def test_resolve_allows_paths_inside(served):
    assert served.resolve("a.png") == served.root / "a.png"
    assert served.resolve("labels/a.tif") == served.root / "labels" / "a.tif"
    assert served.resolve("new/file.tif") == served.root / "new" / "file.tif"  # need not exist yet
    (served.root / "alias.png").symlink_to(served.root / "a.png")
    assert served.resolve("alias.png") == served.root / "a.png"
    assert served.labels_path("a.png") == served.root / "labels" / "a.tif"
    with pytest.raises(AccessError):
        served.labels_path("../secret.png")


def test_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        ServedFolder(tmp_path / "missing")


def test_listing_of_the_folder_itself(served):
    root = served.root
    tifffile.imwrite(root / "stack.tif", np.zeros((5, 10, 12), np.uint16))
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "colour.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    good = (root / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(good)
    tifffile.imwrite(root / "five_d.tif", np.zeros((2, 2, 3, 8, 8), np.uint8), photometric="minisblack")

    entries = served.images()
    assert [e.name for e in entries] == [
        "a.png",
        "broken.png",
        "colour.png",
        "five_d.tif",
        "stack.tif",
        "truncated.png",
    ]
    by_name = {e.name: e for e in entries}
    assert by_name["a.png"] == ImageEntry("a.png", [6, 8], None)
    assert by_name["colour.png"] == ImageEntry("colour.png", [4, 5, 3], None)
    assert by_name["stack.tif"] == ImageEntry("stack.tif", [5, 10, 12], None)
    for bad in ["broken.png", "truncated.png", "five_d.tif"]:
        assert by_name[bad].shape is None and by_name[bad].error
        assert "\n" not in by_name[bad].error and str(root) not in by_name[bad].error
    assert "corrupt" in by_name["broken.png"].error
    assert "shape" in by_name["five_d.tif"].error
    with pytest.raises(DataError, match="broken.png"):
        served.open("broken.png")


def test_listing_of_the_images_subfolder(tmp_path):
    root = tmp_path / "dsb"
    for sub in ["images", "masks", "labels"]:
        (root / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / sub / "x.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "top.png")
    served = ServedFolder(root)
    assert [e.name for e in served.images()] == ["images/x.png"]
    assert served.open("images/x.png").spatial == (4, 4)
    assert served.labels_path("images/x.png") == served.root / "labels" / "x.tif"
    for name in ["top.png", "masks/x.png", "labels/x.png", "images/missing.png"]:
        with pytest.raises(UnknownImageError):
            served.open(name)


def test_two_images_with_one_stem(served):
    tifffile.imwrite(served.root / "a.tif", np.zeros((6, 8), np.uint8))
    entries = served.images()
    assert [(e.name, e.error is None) for e in entries] == [("a.png", True), ("a.tif", False)]
    assert "same name as a.png" in entries[1].error
    assert served.open("a.png").spatial == (6, 8)
    with pytest.raises(DataError, match="same name"):
        served.open("a.tif")


def write(path, array):
    if path.suffix == ".png":
        Image.fromarray(array).save(path)
    else:
        tifffile.imwrite(path, array)


ramp = np.arange(4 * 5 * 6 * 7).reshape(4, 5, 6, 7)


@pytest.mark.parametrize(
    "file, stored, ndim, spatial, channels, z, expected",
    [
        ("grey8.png", ramp[0, 0].astype(np.uint8), 2, (6, 7), 1, None, ramp[0, 0][None]),
        ("grey16.png", (ramp[0, 0] * 1000).astype(np.uint16), 2, (6, 7), 1, 0, (ramp[0, 0] * 1000)[None]),
        ("rgb.png", ramp[0, :3].transpose(1, 2, 0).astype(np.uint8), 2, (6, 7), 3, None, ramp[0, :3]),
        ("two.tif", ramp[0, :2].transpose(1, 2, 0).astype(np.uint16), 2, (6, 7), 2, None, ramp[0, :2]),
        ("float.tif", ramp[0, 0].astype(np.float32) / 7, 2, (6, 7), 1, None, ramp[0, 0][None] / 7),
        ("stack.tif", ramp[0].astype(np.uint16), 3, (5, 6, 7), 1, 3, ramp[0, 3][None]),
        ("channels_stack.tif", ramp.astype(np.uint16), 3, (5, 6, 7), 4, 2, ramp[:, 2]),
    ],
)
def test_images_are_read_with_the_project_layouts(tmp_path, file, stored, ndim, spatial, channels, z, expected):
    write(tmp_path / file, stored)
    image = ServedFolder(tmp_path).open(file)
    assert (image.ndim, image.spatial, image.channels, image.dtype) == (ndim, spatial, channels, stored.dtype.name)
    plane = image.plane(z)
    assert plane.dtype == np.float32 and plane.flags.c_contiguous
    np.testing.assert_allclose(plane, expected, rtol=1e-6)
    depth = spatial[0] if ndim == 3 else 1
    with pytest.raises(DeepscopeError, match="slice"):
        image.plane(depth)


def test_contrast_percentiles_per_channel(tmp_path):
    values = np.arange(1000, dtype=np.uint16).reshape(25, 40)
    tifffile.imwrite(tmp_path / "two.tif", np.stack([values, values * 2], axis=-1))
    low, high = np.percentile(np.arange(1000), [1, 99.8])  # 9.99 and 997.002
    contrast = ServedFolder(tmp_path).open("two.tif").contrast()
    np.testing.assert_allclose(contrast, [(low, high), (2 * low, 2 * high)], rtol=1e-5)


def test_contrast_ignores_non_finite_values(tmp_path):
    values = np.arange(1000, dtype=np.float32).reshape(25, 40)
    values[0, :10] = np.nan
    values[1, :5] = np.inf
    tifffile.imwrite(tmp_path / "f.tif", values)
    finite = values[np.isfinite(values)]
    np.testing.assert_allclose(
        ServedFolder(tmp_path).open("f.tif").contrast(), [tuple(np.percentile(finite, [1, 99.8]))], rtol=1e-5
    )


def test_contrast_of_a_large_image_reads_a_subsample(tmp_path):
    ramp = np.arange(3000, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", ((ramp[:, None] + ramp) % 251).astype(np.uint8))
    image = ServedFolder(tmp_path).open("big.tif")
    tracemalloc.start()
    try:
        ((low, high),) = image.contrast()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs(low - 2.5) <= 1 and abs(high - 250) <= 1  # values 0..250 about evenly spread
    assert peak < 24 * 2**20  # all 9M values as float32 would be 36 MiB


def test_level0_tile_of_a_memory_mapped_tiff_reads_only_its_region(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 65535, (2048, 2048), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", big)
    image = ServedFolder(tmp_path).open("big.tif")
    assert isinstance(image.raw(), np.memmap)
    tracemalloc.start()
    try:
        tile = image.pyramid().tile(0, 3, 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(tile[0], big[768:1024, 1280:1536])
    assert peak < 2 * 2**20  # the whole plane as float32 would be 16 MiB
    assert image.pyramid(0) is image.pyramid()  # kept for the next tile


def test_open_keeps_images_and_reopens_changed_files(served):
    first = served.open("a.png")
    assert served.open("a.png") is first
    Image.fromarray(np.full((3, 4), 9, np.uint8)).save(served.root / "a.png")
    os.utime(served.root / "a.png", ns=(1, 1))  # a different modification time even on coarse clocks
    second = served.open("a.png")
    assert second is not first and second.spatial == (3, 4)
    np.testing.assert_array_equal(second.plane(), np.full((1, 3, 4), 9))
