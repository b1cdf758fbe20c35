"""Paired segmentation augmentation: image/target alignment, per-sample randomness, nearest labels, masks, 3D."""

from __future__ import annotations

import pytest
import torch

from deepscope.data.segmentation.augment import EDGE_TOLERANCE, SegAugmentConfig, augment_pair
from deepscope.errors import DeepscopeError

OFF = {"flip": False, "rot90": False}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image and the label map derived from it, so any misalignment breaks ``target == (image > 0.5)``."""
    image = torch.rand(shape, generator=gen(seed))
    return image, (image[:, 0] > 0.5).long()


@pytest.mark.parametrize("shape", [(16, 1, 6, 6), (16, 2, 4, 5, 5)])
def test_flip_rot90_keep_image_and_target_aligned(shape):
    image, target = pair(shape)
    out, labels, mask = augment_pair(image, target, SegAugmentConfig(), gen())
    assert labels.dtype == torch.int64 and labels.shape == target.shape
    assert torch.equal(labels, (out[:, 0] > 0.5).long())
    assert torch.equal(mask, torch.ones(shape[0], 1, *shape[2:]))  # no resampling: every pixel is real
    assert not torch.equal(out, image)
    # Only rearranged: every sample keeps its own values.
    assert torch.equal(out.flatten(1).sort(1).values, image.flatten(1).sort(1).values)


def test_each_sample_gets_its_own_flip_and_turn():
    image = torch.arange(36.0).view(1, 1, 6, 6).repeat(64, 1, 1, 1)
    out, _, _ = augment_pair(image, image[:, 0].long(), SegAugmentConfig(), gen())
    assert len({tuple(x.flatten().tolist()) for x in out}) == 8  # all 8 right-angle cases occur in one batch


def test_rot90_skipped_when_last_two_axes_differ():
    image = torch.arange(24.0).view(1, 1, 4, 6).repeat(32, 1, 1, 1)
    out, _, _ = augment_pair(image, image[:, 0].long(), SegAugmentConfig(flip=False), gen())
    assert torch.equal(out, image)


def test_seeded_generator_gives_the_same_augmentation():
    image, target = pair((4, 1, 12, 12))
    geometry = {"affine_degrees": 20, "affine_scale": 0.2, "elastic_sigma": 2, "elastic_alpha": 1}
    config = SegAugmentConfig(**geometry, noise_std=0.1, gamma=0.3, blur_sigma=1)
    first = augment_pair(image, target, config, gen(3))
    second = augment_pair(image, target, config, gen(3))
    other = augment_pair(image, target, config, gen(4))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])


def test_identity_config_returns_inputs_unchanged():
    image, target = pair((3, 2, 7, 7))
    mask = torch.rand(3, 7, 7) > 0.3
    config = SegAugmentConfig(**OFF)
    out, labels, kept = augment_pair(image, target, config, gen(), mask)
    assert torch.equal(out, image) and torch.equal(labels, target) and torch.equal(kept, mask)


@pytest.mark.parametrize("shape", [(6, 1, 16, 20), (4, 1, 6, 10, 10)])
def test_integer_targets_are_resampled_by_nearest_neighbour(shape):
    image = torch.rand(shape, generator=gen())
    values = torch.tensor([0, 3, 7, 2**30 + 1])  # averaging 3 and 7 would make 5; float32 would round 2**30 + 1
    target = values[torch.randint(4, (shape[0], 1, *shape[2:]), generator=gen(1))].to(torch.int32)
    config = SegAugmentConfig(**OFF, affine_degrees=30, affine_scale=0.3, elastic_sigma=2, elastic_alpha=2)
    _, labels, _ = augment_pair(image, target, config, gen())
    assert labels.dtype == torch.int32 and labels.shape == target.shape
    assert set(labels.unique().tolist()) <= set(values.tolist())
    assert (labels == 2**30 + 1).any()
    assert not torch.equal(labels, target)


@pytest.mark.parametrize("shape", [(6, 2, 16, 20), (4, 1, 8, 12, 12)])
def test_one_grid_for_image_and_float_target(shape):
    image = torch.rand(shape, generator=gen())
    config = SegAugmentConfig(**OFF, affine_degrees=20, affine_scale=0.2, elastic_sigma=2, elastic_alpha=1)
    out, target, mask = augment_pair(image, image.clone(), config, gen())
    assert target.min() >= 0 and target.max() <= 1  # bilinear/trilinear, padded with 0: no overshoot
    inside = mask.expand_as(out) > 0
    assert inside.float().mean() > 0.5 and not inside.all()
    # Reflection and zero padding agree only inside (up to the edge tolerance of the mask).
    torch.testing.assert_close(out[inside], target[inside], atol=EDGE_TOLERANCE, rtol=0)
    assert (target[~inside] != out[~inside]).any()


def test_mask_marks_pixels_sampled_outside_after_scale_down():
    image, target = pair((32, 1, 16, 16))
    given = torch.ones(32, 16, 16, dtype=torch.bool)
    config = SegAugmentConfig(**OFF, affine_scale=0.8)  # scales in [0.2, 1.8]
    _, labels, mask = augment_pair(image + 1, target + 1, config, gen(), given)  # labels >= 1 before
    assert mask.dtype == torch.bool and mask.shape == given.shape
    corners = mask[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    shrunk = ~corners.any(1)
    assert shrunk.sum() > 5 and (~shrunk).sum() > 5  # samples scaled down lose their corners, scaled up keep them
    assert mask[:, 6:10, 6:10].all()  # the centre always comes from inside
    far = mask.float().mean((1, 2)) < 0.5  # scaled by less than 0.7: the corners sample far outside
    assert far.sum() > 3 and (labels[far][:, [0, 0, -1, -1], [0, -1, 0, -1]] == 0).all()  # outside reads 0
    assert (labels[mask] >= 1).all()  # inside keeps real labels
    _, floats, _ = augment_pair(image, target + 1.0, config, gen())  # same draws, float target: zero padded too
    assert (floats[far][:, [0, 0, -1, -1], [0, -1, 0, -1]] == 0).all()
    assert torch.equal(mask, mask.flip(-1)) and torch.equal(mask, mask.flip(-2))  # a scale about the centre


def test_rotation_is_a_rotation_in_pixels_on_non_square_images():
    h, w = 24, 48
    ys, xs = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    disk = ((ys**2 + xs**2) <= 8**2).long().repeat(16, 1, 1)  # 208 pixels each
    out, labels, _ = augment_pair(disk[:, None].float(), disk, SegAugmentConfig(**OFF, affine_degrees=60), gen())
    assert not torch.equal(out, disk[:, None].float())
    # a disk stays a disk; rotating normalized coordinates shears it
    assert ((labels != disk).flatten(1).sum(1) <= 20).all()


@pytest.mark.parametrize("shape", [(8, 1, 12, 12), (4, 1, 5, 8, 8)])
def test_intensity_transforms_change_the_image_only(shape):
    image, target = pair(shape)
    probability = torch.rand(shape, generator=gen(2))
    for name, value in (("noise_std", 0.1), ("gamma", 0.5), ("blur_sigma", 1.5)):
        config = SegAugmentConfig(**OFF, **{name: value})
        out, labels, mask = augment_pair(image, target, config, gen())
        assert not torch.equal(out, image), name
        assert torch.equal(labels, target), name
        assert torch.equal(augment_pair(image, probability, config, gen())[1], probability), name
        assert torch.equal(mask, torch.ones(shape[0], 1, *shape[2:])), name


def test_intensity_transforms_known_effects():
    image = torch.rand(64, 1, 16, 16, generator=gen()) * 4 - 1
    out, _, _ = augment_pair(image, image, SegAugmentConfig(**OFF, noise_std=0.2), gen())
    assert abs((out - image).std().item() - 0.2) < 0.01
    out, _, _ = augment_pair(image, image, SegAugmentConfig(**OFF, gamma=0.5), gen())
    torch.testing.assert_close(out.amin((1, 2, 3)), image.amin((1, 2, 3)))  # rescaled to [0, 1] and back
    torch.testing.assert_close(out.amax((1, 2, 3)), image.amax((1, 2, 3)))
    out, _, _ = augment_pair(image, image, SegAugmentConfig(**OFF, blur_sigma=2), gen())
    spread = out.std((1, 2, 3)) / image.std((1, 2, 3))
    # smoother, by a sigma drawn per sample
    assert (spread <= 1 + 1e-6).all() and spread.min() < 0.3 and spread.max() > 0.7


def test_all_transforms_together_in_3d():
    image, target = pair((4, 2, 6, 8, 8))
    geometry = {"affine_degrees": 15, "affine_scale": 0.2, "elastic_sigma": 2, "elastic_alpha": 1}
    config = SegAugmentConfig(**geometry, noise_std=0.05, gamma=0.2, blur_sigma=1)
    out, labels, mask = augment_pair(image, target, config, gen())
    assert out.shape == image.shape and labels.shape == target.shape and mask.shape == (4, 1, 6, 8, 8)
    assert set(labels.unique().tolist()) <= {0, 1} and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("image", "target", "message"),
    [
        (torch.rand(2, 1, 8, 8), torch.zeros(3, 8, 8), r"\(2, 1, 8, 8\).*\(3, 8, 8\)"),
        (torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 9), r"\(2, 1, 8, 8\).*\(2, 1, 8, 9\)"),
        (torch.rand(2, 1, 4, 8, 8), torch.zeros(2, 4, 8), "target must be"),
        (torch.rand(2, 8, 8), torch.zeros(2, 8, 8), "image must be"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 8), "float tensor"),
    ],
)
def test_bad_shapes_are_refused(image, target, message):
    with pytest.raises(DeepscopeError, match=message):
        augment_pair(image, target, SegAugmentConfig(), gen())


def test_bad_mask_and_config_are_refused():
    image, target = pair((2, 1, 8, 8))
    with pytest.raises(DeepscopeError, match="mask shape"):
        augment_pair(image, target, SegAugmentConfig(), gen(), torch.ones(2, 8, 7))
    with pytest.raises(DeepscopeError, match="affine_scale"):
        SegAugmentConfig(affine_scale=1.0)
    with pytest.raises(DeepscopeError, match="noise_std"):
        SegAugmentConfig(noise_std=-0.1)
