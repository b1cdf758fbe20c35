"""Segmentation data plumbing: device targets equal the numpy ones, normalized views, lazy volumes, patch determinism."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries

from deepscope.data.io.views import ChannelsFirst, Normalized, percentiles
from deepscope.data.io.volumes import LazyVolume
from deepscope.data.segmentation.dataset import PatchDataset, PatchLoader, SegItem
from deepscope.data.segmentation.targets import (
    batch_boundaries,
    batch_class_map,
    batch_target,
    distance_map,
    foreground_and_boundaries,
)
from deepscope.errors import DataError
from deepscope.inference.geometry import halo_for
from deepscope.metrics.semantic import confusion, confusion_scores


@pytest.mark.parametrize("shape", [(3, 20, 17), (2, 9, 10, 11)])
def test_batch_boundaries_equal_find_boundaries(shape):
    labels = np.random.default_rng(0).integers(0, 4, shape)
    expected = np.stack([find_boundaries(sample, mode="thick") for sample in labels])
    assert np.array_equal(batch_boundaries(torch.from_numpy(labels)).numpy()[:, 0], expected)


def test_batch_targets_equal_numpy_targets():
    labels = np.zeros((2, 24, 24), np.int64)
    labels[0, 2:10, 2:10], labels[0, 2:10, 10:20], labels[1, 5:20, 5:9] = 1, 2, 7
    fb = batch_target("foreground_boundaries", torch.from_numpy(labels)).numpy()
    assert np.array_equal(fb, np.stack([foreground_and_boundaries(sample) for sample in labels]))
    dist = batch_target("distance", torch.from_numpy(labels)).numpy()
    assert np.allclose(dist, np.stack([distance_map(sample) for sample in labels]))


def test_batch_class_map_values_ignore_and_unknown():
    labels = torch.tensor([[0, 255, 7, 255]])
    assert batch_class_map(labels, [255, 0], ignore_label=7).tolist() == [[1, 0, -1, 0]]
    assert batch_class_map(torch.tensor([[0, 2, 9]]), None, ignore_label=9).tolist() == [[0, 2, -1]]
    with pytest.raises(DataError, match="label value 7 is not one of the classes"):
        batch_class_map(labels, [0, 255])


def test_percentiles_and_normalized_reads_per_channel():
    image = np.zeros((10, 10, 2), np.uint8)
    image[..., 0] = np.arange(100).reshape(10, 10)
    image[..., 1] = 50
    low, high = percentiles(image, 2, 0, 100)
    assert low.tolist() == [0, 50] and high.tolist() == [99, 50]
    view = Normalized(image, 2, low, high)
    block = view[2:4, 3:5]
    assert block.dtype == np.float32 and block.shape == (2, 2, 2)
    assert np.allclose(block[..., 0], image[2:4, 3:5, 0] / 99, atol=1e-6)
    assert np.allclose(block[..., 1], 0)


def test_percentiles_of_a_large_volume_read_a_subset(monkeypatch):
    import deepscope.data.io.views as module

    monkeypatch.setattr(module, "PERCENTILE_SAMPLES", 1000)
    volume = np.arange(20 * 10 * 10, dtype=np.float32).reshape(20, 10, 10)
    low, high = percentiles(volume, 3, 0, 100)
    assert low[0] == 0 and high[0] < volume.max()  # every other plane: the last one is skipped


def test_channels_first_views():
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3)).astype(np.uint8)
    view = ChannelsFirst(rgb, 2)
    assert view.shape == (3, 6, 8)
    assert np.array_equal(view[:, 1:3, 2:5], np.moveaxis(rgb[1:3, 2:5], -1, 0))
    grey = ChannelsFirst(rgb[..., 0], 2, channels=3)
    assert np.array_equal(grey[:, :2, :2], np.repeat(rgb[None, :2, :2, 0], 3, axis=0))
    with pytest.raises(DataError, match="has 3 channels but 2 are expected"):
        ChannelsFirst(rgb, 2, channels=2)


def _item(image, labels, ndim):
    low, high = percentiles(image, ndim, 1, 99.8)
    return SegItem("x", image, labels, Normalized(image, ndim, low, high))


def test_patch_dataset_is_a_function_of_seed_epoch_and_index():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (40, 40))
    data = PatchDataset(
        [_item(rng.integers(0, 255, (40, 40)).astype(np.uint8), labels, 2)], (16, 16), 8, channels=1, seed=3
    )
    first = data[5]
    assert all(torch.equal(a, b) for a, b in zip(first, data[5]))
    data.epoch = 1
    assert not torch.equal(first[1], data[5][1])


def test_lazy_volume_pickles_and_reads_in_worker_processes(tmp_path):
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"], f["label"] = rng.integers(0, 255, (12, 24, 24)).astype(np.uint8), rng.integers(0, 5, (12, 24, 24))
    raw, label = LazyVolume(tmp_path / "v.h5", "raw"), LazyVolume(tmp_path / "v.h5", "label")
    assert pickle.loads(pickle.dumps(raw))[2:4, 0, :3].tolist() == raw[2:4, 0, :3].tolist()
    data = PatchDataset([_item(raw, label, 3)], (4, 8, 8), 8, channels=1)
    batches = [list(PatchLoader(data, 4, torch.device("cpu"), num_workers=workers)) for workers in (0, 2)]
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_confusion_scores_known_answer():
    truth = np.array([[0, 0, 1, 1], [2, 2, 1, -1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 1, 2]])
    matrix = confusion(truth, pred, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    scores = confusion_scores(matrix)
    assert scores["per_class"]["1"]["iou"] == pytest.approx(3 / 4)
    assert scores["per_class"]["0"]["dice"] == pytest.approx(2 / 4)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)


def test_default_halo_keeps_windows_divisible():
    for tile, divisor in [((256, 256), (16, 16)), ((32, 128, 128), (1, 8, 8)), ((100,), (4,))]:
        halo = halo_for(tile, divisor)
        assert all((t + 2 * h) % d == 0 for t, h, d in zip(tile, halo, divisor))
        assert all(h >= t / 8 for t, h in zip(tile, halo))
