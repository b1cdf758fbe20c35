"""serve.tiles: pyramid levels and tiles (lazy, mean-pooled, edge tiles) and the PNG encoders' pixels."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from deepscope.errors import DeepscopeError
from deepscope.serve.tiles import (
    TILE,
    Pyramid,
    image_png,
    labels_png,
    level_count,
    outlines_png,
    overlay_region,
    probabilities_png,
    rgb,
    uncertainty_png,
)


def decoded(png: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.mode == mode
        return np.array(img)


@pytest.mark.parametrize(
    "shape, levels",
    [((1000, 600), 3), ((8192, 8192), 6), ((256, 256), 1), ((257, 10), 2), ((1, 1), 1), ((300, 2000), 4)],
)
def test_level_count(shape, levels):
    assert level_count(shape) == levels


def test_level0_tile_of_huge_plane_reads_only_its_region():
    plane = np.broadcast_to(np.arange(8192, dtype=np.uint8)[None, None, :], (1, 8192, 8192))  # no 64 MiB allocation
    tracemalloc.start()
    try:
        pyramid = Pyramid(plane)
        tile = pyramid.tile(0, 31, 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pyramid.levels == 6
    assert tile.dtype == np.float32 and tile.shape == (1, TILE, TILE)
    np.testing.assert_array_equal(tile[0, 0], (np.arange(30 * TILE, 31 * TILE) % 256).astype(np.float32))
    assert peak < 4 * 2**20  # a float32 copy of the plane would be 256 MiB
    with pytest.raises(DeepscopeError, match="out of range"):
        pyramid.tile(0, 32, 0)
    with pytest.raises(DeepscopeError, match="out of range"):
        pyramid.tile(6, 0, 0)


def test_pooled_levels_have_known_means():
    height, width = 300, 520
    plane = np.arange(height * width, dtype=np.float64).reshape(1, height, width)
    pyramid = Pyramid(plane)
    assert pyramid.levels == 3
    i, j = np.mgrid[0:150, 0:260]
    level1 = 2 * i * width + 2 * j + (width + 1) / 2  # mean of each 2x2 window of the ramp
    np.testing.assert_allclose(pyramid.tile(1, 0, 0)[0], level1[:, :TILE])
    edge = pyramid.tile(1, 0, 1)
    assert edge.shape == (1, 150, 4)
    np.testing.assert_allclose(edge[0], level1[:, TILE:])
    i, j = np.mgrid[0:75, 0:130]
    np.testing.assert_allclose(pyramid.tile(2, 0, 0)[0], 4 * i * width + 4 * j + 1.5 + 1.5 * width)


def test_pooling_odd_sizes_averages_the_real_pixels_of_edge_windows():
    height, width = 301, 515
    ramp = np.arange(height * width, dtype=np.uint32).reshape(1, height, width)
    pyramid = Pyramid(np.concatenate([ramp, ramp * 2]))  # two channels pooled alike
    assert pyramid.levels == 3
    left, right = pyramid.tile(1, 0, 0), pyramid.tile(1, 0, 1)
    assert left.shape == (2, 151, TILE) and right.shape == (2, 151, 2)
    assert left[0, 0, 0] == (0 + 1 + width + width + 1) / 4
    assert right[0, 0, -1] == (514 + width + 514) / 2  # last column: one real column of pixels
    assert left[0, -1, 0] == (300 * width + 300 * width + 1) / 2  # last row
    assert right[0, -1, -1] == 300 * width + 514  # corner: a single pixel
    np.testing.assert_allclose(left[1], 2 * left[0])


def test_edge_tiles_and_bad_indices():
    pyramid = Pyramid(np.zeros((2, 1000, 600), np.uint16))
    assert pyramid.levels == 3
    assert pyramid.tile(0, 3, 2).shape == (2, 1000 - 3 * TILE, 600 - 2 * TILE)
    assert pyramid.tile(2, 0, 0).shape == (2, 250, 150)
    for level, ty, tx in [(0, 4, 0), (0, 0, 3), (0, -1, 0), (1, 2, 0), (3, 0, 0), (-1, 0, 0)]:
        with pytest.raises(DeepscopeError, match="out of range"):
            pyramid.tile(level, ty, tx)
    with pytest.raises(DeepscopeError, match="integers"):
        pyramid.tile(0, 0.5, 0)
    with pytest.raises(DeepscopeError, match="plane"):
        Pyramid(np.zeros((10, 10)))


def test_overlay_region_samples_every_2_to_the_level_pixel():
    labels = np.arange(1000 * 600).reshape(1000, 600)
    region = overlay_region(labels, 1, 1, 0)
    np.testing.assert_array_equal(region, labels[512:1000:2, 0:512:2])
    assert region.shape == Pyramid(labels[None]).tile(1, 1, 0).shape[1:]
    probs = np.stack([labels, -labels])
    np.testing.assert_array_equal(overlay_region(probs, 0, 3, 2), probs[:, 768:, 512:])
    with pytest.raises(DeepscopeError, match="out of range"):
        overlay_region(labels, 0, 4, 0)


def test_image_png_grey_and_rgb_pixels():
    grey = np.array([[[0, 10, 300], [-5, 128, 255]]], np.float32)
    pixels = decoded(image_png(grey, [(0, 255)]), "RGB")
    expected = np.array([[0, 10, 255], [0, 128, 255]], np.uint8)
    np.testing.assert_array_equal(pixels, np.repeat(expected[..., None], 3, axis=-1))
    stretched = decoded(image_png(np.array([[[140.0]]], np.float32), [(100, 200)]), "RGB")
    np.testing.assert_array_equal(stretched[0, 0], [102, 102, 102])  # (140 - 100) / 100 * 255
    colour = np.array([[[255.0]], [[102.0]], [[200.0]]], np.float32)
    pixels = decoded(image_png(colour, [(0, 255), (0, 510), (100, 355)]), "RGB")
    np.testing.assert_array_equal(pixels[0, 0], [255, 51, 100])
    with pytest.raises(DeepscopeError, match="channel limits"):
        image_png(colour, [(0, 255)])


def test_image_png_tints_channels_and_clips_their_sum():
    values = np.array([[[255.0, 0.0]], [[102.0, 255.0]]], np.float32)  # two channels, two pixels
    pixels = decoded(image_png(values, [(0, 255), (0, 255)], ["#ff0000", "#00ff00"]), "RGB")
    np.testing.assert_array_equal(pixels[0], [[255, 102, 0], [0, 255, 0]])
    same = decoded(image_png(np.full((2, 1, 1), 255, np.float32), [(0, 255)] * 2, ["#ff0000", "#ff8000"]), "RGB")
    np.testing.assert_array_equal(same[0, 0], [255, 128, 0])  # red summed twice is clipped at 255
    default = decoded(image_png(values, [(0, 255), (0, 255)]), "RGB")
    np.testing.assert_array_equal(default[0, 0], [255, 102, 0])  # default palette starts red, green
    four = decoded(image_png(np.full((4, 1, 1), 255, np.float32), [(0, 255)] * 4), "RGB")
    np.testing.assert_array_equal(four[0, 0], [255, 255, 255])
    with pytest.raises(DeepscopeError, match="colours"):
        image_png(values, [(0, 255), (0, 255)], ["#ff0000"])


def test_labels_png_transparent_background_and_class_colours():
    labels = np.array([[0, 1], [2, 5]], np.uint8)
    pixels = decoded(labels_png(labels, {1: "#ff0000", 2: "#00ff00", 3: "#0000ff"}), "RGBA")
    np.testing.assert_array_equal(pixels, [[[0, 0, 0, 0], [255, 0, 0, 255]], [[0, 255, 0, 255], [128, 128, 128, 255]]])


def test_probabilities_png_mixes_class_colours():
    probs = np.array([[[255, 0, 128, 0]], [[0, 255, 127, 0]]], np.uint8)
    pixels = decoded(probabilities_png(probs, ["#ff0000", "#00ff00"]), "RGBA")
    np.testing.assert_array_equal(pixels[0], [[255, 0, 0, 255], [0, 255, 0, 255], [128, 127, 0, 255], [0, 0, 0, 0]])
    with pytest.raises(DeepscopeError, match="class colours"):
        probabilities_png(probs, ["#ff0000"])


def test_uncertainty_png_alpha_is_the_value():
    values = np.array([[0, 100, 255]], np.uint8)
    pixels = decoded(uncertainty_png(values, "#102030"), "RGBA")
    np.testing.assert_array_equal(pixels[..., 3], values)
    np.testing.assert_array_equal(pixels[0, :, :3], [[16, 32, 48]] * 3)


def test_outlines_only_on_instance_borders():
    instances = np.zeros((6, 8), np.int32)
    instances[1:5, 1:4] = 1
    instances[1:5, 4:7] = 2
    pixels = decoded(outlines_png(instances, "#00ffff"), "RGBA")
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 1, 0],
            [0, 1, 0, 1, 1, 0, 1, 0],
            [0, 1, 0, 1, 1, 0, 1, 0],
            [0, 1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(pixels[..., 3] == 255, expected)
    np.testing.assert_array_equal(pixels[..., 3][~expected], 0)
    np.testing.assert_array_equal(pixels[expected][:, :3], [[0, 255, 255]] * expected.sum())


@pytest.mark.parametrize("colour", ["red", "#12345", "#gggggg", "1f77b4", 5])
def test_bad_colours_are_refused(colour):
    with pytest.raises(DeepscopeError, match="colour"):
        rgb(colour)
