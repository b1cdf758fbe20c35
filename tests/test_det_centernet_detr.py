"""CenterNet and DETR: target rendering and decoding known answers, the Hungarian matcher, overfitting a synthetic
image, many objects per image, and batches of two sizes with an empty image."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torchvision.ops import box_iou

from deepscope.models.detection.centernet import (
    centernet,
    centre_focal_loss,
    decode_centres,
    gaussian_radius,
    render_targets,
)
from deepscope.models.detection.detr import detr, hungarian_match, set_losses, sine_position_encoding

TINY_CENTERNET = {"backbone": "tiny", "fpn_channels": 16}
TINY_DETR = {
    "backbone": "tiny",
    "fpn_channels": 16,
    "hidden_dim": 32,
    "heads": 4,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 64,
    "num_queries": 12,
    "max_detections": 12,
    "dropout": 0.0,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, loaded 2-core CPU two threads wait on each other and run these tiny models
    about ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def squares_image(count: int, size: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark image with ``count`` bright squares of side 5-10 px, one per 12-px grid cell, and their boxes."""
    generator = torch.Generator().manual_seed(seed)
    per_row = size // 12
    cells = torch.randperm(per_row**2, generator=generator)[:count]
    sides = torch.randint(5, 11, (count,), generator=generator)
    x1 = (cells % per_row) * 12 + torch.randint(0, 2, (count,), generator=generator)
    y1 = (cells // per_row) * 12 + torch.randint(0, 2, (count,), generator=generator)
    boxes = torch.stack([x1, y1, x1 + sides, y1 + sides], 1).float()
    image = torch.full((3, size, size), 0.1)
    for x_1, y_1, x_2, y_2 in boxes.long().tolist():
        image[:, y_1:y_2, x_1:x_2] = 0.9
    return image, boxes


def dense_maps(
    boxes: torch.Tensor, labels: torch.Tensor, classes: int, map_size: tuple[int, int]
) -> tuple[torch.Tensor, ...]:
    """Rendered targets as the heads' (1, C, H, W) outputs: heatmap, and size and offset written at the centres."""
    targets = render_targets(boxes, labels, classes, map_size)
    size, offset = torch.zeros(2, map_size[0] * map_size[1]), torch.zeros(2, map_size[0] * map_size[1])
    size[:, targets.index], offset[:, targets.index] = targets.size.T, targets.offset.T
    return targets.heatmap[None], size.view(1, 2, *map_size), offset.view(1, 2, *map_size)


def test_render_targets_known_answer() -> None:
    # centre (16, 17) px -> (4, 4.25) on the stride-4 map; 14 x 8 px -> 3.5 x 2 map pixels; radius 0 for so small a box
    small = render_targets(torch.tensor([[9.0, 13.0, 23.0, 21.0]]), torch.tensor([2]), 2, (8, 10))
    assert small.heatmap[1, 4, 4] == 1 and small.heatmap.sum() == 1 and small.heatmap[0].sum() == 0
    assert small.index.tolist() == [4 * 10 + 4]
    assert torch.allclose(small.size, torch.tensor([[3.5, 2.0]])) and torch.allclose(
        small.offset, torch.tensor([[0.0, 0.25]])
    )
    # a 40-px square is 10 map pixels: CornerNet's radius 2.73 -> 2, sigma (2 * 2 + 1) / 6
    assert gaussian_radius(torch.tensor(10.0), torch.tensor(10.0)).item() == pytest.approx((-28 + math.sqrt(1120)) / 2)
    big = render_targets(torch.tensor([[20.0, 20.0, 60.0, 60.0]]), torch.tensor([1]), 1, (16, 16))
    sigma = 5 / 6
    assert big.heatmap[0, 10, 10] == 1
    assert big.heatmap[0, 10, 11].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)))
    assert big.heatmap[0, 12, 12].item() == pytest.approx(math.exp(-8 / (2 * sigma**2)))
    assert big.heatmap[0, 10, 13] == 0  # beyond the radius
    assert (big.heatmap > 0).sum() == 25


def test_crowd_boxes_are_ignored_not_targets() -> None:
    rendered = render_targets(
        torch.tensor([[0.0, 0.0, 8.0, 8.0], [16.0, 16.0, 24.0, 28.0]]),
        torch.tensor([1, 1]),
        1,
        (8, 8),
        crowd=torch.tensor([False, True]),
    )
    assert rendered.heatmap.sum() == 1 and len(rendered.index) == 1
    assert rendered.ignore.sum() == 2 * 3 and rendered.ignore[4:7, 4:6].all()
    # ignored background costs nothing: one centre at logit 0 leaves only -(1 - 0.5)^2 log 0.5
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 1, 1] = 1
    loss = centre_focal_loss(torch.zeros(1, 1, 4, 4), target, torch.ones(1, 4, 4, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.25 * math.log(2))


def test_decode_recovers_rendered_boxes() -> None:
    _, boxes = squares_image(60, size=96, seed=1)
    labels = torch.arange(len(boxes)) % 2 + 1
    heatmap, size, offset = dense_maps(boxes, labels, 2, (24, 24))
    found = decode_centres(heatmap, size, offset, max_detections=500, score_threshold=0.5)[0]
    assert len(found["boxes"]) == len(boxes)
    order = box_iou(boxes, found["boxes"]).argmax(1)
    assert torch.allclose(found["boxes"][order], boxes, atol=1e-4)
    assert torch.equal(found["labels"][order], labels)


def test_centernet_returns_more_than_100_detections() -> None:
    image, boxes = squares_image(150, size=160, seed=2)
    heatmap, size, offset = dense_maps(boxes, torch.ones(150, dtype=torch.long), 1, (40, 40))
    assert len(decode_centres(heatmap, size, offset, max_detections=500, score_threshold=0.5)[0]["boxes"]) == 150
    model = centernet(1, **TINY_CENTERNET, min_size=160, max_size=160, score_thresh=0.0, nms_thresh=None).eval()
    with torch.no_grad():
        assert len(model([image])[0]["boxes"]) > 100


def test_centernet_overfits_squares() -> None:
    torch.manual_seed(0)
    image, boxes = squares_image(20)
    model = centernet(1, **TINY_CENTERNET, min_size=96, max_size=96)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    target = [{"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.long)}]
    losses = []
    for _ in range(30):
        loss = sum(model([image], target).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
    with torch.no_grad():
        found = model.eval()([image])[0]
    confident = found["boxes"][found["scores"] > 0.3]
    assert len(confident) <= len(boxes) + 2
    assert (box_iou(boxes, confident).max(1).values > 0.5).sum() >= 0.8 * len(boxes)
    assert torch.equal(found["labels"].unique(), torch.tensor([1]))


def test_hungarian_match_known_answer() -> None:
    targets = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])
    # query 0 sits on object 1, query 2 near object 0, query 1 far from both; the classes agree
    queries = torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.9, 0.1, 0.05, 0.05], [0.22, 0.2, 0.1, 0.1]])
    logits = torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    query, obj = hungarian_match(logits, queries, torch.tensor([1, 2]), targets)
    assert query.tolist() == [0, 2] and obj.tolist() == [1, 0]
    # L1 on cx only: object 0's nearest query (0, cost 0.1) would leave object 1 query 1 (0.8), 0.9 in all;
    # the optimum gives query 0 to object 1 (0.3) and query 1 to object 0 (0.4), 0.7 in all
    objects = torch.tensor([[0.4, 0.5, 0.1, 0.1], [0.8, 0.5, 0.1, 0.1]])
    guesses = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.0, 0.5, 0.1, 0.1]])
    query, obj = hungarian_match(torch.zeros(2, 3), guesses, torch.tensor([1, 1]), objects, class_cost=0, giou_cost=0)
    assert query.tolist() == [0, 1] and obj.tolist() == [1, 0]
    assert hungarian_match(logits, queries, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))[0].numel() == 0


def test_set_losses_vanish_for_perfect_boxes() -> None:
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.7, 0.6, 0.1, 0.3]]])
    losses = set_losses(torch.zeros(1, 3, 3), boxes, [{"labels": torch.tensor([2, 1]), "boxes": boxes[0, [2, 0]]}])
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6) and losses["loss_giou"].item() == pytest.approx(
        0, abs=1e-4
    )
    # uniform logits: every query's cross-entropy is log 3, whatever its weight
    assert losses["loss_ce"].item() == pytest.approx(math.log(3))


def test_sine_encoding_ignores_padding() -> None:
    padding = torch.zeros(1, 4, 6, dtype=torch.bool)
    padded = torch.ones(1, 6, 8, dtype=torch.bool)
    padded[:, :4, :6] = False
    assert torch.allclose(
        sine_position_encoding(padded, 16)[..., :4, :6], sine_position_encoding(padding, 16), atol=1e-5
    )


def test_detr_loss_falls_and_boxes_lie_in_the_image() -> None:
    torch.manual_seed(0)
    image, boxes = squares_image(3, size=64, seed=3)
    model = detr(2, **TINY_DETR, min_size=64, max_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = [{"boxes": boxes, "labels": torch.tensor([1, 2, 1])}]
    losses = []
    for _ in range(40):
        loss = sum(model([image], target).values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5]) / 2
    with torch.no_grad():
        found = model.eval()([image])[0]
    assert found["boxes"].shape == (12, 4) and found["scores"].shape == found["labels"].shape == (12,)
    assert (found["boxes"][:, :2] >= 0).all() and (found["boxes"][:, 2:] <= 64).all()
    assert (found["boxes"][:, 2:] >= found["boxes"][:, :2]).all()
    assert set(found["labels"].tolist()) <= {1, 2}


@pytest.mark.parametrize("build, settings", [(centernet, TINY_CENTERNET), (detr, TINY_DETR)], ids=["centernet", "detr"])
def test_two_sizes_and_an_empty_image(build, settings) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 80), torch.rand(3, 96, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 20.0, 30.0], [40.0, 30.0, 60.0, 50.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    model = build(2, **settings, min_size=64, max_size=128)
    losses = model(images, targets)
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        found = model.eval()(images)
    assert len(found) == 2
    for result, image in zip(found, images):
        height, width = image.shape[-2:]
        assert (
            (result["boxes"][:, 2] <= width).all()
            and (result["boxes"][:, 3] <= height).all()
            and (result["boxes"] >= 0).all()
        )
