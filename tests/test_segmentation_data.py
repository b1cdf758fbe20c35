"""Paired segmentation data on tiny folders and volumes written in tmp_path: pairing, reading, checks, patches."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from deepscope.cli import build_parser, resolve_train_config
from deepscope.data.io.views import percentile_normalize
from deepscope.data.io.volumes import open_volume, read_volume
from deepscope.data.segmentation.dataset import find_items
from deepscope.data.segmentation.pairs import PatchSampler, check_pair, find_pairs
from deepscope.errors import DataError
from deepscope.tasks.pixel.commands import resolve_pixel_config


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint16 labels with a few boxes, so patches differ in foreground."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint16)
    for i in range(1, 4):
        corner = [int(rng.integers(0, s // 2)) for s in shape]
        labels[tuple(slice(c, c + s // 3) for c, s in zip(corner, shape))] = i
    return labels


def write_pair_folder(root: Path, stems: list[str], label_folder: str = "masks") -> Path:
    """2D grey PNG images and uint16 TIFF masks with the same stems."""
    (root / "images").mkdir(parents=True)
    (root / label_folder).mkdir()
    for i, stem in enumerate(stems):
        Image.fromarray(np.full((8, 10), 10 * i, dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        tifffile.imwrite(root / label_folder / f"{stem}.tif", blobs((8, 10), seed=i))
    return root


def write_volumes(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, Path, Path]:
    """The same raw (uint16) and label (int32) 3D arrays as cells.h5 and cells.zarr, keys ``raw``/``label``."""
    raw = np.random.default_rng(1).integers(0, 4000, (6, 20, 24)).astype(np.uint16)
    label = blobs((6, 20, 24)).astype(np.int32)
    h5 = tmp_path / "cells.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("raw", data=raw, chunks=(2, 8, 8))
        f.create_dataset("label", data=label, chunks=(2, 8, 8))
    store = zarr.open(str(tmp_path / "cells.zarr"), mode="w")
    create = store.create_array if hasattr(store, "create_array") else store.create_dataset  # zarr 3 / zarr 2
    for key, data in (("raw", raw), ("label", label)):
        create(key, shape=data.shape, dtype=data.dtype, chunks=(2, 8, 8))[...] = data
    return raw, label, h5, tmp_path / "cells.zarr"


# ---- find_pairs -------------------------------------------------------------------------------------------------


def test_find_pairs_matches_by_stem_across_extensions(tmp_path):
    root = write_pair_folder(tmp_path / "data", ["b", "a", "c"])
    pairs = find_pairs(root)
    assert list(pairs) == ["all"]
    assert [(i.name, m.name) for i, m in pairs["all"]] == [("a.png", "a.tif"), ("b.png", "b.tif"), ("c.png", "c.tif")]


def test_find_pairs_accepts_labels_folder_and_splits(tmp_path):
    write_pair_folder(tmp_path / "train", ["a", "b"], label_folder="labels")
    write_pair_folder(tmp_path / "test", ["z"])
    pairs = find_pairs(tmp_path)
    assert list(pairs) == ["train", "test"]
    assert [p[0].stem for p in pairs["train"]] == ["a", "b"] and pairs["test"][0][1].parent.name == "masks"


def test_find_pairs_errors(tmp_path):
    with pytest.raises(DataError, match="missing: folder not found"):
        find_pairs(tmp_path / "missing")
    (tmp_path / "noimg" / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match="noimg: no images/ folder"):
        find_pairs(tmp_path / "noimg")
    (tmp_path / "nomask" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="nomask: no masks/ or labels/ folder"):
        find_pairs(tmp_path / "nomask")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DataError, match="empty/images: no image files"):
        find_pairs(tmp_path / "empty")


def test_find_pairs_with_masks_and_labels_takes_the_chosen_folder(tmp_path):
    """A folder served by deepscope serve holds painted class labels in labels/ and proofread instances in masks/."""
    root = write_pair_folder(tmp_path / "served", ["a", "b"])
    (root / "labels").mkdir()
    for stem in ("a", "b"):
        tifffile.imwrite(root / "labels" / f"{stem}.tif", np.ones((8, 10), np.uint8))
    with pytest.raises(
        DataError,
        match="served: both masks/ and labels/ found; choose the label folder with --labels masks or --labels labels",
    ):
        find_pairs(root)
    assert {label.parent.name for _, label in find_pairs(root, "labels")["all"]} == {"labels"}
    assert {entry[3].parent.name for entry in find_items(root, "raw", "label", "masks")["all"]} == {"masks"}
    with pytest.raises(DataError, match="served: no proofread/ folder next to images/"):
        find_pairs(root, "proofread")


def test_labels_flag_is_a_segment_setting_and_pixel_keeps_its_own():
    parser = build_parser()
    assert (
        resolve_train_config(parser.parse_args(["train", "segment", "--data", "d", "--labels", "masks"])).labels
        == "masks"
    )
    assert resolve_train_config(parser.parse_args(["train", "segment", "--data", "d"])).labels is None
    with pytest.raises(SystemExit):  # train classify has no --labels flag
        parser.parse_args(["train", "classify", "--data", "d", "--labels", "masks"])
    assert parser.parse_args(["evaluate", "best.pt", "--data", "d", "--labels", "masks"]).labels == "masks"
    pixel = parser.parse_args(["pixel", "train", "--images", "served", "--labels", "served/labels"])
    assert resolve_pixel_config(pixel).labels == "served/labels"  # pixel's --labels is the label file or folder


def test_find_pairs_unmatched_files(tmp_path):
    root = write_pair_folder(tmp_path / "d", ["a", "b"])
    (root / "masks" / "b.tif").unlink()
    with pytest.raises(DataError, match=r"images/b\.png has no label file in masks/ \(matched by name\)"):
        find_pairs(root)
    tifffile.imwrite(root / "masks" / "b.tif", blobs((8, 10)))
    tifffile.imwrite(root / "masks" / "extra.tif", blobs((8, 10)))
    with pytest.raises(DataError, match=r"masks/extra\.tif has no image file in images/"):
        find_pairs(root)


# ---- read_volume / open_volume ----------------------------------------------------------------------------------


def test_read_volume_pictures_tiff_and_npz(tmp_path):
    grey = np.arange(80, dtype=np.uint8).reshape(8, 10)
    rgb = np.stack([grey, grey + 1, grey + 2], axis=-1)
    stack = blobs((5, 8, 10))
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    tifffile.imwrite(tmp_path / "s.tif", stack)
    np.savez(tmp_path / "v.npz", raw=stack, label=stack)
    np.testing.assert_array_equal(read_volume(tmp_path / "g.png"), grey)
    np.testing.assert_array_equal(read_volume(tmp_path / "c.png"), rgb)
    out = read_volume(tmp_path / "s.tif")
    assert out.shape == (5, 8, 10) and out.dtype == np.uint16
    np.testing.assert_array_equal(out, stack)
    np.testing.assert_array_equal(read_volume(tmp_path / "v.npz", key="label"), stack)
    with pytest.raises(DataError, match=r"v\.npz: holds 2 arrays \(label, raw\); give the key"):
        read_volume(tmp_path / "v.npz")


@pytest.mark.parametrize("kind", ["h5", "zarr"])
def test_hdf5_and_zarr_read_and_missing_key(tmp_path, kind):
    raw, label, h5, zr = write_volumes(tmp_path)
    path = h5 if kind == "h5" else zr
    np.testing.assert_array_equal(read_volume(path, key="raw"), raw)
    lazy = open_volume(path, key="label")
    assert not isinstance(lazy, np.ndarray) and lazy.shape == label.shape
    np.testing.assert_array_equal(lazy[1:3, 4:9, 5:7], label[1:3, 4:9, 5:7])
    with pytest.raises(DataError, match=rf"cells\.{kind}: no \w+ 'image' \(found: label, raw\)"):
        read_volume(path, key="image")


def test_corrupt_files_name_the_file(tmp_path):
    for name in ("bad.h5", "bad.tif", "bad.png", "bad.npz"):
        (tmp_path / name).write_bytes(b"not really an image file")
        with pytest.raises(DataError, match=rf"{name}: "):
            read_volume(tmp_path / name, key="raw")
    (tmp_path / "bad.zarr").mkdir()
    with pytest.raises(DataError, match=r"bad\.zarr: corrupt"):
        read_volume(tmp_path / "bad.zarr", key="raw")
    with pytest.raises(DataError, match=r"gone\.h5: file not found"):
        open_volume(tmp_path / "gone.h5", key="raw")


# ---- check_pair -------------------------------------------------------------------------------------------------


def test_check_pair_accepts_channels_2d_and_3d():
    labels2 = blobs((8, 10))
    assert check_pair(np.zeros((8, 10, 3), np.uint8), labels2, "a.png", "a.tif", ndim=2) == (8, 10)
    assert check_pair(np.zeros((8, 10), np.uint8), labels2, "a.png", "a.tif", ndim=2) == (8, 10)
    labels3 = blobs((4, 8, 10))
    assert check_pair(np.zeros((2, 4, 8, 10)), labels3, "v.h5", "v.h5", ndim=3) == (4, 8, 10)


def test_check_pair_errors():
    labels = blobs((8, 10))
    with pytest.raises(DataError, match=r"a\.png: image shape \(8, 9\) does not match labels a\.tif \(8, 10\)"):
        check_pair(np.zeros((8, 9)), labels, "a.png", "a.tif", ndim=2)
    with pytest.raises(DataError, match=r"a\.tif: labels must be integers, got float32"):
        check_pair(np.zeros((8, 10)), labels.astype(np.float32), "a.png", "a.tif", ndim=2)
    with pytest.raises(DataError, match=r"a\.tif: empty label image \(no objects\)"):
        check_pair(np.zeros((8, 10)), np.zeros((8, 10), np.uint16), "a.png", "a.tif", ndim=2)
    with pytest.raises(DataError, match=r"v\.tif: 3D volume given to a 2D model"):
        check_pair(np.zeros((4, 8, 10)), blobs((4, 8, 10)), "v.tif", "v.tif", ndim=2)


def test_check_pair_on_lazy_volumes(tmp_path):
    _, label, h5, _ = write_volumes(tmp_path)
    assert check_pair(open_volume(h5, "raw"), open_volume(h5, "label"), "cells.h5", "cells.h5", ndim=3) == label.shape
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("label", data=np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(DataError, match="empty label image"):
        empty = open_volume(tmp_path / "empty.h5", "label")
        check_pair(empty, empty, "empty.h5", "empty.h5", ndim=3)


# ---- percentile_normalize ---------------------------------------------------------------------------------------


def test_percentile_normalize_known_values():
    x = np.arange(101, dtype=np.uint16)
    out = percentile_normalize(x, low=0, high=100)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x / 100, atol=1e-6)
    np.testing.assert_allclose(percentile_normalize(x, low=10, high=90)[[10, 50, 90]], [0, 0.5, 1], atol=1e-6)


def test_percentile_normalize_per_channel_and_constant():
    image = np.stack([np.arange(101.0), 10 * np.arange(101.0), np.full(101, 7.0)], axis=-1)
    out = percentile_normalize(image, low=0, high=100, channel_axis=-1)
    np.testing.assert_allclose(out[:, 0], out[:, 1], atol=1e-6)
    np.testing.assert_allclose(out[-1, :2], [1, 1], atol=1e-6)
    assert np.all(out[:, 2] == 0) and np.all(np.isfinite(out))


# ---- PatchSampler -----------------------------------------------------------------------------------------------


class ReadSpy:
    """Wraps an array and records every read, to prove the sampler reads only patch-sized regions."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.reads = array, []

    shape = property(lambda self: self.array.shape)
    ndim = property(lambda self: self.array.ndim)
    dtype = property(lambda self: self.array.dtype)

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(out.shape)
        return out


def expected_corners(
    seed: int, n: int, shapes: list[tuple[int, ...]], patch: tuple[int, ...]
) -> list[tuple[int, list[int]]]:
    """Replays the sampler's documented draws: a pair weighted by size, then a corner per axis."""
    rng = np.random.default_rng(seed)
    sizes = np.array([np.prod(s, dtype=np.float64) for s in shapes])
    out = []
    for _ in range(n):
        i = int(rng.choice(len(shapes), p=sizes / sizes.sum()))
        out.append((i, [int(rng.integers(0, s - p + 1)) for s, p in zip(shapes[i], patch)]))
    return out


def test_patch_sampler_on_hdf5_matches_numpy_slices(tmp_path):
    raw, label, h5, zr = write_volumes(tmp_path)
    patch = (2, 8, 5)  # anisotropic
    for path in (h5, zr):
        sampler = PatchSampler(
            [(open_volume(path, "raw"), open_volume(path, "label"))], patch, rng=np.random.default_rng(3)
        )
        for _, corner in expected_corners(3, 5, [label.shape], patch):
            region = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            image_patch, label_patch = sampler.sample()
            assert image_patch.shape == (1, *patch) and image_patch.dtype == np.float32
            np.testing.assert_array_equal(image_patch[0], raw[region])
            np.testing.assert_array_equal(label_patch, label[region])


def test_patch_sampler_reads_only_patches_and_moves_channels():
    rgb = np.random.default_rng(0).integers(0, 255, (30, 40, 3)).astype(np.uint8)
    image, labels = ReadSpy(rgb), ReadSpy(blobs((30, 40)))
    sampler = PatchSampler([(image, labels)], (6, 7), rng=np.random.default_rng(0), names=["rgb.png"])
    for _ in range(4):
        image_patch, label_patch = sampler.sample()
        assert image_patch.shape == (3, 6, 7) and label_patch.shape == (6, 7)
    assert set(image.reads) == {(6, 7, 3)} and set(labels.reads) == {(6, 7)}

    volume = np.random.default_rng(1).random((2, 5, 12, 16)).astype(np.float32)  # (C, D, H, W)
    sampler = PatchSampler([(volume, blobs((5, 12, 16)))], (3, 4, 8), rng=np.random.default_rng(1))
    assert sampler.sample()[0].shape == (2, 3, 4, 8)


def test_patch_sampler_picks_pairs_by_size():
    big, small = (np.zeros((40, 40)), blobs((40, 40))), (np.ones((8, 8)), blobs((8, 8)))
    sampler = PatchSampler([big, small], (4, 4), rng=np.random.default_rng(0))
    from_small = sum(sampler.sample()[0].max() == 1 for _ in range(300))
    assert 5 <= from_small <= 25  # expected 300 * 64 / 1664 = 11.5


def test_patch_sampler_rejects_low_foreground():
    labels = np.zeros((50, 60), dtype=np.uint16)
    labels[10:30, 20:45] = 1
    sampler = PatchSampler([(np.zeros((50, 60)), labels)], (16, 16), min_foreground=0.5, rng=np.random.default_rng(0))
    fractions = [np.mean(sampler.sample()[1] > 0) for _ in range(30)]
    assert min(fractions) >= 0.5


def test_patch_sampler_gives_up_after_max_tries():
    labels = np.zeros((64, 64), dtype=np.uint16)
    labels[0, 0] = 1  # one pixel: never 10% of a 32x32 patch
    sampler = PatchSampler(
        [(np.zeros((64, 64)), labels)],
        (32, 32),
        min_foreground=0.1,
        max_tries=50,
        rng=np.random.default_rng(0),
        names=["cells_03.tif"],
    )
    message = r"no patch of shape \(32, 32\) with at least 10% foreground found in cells_03\.tif after 50 tries"
    with pytest.raises(DataError, match=message):
        sampler.sample()


def test_patch_sampler_patch_too_large():
    with pytest.raises(
        DataError, match=r"cells\.tif: patch shape \(4, 64, 64\) is larger than the image \(8, 32, 80\)"
    ):
        PatchSampler([(np.zeros((8, 32, 80)), blobs((8, 32, 80)))], (4, 64, 64), names=["cells.tif"])
