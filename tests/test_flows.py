"""Cellpose-style flows: targets, loss and flow following back to instances, on small synthetic label images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fit_batch
from deepscope.data.segmentation.flows import batch_flow_target, batch_flows
from deepscope.errors import DataError, DeepscopeError
from deepscope.losses.flows import FLOW_SCALE, flows_loss
from deepscope.postprocess.flows import fill_holes, flow_instances, follow_flows


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return np.hypot(yy - centre[0], xx - centre[1]) <= radius


def _c_shape(shape: tuple[int, int], centre: tuple[int, int]) -> np.ndarray:
    """A thick ring open on its right: its centroid lies in the hole, outside the object."""
    yy, xx = np.indices(shape)
    r = np.hypot(yy - centre[0], xx - centre[1])
    return (r >= 9) & (r <= 17) & ~((xx > centre[1]) & (np.abs(yy - centre[0]) < 5))


def _scene() -> np.ndarray:
    """Three discs touching along straight borders (each pixel to its nearest centre) and one C shape."""
    shape = (80, 112)
    centres = np.array([(22, 20), (22, 40), (40, 30)])
    yy, xx = np.indices(shape)
    dist = np.hypot(yy[None] - centres[:, 0, None, None], xx[None] - centres[:, 1, None, None])
    labels = np.where(dist.min(0) <= 11, dist.argmin(0) + 1, 0)
    labels[_c_shape(shape, (40, 84))] = 4
    return labels


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_disc_flows_are_unit_vectors_towards_the_centre():
    disc = _disc((40, 44), (19, 23), 12)
    flows = batch_flows(torch.from_numpy(disc.astype(np.int64))[None])[0].numpy()
    yy, xx = np.indices(disc.shape)
    inward = np.stack([19 - yy, 23 - xx]).astype(float)
    radius = np.hypot(*inward)
    away = disc & (radius > 3)
    assert ((flows * inward).sum(0)[away] / radius[away]).min() > 0.9
    norm = np.linalg.norm(flows, axis=0)
    norm[19, 23] = 1  # the centre pixel of a symmetric object has no gradient, so no flow
    np.testing.assert_allclose(norm[disc], 1, atol=1e-5)
    assert not flows[:, ~disc].any()


def test_flows_of_an_object_do_not_depend_on_its_batch_mates():
    disc = torch.from_numpy(_disc((40, 40), (20, 20), 9).astype(np.int64))
    other = torch.from_numpy(_disc((40, 40), (20, 20), 19).astype(np.int64)) * 3
    alone = batch_flows(disc[None])
    together = batch_flows(torch.stack([disc, other]))
    torch.testing.assert_close(together[:1], alone)


def test_3d_ball_flows_point_to_the_centre():
    zz, yy, xx = np.indices((16, 18, 18))
    inward = np.stack([8 - zz, 9 - yy, 9 - xx]).astype(float)
    radius = np.sqrt((inward**2).sum(0))
    ball = radius <= 6
    flows = batch_flows(torch.from_numpy(ball.astype(np.int64))[None])[0].numpy()
    away = ball & (radius > 2)
    assert flows.shape == (3, 16, 18, 18)
    assert ((flows * inward).sum(0)[away] / radius[away]).min() > 0.9


def test_following_the_flows_of_a_c_shape_never_leaves_it():
    c_shape = _c_shape((48, 48), (24, 24))
    flows = batch_flows(torch.from_numpy(c_shape.astype(np.int64))[None])[0]
    points = torch.nonzero(torch.from_numpy(c_shape)).float()
    for _ in range(120):
        points = follow_flows(flows, points, 1)
        nearest = points.round().long().numpy()
        assert c_shape[nearest[:, 0], nearest[:, 1]].all()
    assert (points - points.median(0).values).norm(dim=1).max() < 2  # every path ends at one point


def test_flow_target_stacks_foreground_and_flows():
    labels = torch.from_numpy(_scene())[None]
    target = batch_flow_target(labels)
    assert target.shape == (1, 3, 80, 112)
    torch.testing.assert_close(target[:, 0], (labels > 0).float())
    torch.testing.assert_close(target[:, 1:], batch_flows(labels))


def test_flow_labels_must_be_integers():
    with pytest.raises(DataError, match="integers"):
        batch_flows(torch.zeros(1, 8, 8))
    with pytest.raises(DataError, match="negative"):
        batch_flows(-torch.ones(1, 8, 8, dtype=torch.long))


def _target(labels: np.ndarray) -> torch.Tensor:
    return batch_flow_target(torch.from_numpy(labels)[None])


def test_loss_is_zero_for_a_perfect_prediction_and_counts_flows_in_the_network_scale():
    target = _target(_scene())
    perfect = torch.cat([(target[:, :1] * 2 - 1) * 40, FLOW_SCALE * target[:, 1:]], 1)
    assert flows_loss(perfect, target) < 1e-6
    no_flow = perfect.clone()
    no_flow[:, 1:] = 0
    # each foreground pixel misses FLOW_SCALE**2 over ndim = 2 channels
    expected = FLOW_SCALE**2 * target[:, 0].mean() / 2
    torch.testing.assert_close(flows_loss(no_flow, target), expected)
    torch.testing.assert_close(flows_loss(no_flow, target, flow_weight=0.5), expected / 2)


def test_masked_pixels_do_not_contribute_to_the_loss():
    target = _target(_scene())
    logits = torch.randn_like(target, requires_grad=True)
    mask = torch.ones_like(target[:, :1])
    mask[..., :, 56:] = 0
    flows_loss(logits, target, mask).backward()
    assert not logits.grad[..., 56:].any() and logits.grad[..., :56].abs().sum() > 0
    changed = logits.detach().clone()
    changed[..., 56:] = 100
    torch.testing.assert_close(flows_loss(changed, target, mask), flows_loss(logits.detach(), target, mask))
    torch.testing.assert_close(flows_loss(logits.detach(), target, torch.zeros_like(mask)), torch.tensor(0.0))


def test_loss_refuses_mismatched_shapes():
    target = _target(_scene())
    with pytest.raises(DeepscopeError, match="shape"):
        flows_loss(torch.zeros(1, 2, 80, 112), target)
    with pytest.raises(DeepscopeError, match="mask"):
        flows_loss(target, target, torch.ones(1, 80, 112))


def test_loss_falls_when_a_tiny_net_overfits_one_target():
    torch.manual_seed(0)
    labels = np.zeros((24, 24), np.int64)
    labels[_disc((24, 24), (11, 12), 6)] = 1
    target = _target(labels)
    image = target[:, :1] + 0.1 * torch.randn_like(target[:, :1])
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 5, padding=2), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 3, 3, padding=1),
    )  # fmt: skip
    losses = fit_batch(net, image, target, flows_loss, steps=50, lr=1e-2, optimizer=torch.optim.Adam)
    assert losses[-1] < 0.3 * losses[0]


def test_true_flows_give_back_every_object_of_touching_discs_and_a_c_shape():
    labels = _scene()
    target = _target(labels)[0]
    found = flow_instances(target[0], FLOW_SCALE * target[1:])
    assert found.dtype == np.int32 and found.max() == labels.max()
    for i in range(1, labels.max() + 1):
        truth = labels == i
        match = np.bincount(found[truth]).argmax()
        assert match > 0 and _iou(found == match, truth) > 0.8


def test_3d_true_flows_give_back_two_touching_balls():
    zz, yy, xx = np.indices((20, 24, 30))
    dist = np.stack([np.sqrt((zz - 10) ** 2 + (yy - 12) ** 2 + (xx - c) ** 2) for c in (9, 20)])
    labels = np.where(dist.min(0) <= 7, dist.argmin(0) + 1, 0)
    target = _target(labels)[0]
    found = flow_instances(target[0], FLOW_SCALE * target[1:])
    assert found.max() == 2
    assert {_iou(found == found[10, 12, c], labels == i) > 0.9 for i, c in ((1, 9), (2, 20))} == {True}


def test_masks_whose_flows_disagree_with_their_shape_are_dropped():
    """A square whose flows all run to its corner is one cluster, but the flows of its mask run to its centre."""
    labels = np.zeros((48, 64), np.int64)
    labels[_disc((48, 64), (24, 16), 10)] = 1
    labels[14:34, 38:58] = 2
    flows = FLOW_SCALE * batch_flows(torch.from_numpy(labels)[None])[0]
    yy, xx = np.indices(labels.shape)
    to_corner = torch.from_numpy(np.stack([14 - yy, 38 - xx]).astype(np.float32))
    to_corner = to_corner / to_corner.norm(dim=0).clamp(min=1)
    flows = torch.where(torch.from_numpy(labels == 2), FLOW_SCALE * to_corner, flows)
    prob = torch.from_numpy((labels > 0).astype(np.float32))
    unchecked = flow_instances(prob, flows, flow_threshold=None)
    checked = flow_instances(prob, flows, flow_threshold=0.4)
    assert np.bincount(unchecked[labels == 2]).argmax() > 0  # kept without the check
    assert checked.max() == 1 and _iou(checked == 1, labels == 1) > 0.95


def test_flow_instances_refuses_misaligned_maps():
    with pytest.raises(DataError, match="flows"):
        flow_instances(np.zeros((8, 8)), np.zeros((2, 8, 9)))


def test_fill_holes_fills_holes_of_one_object_only():
    labels = np.zeros((12, 20), np.int32)
    labels[1:6, 1:6] = 1
    labels[3, 3] = 0  # a hole inside object 1
    labels[1:6, 8:11], labels[1:6, 12:15] = 2, 3
    labels[1, 11] = labels[5, 11] = 2  # background between 2 and 3, enclosed by both
    labels[8:12, 8:12] = 4
    labels[11, 9:11] = 0  # a notch open to the image border
    filled = fill_holes(labels)
    expected = labels.copy()
    expected[3, 3] = 1
    np.testing.assert_array_equal(filled, expected)
