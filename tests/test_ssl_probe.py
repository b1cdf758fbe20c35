"""Weighted kNN, label subsets, linear probes and the SSL report pictures, on tiny inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepscope.errors import DataError
from deepscope.metrics.knn import knn_accuracy, knn_predict
from deepscope.tasks.ssl.probe import label_subset, linear_probe, probe_rows, stratified_indices
from deepscope.tasks.ssl.report import embedding_map, nearest, neighbour_grid, write_ssl_report


def _at(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


def test_knn_predicts_the_nearest_cluster_and_caps_k() -> None:
    # three classes of five points around 0, 90 and 180 degrees, with different lengths (cosine ignores them)
    centres = [0.0, 90.0, 180.0]
    bank = torch.cat([_at([c + d for d in (-6, -3, 0, 3, 6)]) * torch.arange(1, 6)[:, None] for c in centres])
    labels = torch.arange(3).repeat_interleave(5)
    queries = _at([20, 75, 100, 200, -15])
    expected = torch.tensor([0, 1, 1, 2, 0])
    assert torch.equal(knn_predict(queries, bank, labels, 3), expected)  # k = 200 > 15 bank features
    assert knn_predict(queries, bank, labels, 3).dtype == torch.int64
    assert knn_accuracy(queries, torch.tensor([0, 1, 2, 2, -1]), bank, labels, 3) == pytest.approx(0.75)


def test_knn_unlabelled_bank_features_do_not_vote() -> None:
    bank = _at([0, 1, 30, 40])
    labels = torch.tensor([-1, -1, 1, 0])
    # the two identical-direction features have no label; of the rest, class 1 at 30 degrees is nearer
    assert knn_predict(_at([0]), bank, labels, 2, k=1).tolist() == [1]
    with pytest.raises(DataError, match="no labelled"):
        knn_predict(_at([0]), bank, torch.full((4,), -1), 2)


def test_knn_chunked_equals_one_chunk() -> None:
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    whole = knn_predict(queries, bank, labels, 4, k=20, chunk=50)
    assert torch.equal(knn_predict(queries, bank, labels, 4, k=20, chunk=7), whole)
    assert torch.equal(knn_predict(queries.double(), bank.double(), labels, 4, k=20, chunk=7), whole)  # cast to float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a run under bf16 autocast: still float32 votes
        assert torch.equal(knn_predict(queries, bank, labels, 4, k=20, chunk=7), whole)


def test_knn_temperature_decides_one_close_against_two_far() -> None:
    bank = _at([1, 25, -25])  # class 0 very close to the query, two class-1 features further away
    labels = torch.tensor([0, 1, 1])
    query = _at([0])
    assert knn_predict(query, bank, labels, 2, k=3, temperature=0.01).tolist() == [0]
    assert knn_predict(query, bank, labels, 2, k=3, temperature=10.0).tolist() == [1]


def test_label_subset_is_stratified_seeded_and_skips_unlabelled() -> None:
    labels = np.repeat(np.arange(10), 10)
    subset = label_subset(labels, 0.1, seed=3)
    assert len(subset) == 10 and set(labels[subset]) == set(range(10))
    assert np.array_equal(subset, label_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, label_subset(labels, 0.1, seed=4))
    assert np.all(np.diff(subset) > 0)
    with_unlabelled = np.concatenate([labels, np.full(20, -1)])
    assert np.array_equal(label_subset(with_unlabelled, 1.0, 0), np.arange(100))
    assert (with_unlabelled[label_subset(with_unlabelled, 0.3, 0)] >= 0).all()
    # a class of 2 among 98 of another keeps one item at 10 %
    skewed = np.array([0] * 98 + [1] * 2)
    assert np.bincount(skewed[label_subset(skewed, 0.1, 0)]).tolist() == [9, 1]


def test_stratified_indices_hits_the_size_exactly() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [-1] * 7)
    chosen = stratified_indices(labels, 40, seed=1)
    assert len(chosen) == 40
    assert np.bincount(labels[chosen] + 1).tolist() == [3, 19, 11, 7]  # 2.6, 18.7, 11.2, 7.5 by largest remainders


def _blobs(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(16)[:3] * 8
    y = np.repeat(np.arange(3), n_per_class)
    return (centres[y] + rng.normal(size=(len(y), 16))).astype(np.float32), y


def test_linear_probe_separates_blobs_at_each_fraction() -> None:
    train_x, train_y = _blobs(100, 0)
    test_x, test_y = _blobs(30, 1)
    test_y[:5] = -1  # unlabelled test images are not scored
    result = linear_probe(train_x, train_y, test_x, test_y, [0.1, 1.0])
    assert list(result) == [0.1, 1.0]
    assert result[1.0] > 0.95 and result[0.1] > 0.9


def test_linear_probe_without_labels_raises() -> None:
    x, y = _blobs(10, 0)
    with pytest.raises(DataError, match="^no labels in the training"):
        linear_probe(x, np.full_like(y, -1), x, y, [1.0])
    with pytest.raises(DataError, match="^no labels in the test"):
        linear_probe(x, y, x, np.full_like(y, -1), [1.0])


def test_probe_rows_name_the_fractions() -> None:
    rows = probe_rows(
        {"self-supervised": {0.01: 0.5, 0.1: 0.6, 1.0: 0.7}, "random init": {0.01: 0.2, 0.1: 0.3, 1.0: 0.4}},
        knn={"self-supervised": 0.65, "random init": 0.3},
    )
    assert rows[0] == {
        "encoder": "self-supervised",
        "linear 1%": 0.5,
        "linear 10%": 0.6,
        "linear 100%": 0.7,
        "kNN": 0.65,
    }
    assert rows[1]["encoder"] == "random init" and "kNN" not in probe_rows({"a": {1.0: 0.1}})[0]


def test_nearest_finds_the_query_itself_unless_excluded() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(60, 16)).astype(np.float32)
    idx, sims = nearest(bank[[3, 10]] * 2, bank, 4)
    assert idx.shape == (2, 4) and idx[:, 0].tolist() == [3, 10]
    assert sims[:, 0] == pytest.approx([1, 1], abs=1e-5) and (np.diff(sims, axis=1) <= 0).all()
    idx, _ = nearest(bank[[3, 10]], bank, 100, exclude=np.array([3, 10]))
    assert idx.shape == (2, 59) and 3 not in idx[0] and 10 not in idx[1]


def test_pictures_and_report_are_written(tmp_path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array([-1, 0, 1, 2]), 15)
    features = (np.eye(64)[labels + 1] * 5 + rng.normal(size=(60, 64))).astype(np.float32)
    embedding_map(features, labels, ["a", "b", "c"], tmp_path / "embedding.png", max_points=40)
    images = rng.random((60, 8, 8, 3)).astype(np.float32)
    neighbour_grid(
        images,
        features,
        (images * 255).astype(np.uint8),
        features,
        tmp_path / "neighbours.png",
        queries=3,
        neighbours=4,
        same_set=True,
    )
    for name in ("embedding.png", "neighbours.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    rows = probe_rows({"self-supervised": {0.1: 0.8, 1.0: 0.9}}, knn={"self-supervised": 0.85})
    history = [
        {"epoch": 1, "train_loss": 2.0, "val_knn_accuracy": 0.5},
        {"epoch": 2, "train_loss": 1.5, "val_knn_accuracy": 0.6},
    ]
    path = write_ssl_report(
        tmp_path,
        "ssl run",
        {"knn_accuracy": 0.85},
        history,
        rows,
        {"embedding": "embedding.png", "neighbours": "neighbours.png"},
    )
    page = path.read_text()
    assert path == tmp_path / "report.html"
    for text in (
        "Linear and kNN probes",
        "linear 10%",
        "0.8500",
        "pre-projection",
        "<img src='embedding.png'",
        "<img src='neighbours.png'",
        "Nearest neighbours",
        "curves.png",
    ):
        assert text in page
