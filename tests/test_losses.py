"""Segmentation losses on hand-computed cases, masks, ignore labels, 3D inputs, and a loss that must fall."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from deepscope.errors import DeepscopeError
from deepscope.losses.segmentation import bce_loss, build_loss, cross_entropy_loss, dice_bce_loss, dice_loss

BIG = 30.0  # sigmoid(+-30) is 1 or 0 to float32 precision


def logits_of(binary: torch.Tensor) -> torch.Tensor:
    """Logits whose sigmoid is the given 0/1 map."""
    return (binary.float() * 2 - 1) * BIG


def pixels(*where: tuple[int, int], size: int = 4) -> torch.Tensor:
    """A (1, 1, size, size) map that is 1 at the given (row, col) places."""
    image = torch.zeros(1, 1, size, size)
    for row, col in where:
        image[0, 0, row, col] = 1
    return image


def test_dice_hand_computed():
    square = pixels((0, 0), (0, 1), (1, 0), (1, 1))
    assert dice_loss(logits_of(square), square) == pytest.approx(0, abs=1e-4)
    assert dice_loss(logits_of(square), pixels((3, 3), (3, 2))) == pytest.approx(1, abs=1e-4)
    # 4 predicted, 4 true, 2 shared: 1 - 2*2/(4+4)
    assert dice_loss(logits_of(square), pixels((1, 0), (1, 1), (2, 0), (2, 1))) == pytest.approx(0.5, abs=1e-4)
    # 4 predicted, 2 true inside them: 1 - 2*2/(4+2)
    assert dice_loss(logits_of(square), pixels((0, 0), (1, 1))) == pytest.approx(1 / 3, abs=1e-4)
    # p = 0.5 on all 16 pixels, 4 true: squared denominator gives 1 - 2*2/(16*0.25+4); unsquared would give 1 - 4/12
    assert dice_loss(torch.zeros(1, 1, 4, 4), square) == pytest.approx(0.5, abs=1e-4)


def test_dice_averages_channels_but_pools_the_batch():
    perfect = pixels((0, 0), (0, 1), (1, 0), (1, 1))
    logits = torch.cat([logits_of(perfect), logits_of(pixels((3, 3)))], dim=1)
    target = torch.cat([perfect, pixels((0, 3))], dim=1)
    assert dice_loss(logits, target) == pytest.approx(0.5, abs=1e-4)  # pooling channels would give 1 - 8/10
    # the same two maps as two samples of one channel are pooled: 1 - 2*4/(5+5), not the per-sample mean 0.5
    assert dice_loss(logits.transpose(0, 1), target.transpose(0, 1)) == pytest.approx(0.2, abs=1e-4)


def test_masked_pixels_do_not_count():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 4, 4), (torch.rand(2, 2, 4, 4) > 0.5).float()
    wide_logits = torch.cat([logits, torch.full((2, 2, 4, 2), BIG)], dim=3)  # confident and wrong in the extra columns
    wide_target = torch.cat([target, torch.zeros(2, 2, 4, 2)], dim=3)
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[..., 4:] = False
    for loss in (dice_loss, bce_loss, dice_bce_loss):
        assert loss(wide_logits, wide_target, mask) == pytest.approx(float(loss(logits, target)), abs=1e-6)
        assert loss(wide_logits, wide_target) > loss(logits, target) + 0.1
    classes = torch.randint(0, 2, (2, 4, 4))
    wide_classes = torch.cat([classes, torch.zeros(2, 4, 2, dtype=torch.long)], dim=2)
    masked = cross_entropy_loss(wide_logits, wide_classes, mask=mask)
    assert masked == pytest.approx(float(cross_entropy_loss(logits, classes)), abs=1e-6)


def test_bce_matches_torch_and_survives_full_mask():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 5), (torch.rand(2, 3, 5, 5) > 0.3).float()
    assert bce_loss(logits, target) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, target)))
    expected = F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1)
    )
    assert bce_loss(logits, target, pos_weight=[1.0, 2.0, 5.0]) == pytest.approx(float(expected))
    logits.requires_grad_(True)
    loss = bce_loss(logits, target, torch.zeros(2, 1, 5, 5))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_softmax_dice_class_map_equals_one_hot():
    torch.manual_seed(0)
    logits, classes = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    one_hot = F.one_hot(classes, 3).permute(0, 3, 1, 2).float()
    from_map = dice_loss(logits, classes, activation="softmax")
    assert from_map == pytest.approx(float(dice_loss(logits, one_hot, activation="softmax")), abs=1e-6)
    assert 0.3 < from_map < 1
    assert dice_loss(one_hot * BIG, classes, activation="softmax") == pytest.approx(0, abs=1e-4)


def test_cross_entropy_ignore_label():
    torch.manual_seed(0)
    logits, classes = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert cross_entropy_loss(logits, classes) == pytest.approx(float(F.cross_entropy(logits, classes)))
    weight = torch.tensor([1.0, 3.0, 0.5])
    expected = F.cross_entropy(logits, classes, weight=weight)
    assert cross_entropy_loss(logits, classes, weight=weight) == pytest.approx(float(expected))
    ignored = classes.clone()
    ignored[:, :2] = -1
    other = logits.clone()
    other[:, :, :2] = 100 * torch.randn(2, 3, 2, 4)
    loss = cross_entropy_loss(logits, ignored)
    assert loss == pytest.approx(float(cross_entropy_loss(other, ignored)))
    assert loss == pytest.approx(float(F.cross_entropy(logits[:, :, 2:], classes[:, 2:])))
    assert loss != pytest.approx(float(cross_entropy_loss(logits, classes)))
    free = logits.clone().requires_grad_(True)
    all_ignored = cross_entropy_loss(free, torch.full_like(classes, 255), ignore_index=255)
    all_ignored.backward()
    assert all_ignored.item() == 0.0
    assert torch.equal(free.grad, torch.zeros_like(free))


@pytest.mark.parametrize("name", ["dice", "bce", "dice_bce", "ce"])
def test_3d_equals_2d_with_depth_folded_into_height(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5, 5)) if name == "ce" else (torch.rand(2, 3, 4, 5, 5) > 0.5).float()
    mask = torch.rand(2, 1, 4, 5, 5) > 0.2
    loss = build_loss(name)
    volume = loss(logits, target, mask)
    flat = loss(logits.flatten(2, 3), target.flatten(-3, -2), mask.flatten(2, 3))
    assert volume.ndim == 0 and volume.item() == pytest.approx(flat.item(), abs=1e-6)
    volume.backward()
    assert logits.grad.abs().sum() > 0


def test_dice_bce_falls_when_optimised():
    torch.manual_seed(0)
    target = (torch.rand(2, 2, 8, 8) > 0.7).float()
    logits = torch.zeros(2, 2, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.2)
    loss = build_loss("dice_bce")
    start = loss(logits, target, None).item()
    for _ in range(50):
        value = loss(logits, target, None)
        opt.zero_grad()
        value.backward()
        opt.step()
    assert loss(logits, target, None).item() < 0.1 * start


def test_build_loss_binds_options_and_keeps_float32():
    torch.manual_seed(0)
    logits, target = torch.randn(1, 2, 4, 4), (torch.rand(1, 2, 4, 4) > 0.5).float()
    weighted = build_loss("dice_bce", dice_weight=2.0, bce_weight=0.0)(logits, target, None)
    assert weighted == pytest.approx(2 * float(dice_loss(logits, target)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert build_loss("dice")(logits.bfloat16(), target, None).dtype == torch.float32


def test_bad_input_raises():
    logits = torch.zeros(2, 1, 32, 32)
    shapes = "target shape (2, 1, 30, 30) does not match logits shape (2, 1, 32, 32)"
    for loss in (dice_loss, bce_loss, dice_bce_loss):
        with pytest.raises(DeepscopeError, match=re.escape(shapes)):
            loss(logits, torch.zeros(2, 1, 30, 30))
    three = torch.zeros(2, 3, 8, 8)
    with pytest.raises(DeepscopeError, match=re.escape("target shape (2, 8, 7)")):
        cross_entropy_loss(three, torch.zeros(2, 8, 7, dtype=torch.long))
    with pytest.raises(DeepscopeError, match=re.escape("target shape (2, 9, 8)")):
        dice_loss(three, torch.zeros(2, 9, 8, dtype=torch.long), activation="softmax")
    for bad in (lambda t: cross_entropy_loss(three, t), lambda t: dice_loss(three, t, activation="softmax")):
        with pytest.raises(DeepscopeError, match="class map must be integers"):
            bad(torch.zeros(2, 8, 8))
        with pytest.raises(DeepscopeError, match="label 3 but logits have 3 channels"):
            bad(torch.full((2, 8, 8), 3))
    with pytest.raises(DeepscopeError, match=re.escape("mask shape (2, 1, 8, 7) does not broadcast")):
        dice_loss(three, torch.zeros(2, 3, 8, 8), torch.ones(2, 1, 8, 7))
    with pytest.raises(DeepscopeError, match="pos_weight has 2 values"):
        bce_loss(three, torch.zeros(2, 3, 8, 8), pos_weight=[1.0, 2.0])
    with pytest.raises(DeepscopeError, match="unknown dice activation"):
        dice_loss(three, torch.zeros(2, 3, 8, 8), activation="tanh")
    with pytest.raises(DeepscopeError, match="unknown loss 'focal'; choose one of bce, ce, dice, dice_bce"):
        build_loss("focal")
    with pytest.raises(DeepscopeError, match="no argument"):
        build_loss("ce", pos_weight=2.0)
