"""Box-aware detection augmentation and training batches: known answers, validity of every box, exact replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_area

from deepscope.config import from_dict
from deepscope.data.detection.augment import DetAugmentConfig, augment_sample, mosaic
from deepscope.data.detection.batches import DetBatches, DetSample
from deepscope.errors import DeepscopeError

NO_AUGMENT = {
    "hflip": 0.0,
    "vflip": 0.0,
    "rot90": False,
    "scale_jitter": [1.0, 1.0],
    "crop": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "hue": 0.0,
}
CPU = torch.device("cpu")


def only(**changes: object) -> DetAugmentConfig:
    return DetAugmentConfig(**{**NO_AUGMENT, **changes})


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W) uint8 masks filling each integer box, so a moved mask can be compared with its moved box."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        masks[k, y1:y2, x1:x2] = 1
    return masks


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """The tight box (xyxy, pixel edges) around each mask."""
    out = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """Pixels that say where they came from: channel 0 = x / 256, channel 1 = y / 256."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([x, y, torch.zeros_like(x)]).float() / 256


def sample(height: int = 8, width: int = 12) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    boxes = torch.tensor([[1.0, 2.0, 4.0, 5.0], [6.0, 0.0, 12.0, 3.0]])
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2]),
        "iscrowd": torch.tensor([False, True]),
        "masks": box_masks(boxes, height, width),
        "image_id": 7,
    }
    return coordinate_image(height, width), target


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_valid(image: torch.Tensor, target: dict[str, torch.Tensor]) -> None:
    height, width = image.shape[-2:]
    boxes = target["boxes"]
    assert boxes.dtype == torch.float32 and boxes.shape[1] == 4
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
    assert len(target["labels"]) == len(target["iscrowd"]) == len(boxes)
    if "masks" in target:
        assert target["masks"].shape == (len(boxes), height, width) and target["masks"].dtype == torch.uint8


def test_flips_and_turns_move_boxes_masks_and_pixels_together() -> None:
    image, target = sample()
    out, flipped = augment_sample(image, target, only(hflip=1.0), generator())
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[8.0, 2.0, 11.0, 5.0], [0.0, 0.0, 6.0, 3.0]]))
    torch.testing.assert_close(out, image.flip(-1))
    torch.testing.assert_close(mask_boxes(flipped["masks"]), flipped["boxes"])
    assert (
        flipped["labels"].tolist() == [1, 2]
        and flipped["iscrowd"].tolist() == [False, True]
        and flipped["image_id"] == 7
    )
    _, flipped = augment_sample(image, target, only(vflip=1.0), generator())
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[1.0, 3.0, 4.0, 6.0], [6.0, 5.0, 12.0, 8.0]]))
    torch.testing.assert_close(mask_boxes(flipped["masks"]), flipped["boxes"])
    seen = set()
    for seed in range(12):  # a non-square image is only ever turned by 0 or 180 degrees (orientation kept)
        out, turned = augment_sample(image, target, only(rot90=True), generator(seed))
        assert out.shape == image.shape
        torch.testing.assert_close(mask_boxes(turned["masks"]), turned["boxes"])
        seen.add(tuple(turned["boxes"][0].tolist()))
    assert seen == {(1.0, 2.0, 4.0, 5.0), (8.0, 3.0, 11.0, 6.0)}


def test_quarter_turns_of_square_images_keep_boxes_on_their_pixels() -> None:
    image, target = sample(12, 12)
    shapes = set()
    for seed in range(16):
        out, turned = augment_sample(image, target, only(rot90=True), generator(seed))
        torch.testing.assert_close(mask_boxes(turned["masks"]), turned["boxes"])
        x1, y1, x2, y2 = turned["boxes"][0].long().tolist()
        corners = out[:2, y1:y2, x1:x2] * 256  # the turned box still covers the original pixels x 1..3, y 2..4
        assert set(corners[0].unique().tolist()) == {1.0, 2.0, 3.0} and set(corners[1].unique().tolist()) == {
            2.0,
            3.0,
            4.0,
        }
        shapes.add(tuple(turned["boxes"][0].tolist()))
    assert len(shapes) == 4


def test_scale_jitter_scales_boxes_and_masks_with_the_image() -> None:
    image, target = sample()
    out, scaled = augment_sample(image, target, only(scale_jitter=[2.0, 2.0]), generator())
    assert out.shape == (3, 16, 24)
    torch.testing.assert_close(scaled["boxes"], target["boxes"] * 2)
    torch.testing.assert_close(mask_boxes(scaled["masks"]), scaled["boxes"])


def test_crop_clips_cut_boxes_and_drops_hidden_ones_with_their_labels_and_masks() -> None:
    """The crop window is read back from the coordinate-coded pixels and the output checked against the rule."""
    image, target = sample(16, 16)
    target["boxes"] = torch.tensor([[0.0, 0.0, 4.0, 4.0], [6.0, 6.0, 10.0, 10.0], [12.0, 1.0, 16.0, 15.0]])
    target["labels"], target["iscrowd"] = torch.tensor([1, 2, 3]), torch.tensor([False, True, False])
    target["masks"] = box_masks(target["boxes"], 16, 16)
    config = only(crop=1.0, crop_min=0.4, min_visible=0.3)
    clipped = dropped = 0
    for seed in range(40):
        out, cropped = augment_sample(image, target, config, generator(seed))
        left, top = round(out[0, 0, 0].item() * 256), round(out[1, 0, 0].item() * 256)
        height, width = out.shape[-2:]
        shifted = target["boxes"] - torch.tensor([left, top, left, top])
        clip = torch.stack(
            [
                shifted[:, 0].clamp(0, width),
                shifted[:, 1].clamp(0, height),
                shifted[:, 2].clamp(0, width),
                shifted[:, 3].clamp(0, height),
            ],
            1,
        )
        visible = box_area(clip) / box_area(target["boxes"])
        kept = visible >= 0.3
        torch.testing.assert_close(cropped["boxes"], clip[kept])
        assert cropped["labels"].tolist() == target["labels"][kept].tolist()
        assert cropped["iscrowd"].tolist() == target["iscrowd"][kept].tolist()
        torch.testing.assert_close(cropped["masks"], target["masks"][kept][:, top : top + height, left : left + width])
        dropped += int((~kept).sum())
        clipped += int(((visible < 1) & kept).sum())
    assert clipped and dropped


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_every_box_stays_valid_under_random_augmentation(channels: int) -> None:
    rng = np.random.default_rng(channels)
    config = DetAugmentConfig(
        vflip=0.5,
        rot90=True,
        crop=0.7,
        crop_min=0.2,
        scale_jitter=[0.3, 1.7],
        min_visible=0.0,
        brightness=0.5,
        contrast=0.5,
        saturation=0.5,
        hue=0.1,
    )
    gen = generator(channels)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(3, 40, 2))
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 1, (n, 2, 2)) * [width, height]
        boxes = torch.tensor(
            np.concatenate([xy.min(1), xy.max(1) + 0.05], 1).clip(0, [width, height, width, height]),
            dtype=torch.float32,
        )
        target = {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "masks": box_masks(boxes, height, width)}
        image = torch.rand(channels, height, width, generator=gen)
        out, augmented = augment_sample(image, target, config, gen)
        assert_valid(out, augmented)
        assert out.shape[0] == channels and out.min() >= 0 and out.max() <= 1
        assert (out.shape[-2] > out.shape[-1]) == (height > width)  # orientation kept for aspect-grouped batches


def test_same_seed_same_output_and_other_seed_differs() -> None:
    image, target = sample(20, 30)
    config = DetAugmentConfig()
    first = augment_sample(image, target, config, generator(3))
    again = augment_sample(image, target, config, generator(3))
    other = augment_sample(image, target, config, generator(4))
    torch.testing.assert_close(first[0], again[0])
    torch.testing.assert_close(first[1]["boxes"], again[1]["boxes"])
    assert first[0].shape != other[0].shape or not torch.equal(first[0], other[0])


def test_mosaic_puts_each_image_and_its_boxes_in_its_quadrant() -> None:
    samples = []
    for k in range(4):
        height, width = (10, 14) if k % 2 else (14, 10)
        boxes = torch.tensor([[0.0, 0.0, float(width), float(height)]])
        samples.append(
            (
                torch.full((1, height, width), (k + 1) / 8),
                {"boxes": boxes, "labels": torch.tensor([k + 1]), "masks": box_masks(boxes, height, width)},
            )
        )
    for seed in range(5):
        out, target = mosaic(samples, (24, 32), generator(seed), min_visible=0.0)
        assert out.shape == (1, 24, 32)
        assert_valid(out, target)
        assert target["labels"].tolist() == [1, 2, 3, 4]
        _, _, cx, cy = target["boxes"][0].tolist()
        assert 8 <= cx <= 24 and 6 <= cy <= 18
        torch.testing.assert_close(
            target["boxes"],
            torch.tensor([[0, 0, cx, cy], [cx, 0, 32, cy], [0, cy, cx, 24], [cx, cy, 32, 24]], dtype=torch.float32),
        )
        for k, (x1, y1, x2, y2) in enumerate(target["boxes"].long().tolist()):
            torch.testing.assert_close(out[0, y1:y2, x1:x2], torch.full((y2 - y1, x2 - x1), (k + 1) / 8))
            assert target["masks"][k].sum() == (x2 - x1) * (y2 - y1)


def test_mosaic_rejects_mixed_masks_and_config_checks_values() -> None:
    image, target = sample()
    bare = {"boxes": target["boxes"], "labels": target["labels"]}
    with pytest.raises(DeepscopeError, match="masks on all four"):
        mosaic([(image, target)] * 3 + [(image, bare)], (8, 8), generator())
    config = from_dict(DetAugmentConfig, {"scale_jitter": [0.8, 1.2], "rot90": True, "crop": 0})
    assert config.scale_jitter == [0.8, 1.2] and config.rot90 and config.crop == 0.0
    with pytest.raises(DeepscopeError, match="scale_jitter"):
        DetAugmentConfig(scale_jitter=[1.5, 0.5])
    with pytest.raises(DeepscopeError, match="hflip"):
        DetAugmentConfig(hflip=2)


def det_samples(shapes: list[tuple[int, int]], dtype: type = np.uint8) -> list[DetSample]:
    """Images whose first pixel and ``image_id`` give their index; every third has no objects."""
    samples = []
    for i, (height, width) in enumerate(shapes):
        image = np.zeros((height, width, 1), dtype)
        image[0, 0] = i
        n = 0 if i % 3 == 0 else 2
        boxes = np.array([[1, 1, 4, 4], [2, 0, 5, 3]], np.float32)[:n]
        target = {"boxes": boxes, "labels": np.ones(n, np.int64), "iscrowd": np.zeros(n, bool), "image_id": i}
        masks = box_masks(torch.from_numpy(boxes), height, width).bool().numpy()
        samples.append(DetSample(image, target, masks=lambda masks=masks: masks))
    return samples


def test_batches_shard_the_epoch_over_ranks_with_equal_lengths() -> None:
    shapes = [(8, 12) if i % 2 else (12, 8) for i in range(11)]
    samples = det_samples(shapes)
    ranks = [DetBatches(samples, 2, CPU, rank=r, world=2, seed=5) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 5 landscape + 6 portrait -> 3 + 3 batches of 2 -> 3 steps each
    served = []
    for loader in ranks:
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, targets in batches:
            assert len(images) == len(targets) <= 2
            assert len({img.shape[-2] > img.shape[-1] for img in images}) == 1  # never mixes orientations
            served += [t["image_id"] for t in targets]
    assert sorted(served) == list(range(11))


def test_batches_replay_an_epoch_exactly_and_reshuffle_the_next() -> None:
    shapes = [(16, 20), (20, 16), (16, 16), (18, 24), (24, 18), (16, 16), (20, 20), (17, 23)]
    loader = DetBatches(
        det_samples(shapes), 3, CPU, seed=1, augment=DetAugmentConfig(rot90=True, vflip=0.5, mosaic=0.5)
    )
    assert len(loader) == 3  # 6 landscape (square included) + 2 portrait
    loader.set_epoch(2)
    first, again = list(loader), list(loader)
    loader.set_epoch(3)
    other = list(loader)
    for (images_a, targets_a), (images_b, targets_b) in zip(first, again):
        for a, b, ta, tb in zip(images_a, images_b, targets_a, targets_b):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(ta["boxes"], tb["boxes"])
            torch.testing.assert_close(ta["masks"], tb["masks"])
    for images, targets in first:
        assert len({img.shape[-2] > img.shape[-1] for img in images}) == 1
        for image, target in zip(images, targets):
            assert_valid(image, target)
            assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert [len(b[0]) for b in first] != [len(b[0]) for b in other] or any(
        not torch.equal(a, b) or a.shape != b.shape for x, y in zip(first, other) for a, b in zip(x[0], y[0])
    )


def test_batches_scale_uint16_by_its_maximum_and_keep_empty_images() -> None:
    samples = det_samples([(6, 6)] * 3, np.uint16)
    samples[0].image[:] = 65535
    loader = DetBatches(samples, 4, CPU, seed=0, group_aspect=False)
    ((images, targets),) = list(loader)
    assert len(images) == 3
    for image, target in zip(images, targets):
        if target["image_id"] == 0:
            assert (image == 1).all() and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
            assert target["masks"].shape == (0, 6, 6)
        else:
            assert image[0, 0, 0] == pytest.approx(target["image_id"] / 65535)
            torch.testing.assert_close(mask_boxes(target["masks"]), target["boxes"])


def test_close_mosaic_ends_mosaics_for_the_last_share_of_the_steps() -> None:
    """After ``close_mosaic``, an epoch is exactly what a loader without mosaic gives (no draws are spent on it);
    before, it differs from it."""
    shapes = [(16, 20), (20, 16), (16, 16), (18, 24), (24, 18), (16, 16), (20, 20), (17, 23)]
    with_mosaic = DetBatches(
        det_samples(shapes), 4, CPU, seed=1, augment=DetAugmentConfig(mosaic=1.0, close_mosaic=0.25)
    )
    plain = DetBatches(det_samples(shapes), 4, CPU, seed=1, augment=DetAugmentConfig())
    with_mosaic.close_mosaic(total_steps=8 * len(with_mosaic))
    assert with_mosaic.mosaic_passes == 6

    def same(epoch: int) -> bool:
        with_mosaic.set_epoch(epoch)
        plain.set_epoch(epoch)
        pairs = [(a, b) for x, y in zip(with_mosaic, plain) for a, b in zip(x[1], y[1])]
        return all(a["boxes"].shape == b["boxes"].shape and torch.equal(a["boxes"], b["boxes"]) for a, b in pairs)

    assert not same(5)
    assert same(6) and same(7)


def test_close_mosaic_is_a_share_below_one() -> None:
    with pytest.raises(DeepscopeError, match="close_mosaic"):
        DetAugmentConfig(mosaic=0.5, close_mosaic=1.0)
