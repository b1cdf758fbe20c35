"""Readers: formats, bit depths, channel handling, splits and the stratified split."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from deepscope.data.classification.dataset import (
    FileImageSet,
    ImageSet,
    channel_stats,
    load_classification,
    stratified_split,
)
from deepscope.data.io.images import read_image
from deepscope.errors import DataError


def test_read_formats_and_depths(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    deep = (np.arange(48, dtype=np.uint16) * 1000).reshape(6, 8)
    tifffile.imwrite(tmp_path / "d.tif", deep)
    Image.fromarray(deep).save(tmp_path / "d16.png")
    xs, ys = np.meshgrid(np.arange(0, 240, 15), np.arange(0, 240, 20))
    smooth = np.stack([xs, ys, np.full_like(xs, 100)], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)

    assert read_image(tmp_path / "g.png").shape == (6, 8, 1)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png")[..., 0], grey)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), rgb)
    jpeg = read_image(tmp_path / "s.jpg")
    assert jpeg.shape == (12, 16, 3) and jpeg.dtype == np.uint8
    assert np.abs(jpeg.astype(int) - smooth).mean() < 4  # lossy, but the same picture
    tif = read_image(tmp_path / "d.tif")
    assert tif.dtype == np.uint16 and tif.shape == (6, 8, 1)
    np.testing.assert_array_equal(tif[..., 0], deep)
    png16 = read_image(tmp_path / "d16.png")
    assert png16.dtype == np.uint16
    np.testing.assert_array_equal(png16[..., 0], deep)


def test_corrupt_image_names_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match="broken.png: corrupt or unreadable"):
        read_image(bad)


def test_folder_splits_share_class_order(class_tree):
    data = load_classification(class_tree)
    assert data.class_names == ["alpha", "beta", "gamma"]
    assert set(data.splits) == {"train", "test"}
    assert len(data.splits["train"]) == 120 and len(data.splits["test"]) == 30
    assert data.image_shape == (3, 12, 12)
    assert data.splits["train"].images.dtype == np.uint8


def test_grey_and_rgb_are_unified_and_resize(tmp_path):
    for cls, mode, size in [("a", "L", (10, 10)), ("b", "RGB", (10, 10)), ("b", "L", (14, 12))]:
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.new(mode, size, 128 if mode == "L" else (128, 128, 128)).save(tmp_path / cls / f"{mode}{size[0]}.png")
    with pytest.raises(DataError, match="differs from .*--resize"):
        load_classification(tmp_path)
    data = load_classification(tmp_path, resize=(10, 10))
    assert data.splits["all"].images.shape == (3, 10, 10, 3)
    assert (data.splits["all"].images == 128).all()


def test_stratified_split_keeps_proportions(npz_data):
    train = load_classification(npz_data).splits["train"]
    a, b = stratified_split(train, 0.25, seed=3)
    assert len(b) == 30 and len(a) == 90
    assert np.bincount(b.labels).tolist() == [10, 10, 10]
    _a2, b2 = stratified_split(train, 0.25, seed=3)
    assert b.sources == b2.sources  # seeded
    assert not set(a.sources) & set(b.sources)


def test_channel_stats_known_values():
    images = np.zeros((2, 2, 2, 1), dtype=np.uint8)
    images[0] = 255
    mean, std = channel_stats(ImageSet(images, np.zeros(2, dtype=np.int64), ["a", "b"]))
    assert mean == pytest.approx([0.5]) and std == pytest.approx([0.5])


def test_lazy_folder_reads_the_same_images(class_tree):
    eager = load_classification(class_tree)
    lazy = load_classification(class_tree, lazy=True)
    assert isinstance(lazy.splits["train"], FileImageSet)
    assert lazy.image_shape == eager.image_shape and lazy.class_names == eager.class_names
    for split in ("train", "test"):
        assert lazy.splits[split].sources == eager.splits[split].sources
        np.testing.assert_array_equal(lazy.splits[split].labels, eager.splits[split].labels)
        for i in (0, 7, len(eager.splits[split]) - 1):
            np.testing.assert_array_equal(lazy.splits[split].image(i), eager.splits[split].images[i])
    part = lazy.splits["train"].subset(np.array([3, 5]))
    np.testing.assert_array_equal(part.image(1), eager.splits["train"].images[5])
    sample_mean, _ = channel_stats(lazy.splits["train"], sample=1000)
    full_mean, _ = channel_stats(eager.splits["train"])
    assert sample_mean == pytest.approx(full_mean)  # the sample covers all 120 images


def test_lazy_folder_checks_headers_up_front(class_tree):
    Image.new("RGB", (20, 20)).save(class_tree / "train" / "gamma" / "big.png")
    with pytest.raises(DataError, match="big.png: image size 20x20 differs"):
        load_classification(class_tree, lazy=True)
    (class_tree / "train" / "gamma" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(DataError, match="big.png: corrupt or unreadable"):
        load_classification(class_tree, lazy=True)
