"""Star-convex polygon (StarDist) method: targets, loss, non-maximum suppression and the star-convexity check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk, ellipse

from conftest import fit_batch
from deepscope.data.segmentation.star import (
    NON_STAR_CONVEX_IOU,
    batch_star_distances,
    batch_star_target,
    non_star_convex_fraction,
    object_probability,
    ray_directions,
    star_reconstruction,
)
from deepscope.errors import DataError, DeepscopeError
from deepscope.losses.star import stardist_loss
from deepscope.metrics.instance import overlap_table
from deepscope.postprocess.star import star_instances


def _distances(labels: np.ndarray, n_rays: int) -> np.ndarray:
    return batch_star_distances(torch.from_numpy(labels.astype(np.int64))[None], n_rays)[0].numpy()


def _discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: float) -> np.ndarray:
    """Discs drawn in order, so a later disc cuts into an earlier one and they touch along a straight edge."""
    labels = np.zeros(shape, np.int32)
    for index, centre in enumerate(centres, start=1):
        labels[disk(centre, radius, shape=shape)] = index
    return labels


def _proposals(
    shape: tuple[int, int], peaks: list[tuple[tuple[int, int], float]], radii: list[float], n_rays: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """prob with one isolated peak per proposal and dist giving each peak a disc of its radius."""
    prob = np.zeros(shape, np.float32)
    dist = np.zeros((n_rays, *shape), np.float32)
    for ((y, x), score), radius in zip(peaks, radii):
        prob[y, x] = score
        dist[:, y, x] = radius
    return prob, dist


# ---- targets ---------------------------------------------------------------------------------------------------------


def test_ray_directions_follow_stardist_and_refuse_too_few_rays():
    rays = ray_directions(8).numpy()
    assert rays.shape == (8, 2) and np.allclose(np.linalg.norm(rays, axis=1), 1)
    assert np.allclose(rays[0], [0, 1], atol=1e-7) and np.allclose(rays[2], [1, 0], atol=1e-7)  # (y, x): +x, then +y
    rays3d = ray_directions(20, ndim=3).numpy()
    assert rays3d.shape == (20, 3) and np.allclose(np.linalg.norm(rays3d, axis=1), 1, atol=1e-6)
    assert np.allclose(rays3d[[0, -1], 0], [-1, 1])  # the golden spiral runs from pole to pole along z
    for n_rays, ndim in ((2, 2), (5, 3), (8, 4)):
        with pytest.raises(DeepscopeError):
            ray_directions(n_rays, ndim)


def test_disc_distances_from_the_centre_are_its_radius():
    radius = 10
    labels = np.zeros((41, 41), np.int32)
    labels[disk((20, 20), radius + 0.5)] = 3
    assert np.abs(_distances(labels, 32)[:, 20, 20] - radius).max() < 0.75


def test_square_distances_along_the_axes_are_exact_and_background_is_zero():
    labels = np.zeros((30, 40), np.int32)
    labels[10:20, 20:30] = 5  # rows 10..19, columns 20..29
    labels[10:20, 30:34] = 6  # touching neighbour on the right: rays stop at the shared edge
    labels[0:4, 0:3] = 7  # at the patch corner: rays stop where the patch ends
    dist = _distances(labels, 8)
    # rays 0, 2, 4, 6 point to +x, +y, -x, -y; the edge is the outer face of the last object pixel
    np.testing.assert_allclose(dist[[0, 2, 4, 6], 12, 25], [4.5, 7.5, 5.5, 2.5], atol=1e-5)
    np.testing.assert_allclose(dist[[0, 2, 4, 6], 1, 1], [1.5, 2.5, 1.5, 1.5], atol=1e-5)
    assert (dist[:, labels == 0] == 0).all() and (dist[:, labels > 0] > 0).all()


def test_distances_and_probability_match_stardist_on_an_ellipse():
    """Reference numbers from stardist 0.9.2 (``star_dist(lab, 8)`` and ``edt_prob(lab)``) on the same image."""
    labels = np.zeros((24, 24), np.int32)
    labels[ellipse(11, 12, 6, 9, shape=labels.shape, rotation=0.5)] = 1
    labels[0:5, 0:6] = 2
    dist = _distances(labels, 8)
    diagonal = 3.707107
    np.testing.assert_allclose(dist[:, 9, 15], [5.5, 4.707107, 7.5, 12.707105, 9.5, 6.707106, 4.5, 4.707107], atol=1e-4)
    np.testing.assert_allclose(dist[:, 2, 3], [2.5, diagonal, 2.5, diagonal, 3.5, diagonal, 2.5, diagonal], atol=1e-4)
    prob = object_probability(labels)
    assert prob[2, 3] == pytest.approx(0.6)  # 3 from the next label, peak 5: the image border is no edge
    assert prob[11, 12] == pytest.approx(1.0) and prob[labels == 0].max() == 0


def test_target_shapes_and_probability_channel_in_2d_and_3d():
    labels = torch.zeros((2, 16, 16), dtype=torch.int64)
    labels[0, 4:9, 4:9] = 1  # 5x5 square with background around: centre 3 from outside, corners 1
    labels[1, 0:2, 0:2] = 4
    target = batch_star_target(labels, 16)
    assert target.shape == (2, 17, 16, 16) and target.dtype == torch.float32
    assert target[0, 0, 6, 6] == pytest.approx(1.0) and target[0, 0, 4, 4] == pytest.approx(1 / 3)
    assert target[1, 0, 1, 1] > 0  # even a 2x2 object has a probability peak to learn from
    assert (target[0][:, labels[0] == 0] == 0).all()

    volume = np.zeros((1, 21, 21, 21), np.int64)
    z, y, x = np.ogrid[:21, :21, :21]
    volume[0][(z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2 <= 7.5**2] = 2
    target3d = batch_star_target(torch.from_numpy(volume), 24)
    assert target3d.shape == (1, 25, 21, 21, 21)
    rays = target3d[0, 1:, 10, 10, 10].numpy()  # a few rays slip between surface voxels, as in StarDist
    assert np.abs(rays - 7.5).mean() < 0.3 and np.abs(rays - 7.5).max() < 1.25
    assert target3d[0, 0, 10, 10, 10] == pytest.approx(1.0)


def test_bad_labels_are_refused():
    with pytest.raises(DataError):
        batch_star_distances(torch.zeros((2, 8, 8)), 8)  # float: a probability map, not labels
    with pytest.raises(DataError):
        batch_star_distances(torch.zeros((8, 8), dtype=torch.int64), 8)  # no batch axis


# ---- loss ------------------------------------------------------------------------------------------------------------


def test_loss_falls_when_a_small_net_overfits_one_target():
    torch.manual_seed(0)
    labels = torch.from_numpy(_discs((24, 24), [(8, 8), (15, 16)], 5).astype(np.int64))[None]
    target = batch_star_target(labels, 8)
    image = (labels > 0).float()[:, None] + 0.1 * torch.randn(1, 1, 24, 24)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 9, 5, padding=2))
    losses = fit_batch(net, image, target, stardist_loss, steps=50, lr=2e-2, optimizer=torch.optim.Adam)
    assert losses[-1] < 0.5 * losses[0]


def test_loss_leaves_out_masked_pixels_and_checks_shapes():
    torch.manual_seed(0)
    target = batch_star_target(torch.from_numpy(_discs((16, 16), [(8, 8)], 5).astype(np.int64))[None], 8)
    logits = torch.randn(1, 9, 16, 16, requires_grad=True)
    mask = torch.ones(1, 1, 16, 16)
    mask[..., 6:10, :] = 0
    changed = logits.detach().clone()
    changed[..., 6:10, :] += 100.0
    assert stardist_loss(changed, target, mask).item() == pytest.approx(stardist_loss(logits, target, mask).item())
    stardist_loss(logits, target, mask).backward()
    assert (logits.grad[..., 6:10, :] == 0).all() and (logits.grad[..., :6, :] != 0).any()
    # the distance term is a probability-weighted mean: a uniform error of e on every ray costs e
    perfect = torch.cat([torch.logit(target[:, :1].clamp(1e-4, 1 - 1e-4)), target[:, 1:] + 2.0], dim=1)
    bce_only = stardist_loss(torch.cat([perfect[:, :1], target[:, 1:]], 1), target, dist_weight=1.0)
    assert float(stardist_loss(perfect, target, dist_weight=1.0) - bce_only) == pytest.approx(2.0, rel=1e-4)
    nothing = stardist_loss(logits, target, torch.zeros(1, 1, 16, 16))
    assert nothing.item() == 0.0
    with pytest.raises(DeepscopeError):
        stardist_loss(logits, target[:, :5])
    with pytest.raises(DeepscopeError):
        stardist_loss(logits, target, torch.ones(1, 9, 16, 16))


# ---- post-processing -------------------------------------------------------------------------------------------------


def test_round_trip_recovers_touching_discs():
    truth = _discs((64, 64), [(16, 16), (16, 30), (30, 20), (44, 44), (30, 34)], 8)
    target = batch_star_target(torch.from_numpy(truth.astype(np.int64))[None], 32)[0].numpy()
    labels = star_instances(target[0], target[1:])
    table, truth_ids, pred_ids = overlap_table(truth, labels)
    assert len(pred_ids) == len(truth_ids) == 5 and labels.dtype == np.int32
    assert (table.max(axis=1) > 0.8).all()


def test_round_trip_in_3d():
    volume = np.zeros((24, 24, 32), np.int64)
    z, y, x = np.ogrid[:24, :24, :32]
    volume[(z - 12) ** 2 + (y - 12) ** 2 + (x - 10) ** 2 <= 36] = 1
    volume[(z - 12) ** 2 + (y - 12) ** 2 + (x - 21) ** 2 <= 36] = 2
    target = batch_star_target(torch.from_numpy(volume)[None], 64)[0].numpy()
    labels = star_instances(target[0], target[1:])
    table, _, pred_ids = overlap_table(volume, labels)
    assert len(pred_ids) == 2 and (table.max(axis=1) > 0.8).all()


def test_nms_keeps_the_better_of_two_heavily_overlapping_shapes():
    prob, dist = _proposals((48, 48), [((24, 20), 0.8), ((24, 23), 0.9)], [10, 10])
    labels = star_instances(prob, dist)
    assert labels.max() == 1 and labels[24, 31] == 1 and labels[24, 11] == 0  # the disc around (24, 23) won


def test_nms_keeps_both_shapes_when_they_barely_touch():
    prob, dist = _proposals((48, 64), [((24, 20), 0.8), ((24, 40), 0.9)], [10, 10])
    labels = star_instances(prob, dist)
    assert labels.max() == 2 and labels[24, 40] == 1 and labels[24, 20] == 2  # ids follow the probability


def test_nms_is_greedy_along_a_chain_and_suppresses_small_shapes_inside_big_ones():
    # A overlaps B by half, B overlaps C by half, A and C barely: A wins over B, so C survives
    chain = [((24, 16), 0.9), ((24, 24), 0.8), ((24, 32), 0.7)]
    prob, dist = _proposals((48, 64), chain, [10, 10, 10])
    labels = star_instances(prob, dist)
    assert labels.max() == 2 and labels[24, 16] == 1 and labels[24, 38] == 2
    prob[24, 24] = 0.95  # B best: it suppresses both neighbours
    assert star_instances(prob, dist).max() == 1
    # a small disc inside a big one has an IoU of 0.11 but lies wholly inside it: StarDist's overlap suppresses it
    prob, dist = _proposals((48, 48), [((24, 24), 0.9), ((24, 26), 0.8)], [12, 4])
    assert star_instances(prob, dist).max() == 1


def test_instances_threshold_min_size_and_bad_input():
    prob, dist = _proposals((48, 64), [((24, 16), 0.9), ((24, 44), 0.4)], [10, 3])
    assert star_instances(prob, dist, prob_threshold=0.5).max() == 1
    assert star_instances(prob, dist, prob_threshold=0.3).max() == 2
    assert star_instances(prob, dist, prob_threshold=0.3, min_size=50).max() == 1
    assert not star_instances(np.zeros((8, 8)), np.zeros((8, 8, 8))).any()
    with pytest.raises(DataError):
        star_instances(prob, dist[:, :10])


# ---- star-convexity check --------------------------------------------------------------------------------------------


def test_non_star_convex_fraction_flags_a_u_shape_and_passes_discs():
    discs = _discs((64, 64), [(16, 16), (16, 30), (44, 44)], 7)
    u_shape = np.zeros((64, 64), np.int32)
    u_shape[10:50, 10:20] = 1
    u_shape[10:50, 40:50] = 1
    u_shape[40:50, 10:50] = 1
    assert (star_reconstruction(discs, 32) > 0.9).all()
    assert star_reconstruction(u_shape, 32)[0] < NON_STAR_CONVEX_IOU
    assert non_star_convex_fraction([discs, u_shape], 32) == (0.25, 1, 4)
    assert non_star_convex_fraction([np.zeros((8, 8), np.int32)], 32) == (0.0, 0, 0)
