"""Metrics on hand-computed cases, model shapes, and a model that must overfit a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import fit_batch
from deepscope.errors import DeepscopeError
from deepscope.metrics.classification import ClassificationMetrics
from deepscope.models import build_model, count_parameters


def test_classification_metrics_hand_computed():
    # predictions: 0,0,1,2,2,2 ; truth: 0,1,1,2,2,0
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 1, 2, 2, 0])
    logits = F.one_hot(pred, 3).float() * 5
    metrics = ClassificationMetrics(["a", "b", "c"], torch.device("cpu"))
    metrics.update(logits[:3], target[:3], torch.tensor(1.0))
    metrics.update(logits[3:], target[3:], torch.tensor(2.0))
    result = metrics.compute()
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["loss"] == pytest.approx(0.5)
    assert result["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert result["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5})
    assert result["per_class"]["b"] == pytest.approx({"precision": 1.0, "recall": 0.5})
    assert result["per_class"]["c"] == pytest.approx({"precision": 2 / 3, "recall": 1.0})
    assert result["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_scores_are_exact_ratios_of_counts_never_above_one():
    """torchmetrics' float32 averaging reported a balanced accuracy of 1.0000001192092896 for ten classes all right."""
    target = torch.arange(360) % 10
    metrics = ClassificationMetrics([str(i) for i in range(10)], torch.device("cpu"))
    metrics.update(F.one_hot(target, 10).float(), target, torch.tensor(0.0))
    result = metrics.compute()
    assert (result["accuracy"], result["balanced_accuracy"], result["top5_accuracy"]) == (1.0, 1.0, 1.0)
    assert all(v == {"precision": 1.0, "recall": 1.0} for v in result["per_class"].values())

    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 7, (1001,), generator=generator)
    logits = torch.randn(1001, 7, generator=generator) + 2 * F.one_hot(target, 7)
    metrics = ClassificationMetrics([str(i) for i in range(7)], torch.device("cpu"))
    for chunk in range(0, 1001, 128):
        metrics.update(logits[chunk : chunk + 128], target[chunk : chunk + 128], torch.tensor(0.0))
    result = metrics.compute()
    pred = logits.argmax(1)
    # the float nearest the true ratio, no closer one exists
    assert result["accuracy"] == int((pred == target).sum()) / 1001
    recalls = [int(((pred == c) & (target == c)).sum()) / int((target == c).sum()) for c in range(7)]
    assert result["balanced_accuracy"] == pytest.approx(sum(recalls) / 7, rel=1e-15, abs=0)
    assert result["top5_accuracy"] == int((logits.topk(5, 1).indices == target[:, None]).any(1).sum()) / 1001
    assert all(0 <= v["precision"] <= 1 and 0 <= v["recall"] <= 1 for v in result["per_class"].values())


def test_top5_accuracy_hand_computed():
    logits = torch.arange(10.0).repeat(2, 1)  # class 9 ranked first, class 0 last
    metrics = ClassificationMetrics([str(i) for i in range(10)], torch.device("cpu"))
    metrics.update(logits, torch.tensor([5, 4]), torch.tensor(0.0))
    result = metrics.compute()
    assert result["accuracy"] == 0.0
    assert result["top5_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn", "resnet18", "fastnet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_model_output_shape(name, shape):
    model = build_model(name, shape, 7).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)
    assert count_parameters(model) > 0


def test_resnet18_small_image_stem():
    model = build_model("resnet18", (3, 32, 32), 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert count_parameters(model) == pytest.approx(11.17e6, rel=0.01)


def test_unknown_model_or_argument():
    with pytest.raises(DeepscopeError, match="unknown model 'vgg'"):
        build_model("vgg", (3, 8, 8), 2)
    with pytest.raises(DeepscopeError, match="no argument"):
        build_model("cnn", (3, 8, 8), 2, depth=3)


@pytest.mark.parametrize("name", ["mlp", "cnn", "fastnet"])
def test_model_overfits_one_batch(name):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    model = build_model(name, (3, 16, 16), 4)
    fit_batch(model, x, y, F.cross_entropy, steps=80, lr=3e-3)
    assert (model(x).argmax(1) == y).all()
