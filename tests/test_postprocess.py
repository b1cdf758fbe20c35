"""Post-processing on perfect predictions of drawn objects: the instances must come back as drawn."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from deepscope.data.segmentation.targets import boundaries, foreground
from deepscope.errors import DataError
from deepscope.metrics.instance import match_counts
from deepscope.postprocess.watershed import connected_components, size_filter, watershed_from_seeds


def touching_discs() -> np.ndarray:
    """Radius-12 discs 22 pixels apart on a 64x64 canvas: they overlap, and disc 2 is drawn over disc 1."""
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[disk((32, 21), 12)] = 1
    labels[disk((32, 43), 12)] = 2
    return labels


def touching_balls() -> np.ndarray:
    """Radius-5 balls 9 voxels apart in a 16x16x24 volume, the second drawn over the first."""
    zz, yy, xx = np.indices((16, 16, 24))
    labels = np.zeros((16, 16, 24), dtype=np.int32)
    for i, x in enumerate((7, 16), start=1):
        labels[(zz - 8) ** 2 + (yy - 8) ** 2 + (xx - x) ** 2 <= 25] = i
    return labels


def assert_recovered(truth: np.ndarray, pred: np.ndarray, iou: float) -> None:
    n = int(truth.max())
    assert pred.dtype == np.int32 and np.unique(pred).tolist() == list(range(n + 1))
    assert match_counts(truth, pred, thresholds=(iou,))[iou] == (n, 0, 0)


def test_connected_components_splits_touching_discs_with_the_boundary_map():
    truth = touching_discs()
    fg, bd = foreground(truth)[0], boundaries(truth)[0]
    # without the boundary map the discs are one component
    assert np.unique(connected_components(fg)).tolist() == [0, 1]
    pred = connected_components(fg, bd)
    # the boundary pixels cut away for the seeds are given back: every disc pixel is labelled, as its own disc
    np.testing.assert_array_equal(pred > 0, truth > 0)
    assert_recovered(truth, pred, 0.9)
    np.testing.assert_array_equal(watershed_from_seeds(fg, bd), pred)


def test_connected_components_3d():
    truth = touching_balls()
    pred = connected_components(foreground(truth)[0], boundaries(truth)[0])
    assert_recovered(truth, pred, 0.9)


def test_maxima_seeds_split_overlapping_discs_without_boundaries():
    truth = touching_discs()
    fg = foreground(truth)[0]
    assert np.unique(watershed_from_seeds(fg)).tolist() == [0, 1]
    pred = watershed_from_seeds(fg, seeds="maxima", min_distance=5)
    assert_recovered(truth, pred, 0.9)
    # a small half disc on the image border lies within min_distance of it, and must not be excluded as a seed
    cut = np.zeros((20, 30), dtype=np.int32)
    cut[disk((0, 15), 3, shape=cut.shape)] = 1
    assert_recovered(cut, watershed_from_seeds(cut * 0.9, seeds="maxima"), 1.0)
    with pytest.raises(DataError, match="unknown seeds 'peaks'; choose one of components, maxima"):
        watershed_from_seeds(fg, seeds="peaks")


def test_size_filter_and_consecutive_ids():
    labels = np.zeros((10, 12), dtype=np.uint16)
    labels[1, 1:4] = 5  # 3-pixel speck
    labels[4:8, 4:9] = 9  # 20-pixel blob
    filtered = size_filter(labels, 4)
    assert filtered.dtype == np.uint16 and np.unique(filtered).tolist() == [0, 9]
    np.testing.assert_array_equal(filtered, np.where(labels == 9, 9, 0))
    assert np.unique(size_filter(labels, 20)).tolist() == [0, 9]  # exactly min_size voxels stays
    assert not size_filter(labels, 21).any()
    assert labels[1, 1] == 5  # the input is left alone
    prob = (labels > 0) * 0.9
    assert np.unique(connected_components(prob)).tolist() == [0, 1, 2]
    np.testing.assert_array_equal(connected_components(prob, min_size=4), (labels == 9).astype(np.int32))


def test_threshold_and_empty_maps():
    prob = np.zeros((8, 8))
    prob[2:5, 2:5] = 0.6
    assert connected_components(prob).sum() == 9 and not connected_components(prob, threshold=0.7).any()
    assert not watershed_from_seeds(np.zeros((8, 8)), seeds="maxima").any()


@pytest.mark.parametrize(
    ("fg", "bd", "message"),
    [
        (np.zeros((8, 8)), np.zeros((8, 9)), r"got \(8, 8\) and \(8, 9\)"),
        (np.zeros((8, 8)), np.zeros((1, 8, 8)), r"got \(8, 8\) and \(1, 8, 8\)"),
        (np.zeros((1, 1, 8, 8)), None, r"2D or 3D maps of one shape, got \(1, 1, 8, 8\) and \(1, 1, 8, 8\)"),
    ],
)
def test_bad_maps_raise(fg, bd, message):
    with pytest.raises(DataError, match=message):
        connected_components(fg, bd)
    with pytest.raises(DataError, match=message):
        watershed_from_seeds(fg, bd, seeds="maxima")
