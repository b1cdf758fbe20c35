"""Modality robustness: inverting bright-background images, stain/colour/inversion augmentation, group-balanced
sampling, and label sanity checks; all on small synthetic images with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.color import hed_from_rgb, rgb_from_hed
from skimage.draw import disk

from deepscope.data.io.views import Normalized, input_view, normalized, percentiles
from deepscope.data.segmentation.augment import SegAugmentConfig, augment_pair
from deepscope.data.segmentation.dataset import (
    PatchDataset,
    SegItem,
    balanced_weights,
    find_items,
    image_groups,
    load_items,
)
from deepscope.data.segmentation.label_checks import label_warnings
from deepscope.data.segmentation.pairs import PatchSampler
from deepscope.errors import DataError, DeepscopeError

OFF = {"flip": False, "rot90": False}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def nuclei(
    shape: tuple[int, int] = (32, 40), background: int = 20, nucleus: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """A grey uint8 image of three discs (about 20% of the pixels) and their instance labels."""
    labels = np.zeros(shape, np.uint16)
    for i, centre in enumerate([(8, 8), (20, 24), (10, 30)], start=1):
        labels[disk(centre, 5, shape=shape)] = i
    rng = np.random.default_rng(0)
    image = np.where(labels > 0, nucleus, background) + rng.integers(0, 10, shape)
    return image.astype(np.uint8), labels


def item(image: np.ndarray, labels: np.ndarray, name: str = "x", invert: str = "never") -> SegItem:
    return SegItem(name, image, labels, normalized(image, 2, 1, 99.8, invert))


# Normalization with inversion


def test_inverted_view_is_one_minus_the_normalized_view():
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3)).astype(np.uint8)
    low, high = percentiles(rgb, 2, 1, 99)
    plain, inverted = Normalized(rgb, 2, low, high), Normalized(rgb, 2, low, high, inverted=True)
    assert not plain.inverted and inverted.inverted
    np.testing.assert_allclose(inverted[2:7, 3:9], 1 - plain[2:7, 3:9], atol=1e-6)
    assert inverted[2:7, 3:9].dtype == np.float32


@pytest.mark.parametrize("colour", [False, True])
def test_auto_inverts_bright_backgrounds_only(colour):
    dark, _ = nuclei(background=20, nucleus=200)  # fluorescence
    bright, _ = nuclei(background=220, nucleus=60)  # bright-field
    if colour:  # H&E-like: tinted, channels differ
        dark, bright = (np.stack([x, x // 2, x // 3], -1) for x in (dark, bright))
    for image, expected in ((dark, False), (bright, True)):
        assert normalized(image, 2, 1, 99.8, "auto").inverted is expected
        assert normalized(image, 2, 1, 99.8, "always").inverted is True
        assert normalized(image, 2, 1, 99.8, "never").inverted is False
    # After inversion a bright-field image looks like fluorescence: dark background, bright nuclei.
    view = normalized(bright, 2, 1, 99.8, "auto")
    assert np.median(view[:, :]) < 0.1 and view[20, 24].mean() > 0.8


def test_load_items_and_input_view_thread_invert(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / "train" / folder).mkdir(parents=True)
    for name, (background, nucleus) in {"fluo": (20, 200), "brightfield": (220, 60)}.items():
        image, labels = nuclei(background=background, nucleus=nucleus)
        Image.fromarray(image).save(tmp_path / "train" / "images" / f"{name}.png")
        tifffile.imwrite(tmp_path / "train" / "masks" / f"{name}.tif", labels)
    entries = find_items(tmp_path, "raw", "label")["train"]
    assert {i.name: i.inverted for i in load_items(entries, None, 1, 99.8, invert="auto")} == {
        "brightfield": True,
        "fluo": False,
    }
    assert not any(i.inverted for i in load_items(entries, None, 1, 99.8))  # default: as before

    image, _ = nuclei(background=220, nucleus=60)
    plain = input_view(image, 2, 1, "b.png", (1, 99.8))
    auto = input_view(image, 2, 1, "b.png", (1, 99.8), invert="auto")
    np.testing.assert_allclose(auto[:, 4:20, 6:30], 1 - plain[:, 4:20, 6:30], atol=1e-6)


def test_bad_invert_settings_are_refused():
    image, _ = nuclei()
    with pytest.raises(DeepscopeError, match="invert must be one of never, always, auto, got 'sometimes'"):
        normalized(image, 2, 1, 99.8, "sometimes")
    with pytest.raises(DeepscopeError, match="invert must be one of"):
        input_view(image, 2, 1, "a.png", (1, 99.8), invert="yes")
    with pytest.raises(DeepscopeError, match="needs percentile normalization"):
        input_view(image, 2, 1, "a.png", None, invert="auto")


# Augmentation


def hematoxylin_only(n: int = 6) -> tuple[torch.Tensor, np.ndarray]:
    """RGB images of one stain: optical density h * rgb_from_hed[0], h from 0.5 to 2 along the width."""
    h = np.linspace(0.5, 2.0, 16)
    density = h[None, :, None] * rgb_from_hed[0]  # (1, W, 3)
    image = np.exp(-np.broadcast_to(density, (8, 16, 3)))
    return torch.from_numpy(np.moveaxis(image, -1, 0)).float()[None].repeat(n, 1, 1, 1), h


def stains(image: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) HED stain densities (natural-log optical density unmixed, no clipping)."""
    return -np.log(image.double().numpy().transpose(0, 2, 3, 1)) @ hed_from_rgb


def test_hed_jitter_zero_is_identity_and_only_touches_three_channels():
    image = torch.rand(4, 3, 12, 12, generator=gen())
    out, _, _ = augment_pair(image, image[:, 0] > 0.5, SegAugmentConfig(**OFF, hed_jitter=0.0), gen())
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)
    config = SegAugmentConfig(**OFF, hed_jitter=0.3)
    jittered = augment_pair(image, image[:, 0] > 0.5, config, gen())[0]
    assert ((jittered - image).abs().amax((1, 2, 3)) > 0.01).all()  # every RGB sample changes
    assert (jittered <= 1 + 1e-6).all()  # never brighter than the light source
    for channels in (1, 2, 4):
        other = torch.rand(4, channels, 12, 12, generator=gen())
        assert torch.equal(augment_pair(other, other[:, 0] > 0.5, config, gen())[0], other)


def test_hed_jitter_scales_and_shifts_each_stain():
    image, h = hematoxylin_only()
    s = 0.3
    out, _, _ = augment_pair(image, torch.zeros(6, 8, 16), SegAugmentConfig(**OFF, hed_jitter=s), gen(1))
    after = stains(out)
    slopes = []
    for sample in after:
        assert np.ptp(sample[..., 1:], axis=(0, 1)).max() < 1e-4  # eosin and DAB: only a constant shift, no pattern
        assert np.abs(sample[..., 1:]).max() <= 0.05 * s + 1e-4
        slope, intercept = np.polyfit(h, sample[0, :, 0], 1)
        np.testing.assert_allclose(sample[0, :, 0], slope * h + intercept, atol=1e-4)  # haematoxylin: h * (1 + a) + b
        assert 1 - s <= slope <= 1 + s and abs(intercept) <= 0.05 * s + 1e-4
        slopes.append(slope)
    assert np.ptp(slopes) > 0.05  # drawn per sample


def test_invert_probability_one_is_exactly_one_minus_x():
    image = torch.rand(5, 2, 8, 8, generator=gen())
    out, _, _ = augment_pair(image, image[:, 0] > 0.5, SegAugmentConfig(**OFF, invert=1.0), gen())
    assert torch.equal(out, 1 - image)
    many = image.repeat(8, 1, 1, 1)
    out, _, _ = augment_pair(many, many[:, 0] > 0.5, SegAugmentConfig(**OFF, invert=0.5), gen())
    flipped = np.array([torch.equal(o, 1 - x) for o, x in zip(out, many)])
    kept = np.array([torch.equal(o, x) for o, x in zip(out, many)])
    assert (flipped ^ kept).all() and 8 <= flipped.sum() <= 32  # each sample whole, about half of 40 inverted


def test_colour_jitter_is_an_affine_map_per_sample_and_keeps_grey_grey():
    c = 0.4
    grey = torch.rand(16, 1, 8, 8, generator=gen())
    out, _, _ = augment_pair(grey, grey[:, 0] > 0.5, SegAugmentConfig(**OFF, colour_jitter=c), gen())
    slopes = []
    for x, y in zip(grey.flatten(1).double().numpy(), out.flatten(1).double().numpy()):
        slope, intercept = np.polyfit(x, y, 1)
        np.testing.assert_allclose(y, slope * x + intercept, atol=1e-5)  # brightness * contrast about the mean
        assert (1 - c) ** 2 - 1e-6 <= slope <= (1 + c) ** 2 + 1e-6
        slopes.append(slope)
    assert np.ptp(slopes) > 0.1
    stored_rgb = grey.repeat(1, 3, 1, 1)  # a grey picture saved as RGB: saturation has nothing to change
    out, _, _ = augment_pair(stored_rgb, grey[:, 0] > 0.5, SegAugmentConfig(**OFF, colour_jitter=c), gen())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    colour = torch.rand(16, 3, 8, 8, generator=gen(2))
    out, _, _ = augment_pair(colour, colour[:, 0] > 0.5, SegAugmentConfig(**OFF, colour_jitter=c), gen())
    spread = (out - out.mean(1, keepdim=True)).std((1, 2, 3)) / (colour - colour.mean(1, keepdim=True)).std((1, 2, 3))
    assert spread.min() < 0.8 and spread.max() > 1.2  # saturation (with contrast and brightness) varies per sample


MODALITY = {"hed_jitter": 0.2, "colour_jitter": 0.3, "invert": 0.5}


def test_same_seed_same_output_and_labels_untouched():
    image = torch.rand(6, 3, 10, 10, generator=gen())
    target = (image[:, 0] > 0.5).long() * 7
    floats, mask = torch.rand(6, 2, 10, 10, generator=gen(1)), torch.rand(6, 10, 10, generator=gen(2)) > 0.5
    config = SegAugmentConfig(**OFF, **MODALITY)
    first = augment_pair(image, target, config, gen(3), mask)
    assert all(torch.equal(a, b) for a, b in zip(first, augment_pair(image, target, config, gen(3), mask)))
    assert not torch.equal(first[0], augment_pair(image, target, config, gen(4), mask)[0])
    assert torch.equal(first[1], target) and torch.equal(first[2], mask)
    assert torch.equal(augment_pair(image, floats, config, gen(3))[1], floats)


def test_intensity_options_compose_with_scale_jitter():
    image = torch.rand(8, 3, 16, 16, generator=gen())
    target = (image[:, 0] > 0.5).long()
    geometry = {"affine_scale": 0.3, "affine_degrees": 10}
    moved, labels, mask = augment_pair(image, target, SegAugmentConfig(**geometry), gen(5))
    out, labels2, mask2 = augment_pair(image, target, SegAugmentConfig(**geometry, invert=1.0), gen(5))
    assert torch.equal(out, 1 - moved) and torch.equal(labels, labels2) and torch.equal(mask, mask2)
    everything = augment_pair(
        image, target, SegAugmentConfig(**geometry, **MODALITY, gamma=0.2, noise_std=0.02), gen(5)
    )
    assert torch.equal(everything[1], labels) and torch.isfinite(everything[0]).all()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"hed_jitter": -0.1}, "hed_jitter must be >= 0"),
        ({"colour_jitter": -0.1}, "colour_jitter must be >= 0"),
        ({"invert": -0.1}, "invert must be >= 0"),
        ({"hed_jitter": 1.0}, "hed_jitter must be below 1"),
        ({"colour_jitter": 1.5}, "colour_jitter must be below 1"),
        ({"invert": 1.5}, "invert is a probability"),
    ],
)
def test_bad_modality_augmentation_is_refused(setting, message):
    with pytest.raises(DeepscopeError, match=message):
        SegAugmentConfig(**setting)


# Group-balanced sampling


def test_patch_sampler_uses_given_weights():
    pairs = [(np.zeros((8, 8)), np.ones((8, 8), np.uint8)), (np.ones((16, 16)), np.ones((16, 16), np.uint8))]
    sampler = PatchSampler(pairs, (4, 4), rng=np.random.default_rng(0), weights=[3, 1])
    np.testing.assert_allclose(sampler.weights, [0.75, 0.25])
    from_second = sum(sampler.sample()[0].max() == 1 for _ in range(400))
    assert 70 <= from_second <= 130  # expected 100; by volume it would be 320
    only_first = PatchSampler(pairs, (4, 4), rng=np.random.default_rng(0), weights=[1, 0])
    assert all(only_first.sample()[0].max() == 0 for _ in range(50))
    for bad in ([1], [1, -1], [0, 0], [1, np.nan]):
        with pytest.raises(DataError, match="PatchSampler needs 2 finite weights"):
            PatchSampler(pairs, (4, 4), weights=bad)


def _sized(sizes: list[int]) -> list[SegItem]:
    return [item(np.zeros((s, s), np.uint8), np.ones((s, s), np.uint8), f"im{i}") for i, s in enumerate(sizes)]


@pytest.mark.parametrize(
    ("power", "expected"),
    [
        (1.0, [100 / 600, 100 / 600, 400 / 600]),  # by volume, as without groups
        (0.0, [0.25, 0.25, 0.5]),  # groups equal, images by volume within
        (0.5, [np.sqrt(200) / (np.sqrt(200) + 20) / 2] * 2 + [20 / (np.sqrt(200) + 20)]),
    ],
)
def test_balanced_weights_known_answers(power, expected):
    weights = balanced_weights(_sized([10, 10, 20]), ["a", "a", "b"], power)
    np.testing.assert_allclose(weights, expected)
    assert weights.sum() == pytest.approx(1)


def test_balanced_weights_reach_the_patch_dataset_and_bad_input():
    items = _sized([10, 10, 20])
    weights = balanced_weights(items, ["a", "a", "b"], 0.0)
    data = PatchDataset(items, (4, 4), 8, channels=1, weights=weights)
    np.testing.assert_allclose(data.sampler.weights, [0.25, 0.25, 0.5])
    with pytest.raises(DeepscopeError, match="2 groups given for 3 images"):
        balanced_weights(items, ["a", "b"])
    with pytest.raises(DeepscopeError, match="power must be >= 0"):
        balanced_weights(items, ["a", "a", "b"], -1)


def test_auto_groups_by_colour_and_background():
    dark, labels = nuclei(background=20, nucleus=200)
    bright, _ = nuclei(background=220, nucleus=60)
    tinted = np.stack([bright, bright // 2, bright // 3], -1)
    grey_as_rgb = np.repeat(dark[..., None], 3, -1)
    items = [
        item(x, labels, invert="auto")
        for x in (dark, bright, tinted, grey_as_rgb, np.stack([dark, dark // 2, dark], -1))
    ]
    assert image_groups(items, "auto") == ["grey-dark", "grey-bright", "colour-bright", "grey-dark", "colour-dark"]


def test_groups_from_an_index_column(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    (split / "index.csv").write_text("image_id,height,modality\na,8,fluorescence\nb,8,histology\nc,8,fluorescence\n")
    image, labels = nuclei()
    items = [item(image, labels, name) for name in ("c", "a", "b")]
    assert image_groups(items, "modality", tmp_path) == ["fluorescence", "fluorescence", "histology"]
    assert image_groups(items, "modality", split) == ["fluorescence", "fluorescence", "histology"]  # the split folder
    with pytest.raises(DataError, match=r"train/index\.csv: no column stain"):
        image_groups(items, "stain", tmp_path)
    with pytest.raises(DataError, match=r"index\.csv: no row with image_id 'd', so no 'modality' for it"):
        image_groups([*items, item(image, labels, "d")], "modality", tmp_path)
    with pytest.raises(DataError, match=r"elsewhere/index\.csv: not found .* columns image_id and modality"):
        image_groups(items, "modality", tmp_path / "elsewhere")
    with pytest.raises(DeepscopeError, match="needs the data folder"):
        image_groups(items, "modality", None)


# Label checks


def test_ring_and_split_objects_are_reported():
    labels = np.zeros((20, 30), np.uint16)
    labels[2:9, 2:9] = 4
    labels[4:7, 4:7] = 0  # ring: hole of 9 pixels
    labels[12:15, 2:5] = 5
    labels[12:15, 20:23] = 5  # id 5 in two places
    labels[2:6, 20:24] = 6
    labels[6:9, 24:27] = 6  # only diagonally connected: one object under 8-connectivity
    assert label_warnings(labels, "masks/x.tif") == [
        "masks/x.tif: 1 of 3 objects has holes (id 4)",
        "masks/x.tif: 1 of 3 objects is not contiguous (id 5)",
    ]


def test_clean_labels_and_background_between_objects_give_no_warnings():
    labels = np.zeros((16, 16), np.int32)
    labels[2:8, 2:8], labels[2:8, 8:14], labels[8:14, 2:14] = 1, 2, 3  # touching squares
    labels[7:9, 7:9] = 0  # background enclosed by three objects together, a hole of none
    assert label_warnings(labels, "m.tif") == []
    assert label_warnings(np.zeros((5, 5), np.uint8), "empty.tif") == []


def test_many_problems_list_five_ids_and_3d_and_sparse_ids():
    labels = np.zeros((10, 70), np.uint16)
    for i in range(7):
        labels[1:6, 10 * i : 10 * i + 5] = i + 1
        labels[3, 10 * i + 2] = 0
    assert label_warnings(labels, "m.tif") == ["m.tif: 7 of 7 objects have holes (ids 1, 2, 3, 4, 5, ...)"]
    cube = np.zeros((7, 7, 7), np.int64)
    cube[1:6, 1:6, 1:6] = 10**9  # a sparse id
    cube[3, 3, 3] = 0
    cube[0, 0, 0] = cube[6, 6, 6] = 2
    assert label_warnings(cube, "v.h5") == [
        "v.h5: 1 of 2 objects has holes (id 1000000000)",
        "v.h5: 1 of 2 objects is not contiguous (id 2)",
    ]
    with pytest.raises(DataError, match="bad.tif: instance labels must be a 2D or 3D integer image"):
        label_warnings(np.zeros((4, 4), np.float32), "bad.tif")
