"""Batched augmentation and loaders: per-image randomness, determinism, DDP sharding, equivalence."""

from __future__ import annotations

import numpy as np
import torch

from deepscope.data.classification.augment import AugmentConfig, cutout, random_crop, random_flip
from deepscope.data.classification.dataset import ImageSet
from deepscope.data.classification.loaders import BatchSpec, DeviceLoader, torch_loader


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_translates_each_image_within_padding():
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    out = random_crop(x, 2, gen(), 64, slice(None))
    pos = out[:, 0].flatten(1).argmax(1)
    ys, xs = pos // 9, pos % 9
    assert ((ys - 4).abs() <= 2).all() and ((xs - 4).abs() <= 2).all()
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 10  # per-image offsets, not one for the batch
    assert torch.equal(random_crop(x, 2, gen(), 64, slice(None)), out)  # seeded


def test_flip_is_per_image():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(32, 1, 1, 1)
    out = random_flip(x, gen(), 32, slice(None))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert (flipped | same).all() and flipped.any() and same.any()


def test_cutout_zeroes_a_square():
    x = torch.ones(50, 2, 20, 20)
    out = cutout(x, 4, gen(), 50, slice(None))
    zeros = (out == 0).sum((1, 2, 3)) / 2
    assert (zeros <= 16).all() and (zeros == 16).sum() > 30  # full square unless clipped by the border


def test_global_batch_parameters_are_sliced_for_ranks():
    x = torch.randn(8, 3, 10, 10)
    whole = random_crop(x, 3, gen(5), 8, slice(None))
    half = random_crop(x[4:], 3, gen(5), 8, slice(4, 8))
    assert torch.equal(whole[4:], half)


def make_set(n: int = 20) -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(rng.integers(0, 255, (n, 6, 6, 3)).astype(np.uint8), np.arange(n) % 2, [str(i) for i in range(n)])


def test_device_loader_matches_dataloader_without_augmentation():
    data = make_set()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    spec = BatchSpec(8, mean, std)
    fast = list(DeviceLoader(data, spec, torch.device("cpu"), channels_last=False))
    slow = list(torch_loader(data, spec))
    assert len(fast) == len(slow) == 3
    for (xa, ya), (xb, yb) in zip(fast, slow):
        torch.testing.assert_close(xa, xb)
        assert torch.equal(ya, yb)


def test_training_order_depends_on_seed_and_epoch_only():
    data = make_set(40)
    augment = AugmentConfig(crop_padding=1, flip=True, color_jitter=0.2, cutout=2)

    def epoch_batches(epoch: int) -> list[torch.Tensor]:
        loader = DeviceLoader(
            data, BatchSpec(8, [0.5] * 3, [0.25] * 3, shuffle=True, augment=augment, seed=1), torch.device("cpu")
        )
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    a, b, c = epoch_batches(2), epoch_batches(2), epoch_batches(3)
    assert len(a) == 5
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_ranks_split_the_global_batch():
    data = make_set(40)
    kwargs = {"shuffle": True, "augment": AugmentConfig(), "seed": 2}
    cpu = torch.device("cpu")
    single = list(DeviceLoader(data, BatchSpec(8, [0.5] * 3, [0.25] * 3, **kwargs), cpu))
    ranks = [
        list(DeviceLoader(data, BatchSpec(8, [0.5] * 3, [0.25] * 3, rank=r, world=2, **kwargs), cpu)) for r in range(2)
    ]
    for i, (x, y) in enumerate(single):
        torch.testing.assert_close(torch.cat([ranks[0][i][0], ranks[1][i][0]]), x)
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), y)


def test_16bit_images_scale_like_8bit():
    eight = make_set()
    sixteen = ImageSet(eight.images.astype(np.uint16) * 257, eight.labels, eight.sources)
    spec, cpu = BatchSpec(8, [0.5] * 3, [0.25] * 3), torch.device("cpu")
    for (xa, _), (xb, _) in zip(DeviceLoader(eight, spec, cpu), DeviceLoader(sixteen, spec, cpu)):
        torch.testing.assert_close(xa, xb)
    for (xa, _), (xb, _) in zip(torch_loader(eight, spec), torch_loader(sixteen, spec)):
        torch.testing.assert_close(xa, xb)
