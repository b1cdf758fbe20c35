"""Training targets on hand-drawn label images, with the expected arrays written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from deepscope.data.segmentation.targets import (
    TARGETS,
    boundaries,
    distance_map,
    foreground,
    foreground_and_boundaries,
    make_target,
    semantic_target,
)
from deepscope.errors import DataError


def touching_squares() -> np.ndarray:
    """Two 4x4 squares side by side: object 1 in columns 1-4, object 2 in columns 5-8, rows 1-4."""
    labels = np.zeros((6, 10), dtype=np.int32)
    labels[1:5, 1:5] = 1
    labels[1:5, 5:9] = 2
    return labels


def test_foreground():
    target = foreground(touching_squares())
    assert target.shape == (1, 6, 10) and target.dtype == np.float32
    expected = np.zeros((6, 10), dtype=np.float32)
    expected[1:5, 1:9] = 1
    np.testing.assert_array_equal(target[0], expected)


def test_thick_boundaries_cover_both_sides_of_every_label_change():
    # A pixel is marked when its 4-neighbourhood holds two labels: the rings inside and outside each square
    # (background included) and the two columns 4 and 5 where the squares touch; only the 2x2 cores stay 0.
    expected = np.array(
        [
            [0, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 0, 0, 1, 1, 0, 0, 1, 1],
            [1, 1, 0, 0, 1, 1, 0, 0, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1, 1, 1, 1, 0],
        ],
        dtype=np.float32,
    )
    target = boundaries(touching_squares())
    assert target.shape == (1, 6, 10) and target.dtype == np.float32
    np.testing.assert_array_equal(target[0], expected)
    # "inner" keeps only the object side: the background ring drops out, the contact columns stay
    inner = expected * foreground(touching_squares())[0]
    np.testing.assert_array_equal(boundaries(touching_squares(), mode="inner")[0], inner)
    with pytest.raises(DataError, match="unknown boundary mode 'subpixel'; choose one of thick, inner, outer"):
        boundaries(touching_squares(), mode="subpixel")


def test_foreground_and_boundaries_stack():
    labels = touching_squares()
    target = foreground_and_boundaries(labels)
    assert target.shape == (2, 6, 10) and target.dtype == np.float32
    np.testing.assert_array_equal(target[0], foreground(labels)[0])
    np.testing.assert_array_equal(target[1], boundaries(labels)[0])
    np.testing.assert_array_equal(make_target("foreground_boundaries", labels), target)


def test_distance_map_hand_computed():
    # An isolated 3x3 square (id 1) and a 5x5 square (id 7, sparse ids): the border ring of each is cut away, so
    # the 3x3 keeps only its centre at distance 1, the 5x5 a 3x3 core with distance 1 around a centre of 2.
    labels = np.zeros((8, 12), dtype=np.uint16)
    labels[1:4, 1:4] = 1
    labels[1:6, 5:10] = 7
    raw = distance_map(labels, normalize=False)
    assert raw.shape == (1, 8, 12) and raw.dtype == np.float32
    expected = np.zeros((8, 12), dtype=np.float32)
    expected[2, 2] = 1
    expected[2:5, 6:9] = 1
    expected[3, 7] = 2
    np.testing.assert_array_equal(raw[0], expected)
    # normalized per object: both centres reach 1, the 5x5's core ring 1/2, border pixels the minimum 0
    normalized = expected / np.where(labels == 7, 2, 1)
    np.testing.assert_array_equal(distance_map(labels)[0], normalized)
    np.testing.assert_array_equal(make_target("distance", labels), distance_map(labels))


def test_distance_map_does_not_cross_touching_objects():
    # On the plain foreground the two touching squares would form one 10-wide block with a deeper middle.
    left, right = np.zeros((2, 9, 14), dtype=np.int64)
    left[2:7, 2:7] = 1
    right[2:7, 7:12] = 2
    both = distance_map(left + right, normalize=False)
    np.testing.assert_array_equal(both, distance_map(left, normalize=False) + distance_map(right, normalize=False))
    assert both.max() == 2


def test_3d_cube():
    labels = np.zeros((7, 7, 7), dtype=np.int32)
    labels[1:6, 1:6, 1:6] = 4
    assert foreground(labels).shape == (1, 7, 7, 7) and foreground(labels).sum() == 125
    # thick (6-connectivity in 3D): the cube's 125 - 27 = 98 surface voxels plus the 6 * 25 background voxels that
    # share a face with it; the box's edges and corners touch the cube only diagonally
    assert boundaries(labels).sum() == 98 + 150
    distance = distance_map(labels, normalize=False)[0]
    assert distance[3, 3, 3] == 2 and np.count_nonzero(distance == 1) == 26 and np.count_nonzero(distance) == 27
    assert distance_map(labels)[0, 3, 3, 3] == 1 and distance_map(labels)[0, 2, 3, 3] == 0.5


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((4, 4), np.float32), "cells_01.tif: labels must be integers, got float32"),
        (np.zeros((4, 4), bool), "cells_01.tif: labels must be integers, got bool"),
        (
            np.zeros((2, 2, 4, 4), int),
            r"cells_01.tif: labels must be 2D \(H, W\) or 3D \(D, H, W\), got shape \(2, 2, 4, 4\)",
        ),
        (np.zeros(4, int), r"cells_01.tif: .*got shape \(4,\)"),
        (np.full((4, 4), -1), "cells_01.tif: instance labels must not be negative, got -1"),
    ],
)
def test_bad_labels_raise_with_the_name(kind, labels, message):
    with pytest.raises(DataError, match=message):
        make_target(kind, labels, name="cells_01.tif")


def test_unknown_target_lists_the_choices():
    choices = "foreground, boundaries, foreground_boundaries, distance"
    with pytest.raises(DataError, match=f"img: unknown target 'edges'; choose one of {choices}$"):
        make_target("edges", touching_squares(), name="img")


def test_semantic_target_maps_ignore_label():
    labels = np.array([[0, 1, 2], [255, 2, 255]], dtype=np.uint8)
    target = semantic_target(labels, ignore_label=255)
    assert target.dtype == np.int64 and target.shape == (2, 3)
    np.testing.assert_array_equal(target, [[0, 1, 2], [-1, 2, -1]])
    np.testing.assert_array_equal(semantic_target(labels), labels)
    with pytest.raises(DataError, match="a.png: labels must be integers, got float64"):
        semantic_target(labels.astype(float), name="a.png")
