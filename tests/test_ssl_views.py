"""Batched SSL views: geometry, colour, per-image randomness, the rows convention, config checks."""

from __future__ import annotations

import pytest
import torch

from deepscope.data.ssl.views import TwoViews, _color_jitter, _crop_theta, view_config
from deepscope.errors import DeepscopeError

ALL = slice(None)
OFF = {"crop_scale": [1, 1], "crop_ratio": [1, 1], "flip": False, "rot90": False, "jitter": [0, 0, 0, 0], "jitter_p": 0.0,
       "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0, "intensity": [1, 1], "intensity_p": 0.0, "noise": 0.0,
       "noise_p": 0.0, "clamp": False}  # fmt: skip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def views(out_size: tuple[int, int], preset: str = "natural", **overrides) -> TwoViews:
    base = OFF if preset == "off" else {}
    return TwoViews(view_config("natural" if preset == "off" else preset, {**base, **overrides}), out_size)


@pytest.mark.parametrize(("h", "w", "ratio"), [(16, 16, 1.0), (16, 12, 0.75)])
def test_full_crop_without_randomness_is_the_identity(h, w, ratio):
    x = torch.rand(4, 3, h, w)
    out = views((h, w), "off", crop_ratio=[ratio, ratio]).view(x, gen(), 4, ALL)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_and_rot90_give_the_eight_dihedral_orientations_per_image():
    x = torch.rand(256, 2, 8, 8)
    out = views((8, 8), "off", flip=True, rot90=True).view(x, gen(), 256, ALL)
    candidates = torch.stack([t.rot90(k, (-2, -1)) for t in (x, x.flip(-1)) for k in range(4)], 1)  # (256, 8, C, H, W)
    error = (candidates - out[:, None]).abs().flatten(2).amax(-1)
    assert (error.amin(1) < 1e-5).all()
    assert len(set(error.argmin(1).tolist())) == 8  # per image, all 8 equally likely (one missing in 256: p ~ 1e-14)


def test_crop_of_a_half_black_image_matches_its_box():
    x = torch.zeros(256, 1, 16, 16)
    x[..., 8:] = 1.0
    cfg = {"crop_scale": [0.25, 0.25], "crop_ratio": [1, 1]}
    out = views((8, 8), "off", **cfg).view(x, gen(3), 256, ALL)
    assert out.shape == (256, 1, 8, 8)
    theta = _crop_theta(view_config("natural", {**OFF, **cfg}), (16, 16), gen(3), 256, ALL, torch.device("cpu"))
    left = (theta[:, 0, 2] + 1) * 8 - 4  # box of side 8 pixels starting here
    expected = ((left + 8 - 8) / 8).clamp(0, 1)  # share of the box right of the middle
    torch.testing.assert_close(out.mean((1, 2, 3)), expected, atol=0.07, rtol=0)
    assert out.mean((1, 2, 3)).min() < 0.1 and out.mean((1, 2, 3)).max() > 0.9 and abs(out.mean() - 0.5) < 0.1


def test_crop_boxes_stay_inside_the_image():
    cfg = view_config(
        "natural", {**OFF, "crop_scale": [0.08, 1.0], "crop_ratio": [0.2, 5.0], "flip": True, "rot90": True}
    )
    theta = _crop_theta(cfg, (16, 24), gen(), 500, ALL, torch.device("cpu"))
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert (torch.einsum("bij,kj->bki", theta, corners).abs() <= 1 + 1e-6).all()
    x = torch.full((50, 2, 16, 24), 0.37)
    out = TwoViews(cfg, (10, 10)).view(x, gen(), 50, ALL)
    torch.testing.assert_close(out, torch.full_like(out, 0.37))


def test_rows_slices_agree_with_the_whole_batch():
    everything = {
        "blur_p": 0.5,
        "solarize_p": 0.5,
        "intensity": [0.8, 1.2],
        "intensity_p": 0.5,
        "noise": 0.05,
        "noise_p": 0.5,
    }
    maker = views((12, 12), **everything)
    x = torch.rand(8, 3, 16, 16)
    whole = maker(x, gen(7), 8, ALL)
    first, second = maker(x[:4], gen(7), 8, slice(0, 4)), maker(x[4:], gen(7), 8, slice(4, 8))
    for k in range(2):
        torch.testing.assert_close(torch.cat([first[k], second[k]]), whole[k])


def test_views_differ_and_repeat_with_the_seed():
    maker = views((16, 16), "microscopy")
    x = torch.rand(6, 2, 20, 20)
    v1, v2 = maker(x, gen(1), 6, ALL)
    assert (v1 - v2).abs().flatten(1).amax(1).min() > 0.01  # every image's two views differ
    w1, w2 = maker(x, gen(1), 6, ALL)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_grayscale_and_solarize():
    x = torch.rand(5, 3, 8, 8)
    grey = views((8, 8), "off", grayscale_p=1.0).view(x, gen(), 5, ALL)
    torch.testing.assert_close(grey[:, 0], grey[:, 2])
    torch.testing.assert_close(grey[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    x = torch.cat([torch.full((2, 1, 4, 4), 0.8), torch.full((2, 1, 4, 4), 0.3)])
    out = views((4, 4), "off", solarize_p=1.0).view(x, gen(), 4, ALL)
    torch.testing.assert_close(out, torch.tensor([0.2, 0.2, 0.3, 0.3]).view(4, 1, 1, 1).expand_as(x))


def test_color_jitter_known_answers():
    def jitter(x: torch.Tensor, strengths: list[float], clamp: bool = True) -> torch.Tensor:
        cfg = view_config("natural", {**OFF, "jitter": strengths, "jitter_p": 1.0, "clamp": clamp})
        return _color_jitter(x, cfg, gen(), len(x), ALL)

    x = torch.rand(16, 3, 6, 6)
    torch.testing.assert_close(jitter(x, [0, 0, 0, 0]), x, atol=1e-6, rtol=0)
    bright = jitter(torch.full((16, 3, 4, 4), 0.4), [0.5, 0, 0, 0])  # 0.4 * factor in [0.5, 1.5], one factor per image
    levels = bright.flatten(1)
    assert (levels.amax(1) - levels.amin(1) < 1e-6).all() and levels.min() >= 0.2 - 1e-6 and levels.max() <= 0.6 + 1e-6
    assert levels[:, 0].std() > 0.03
    grey = torch.rand(16, 1, 6, 6).expand(-1, 3, -1, -1)
    torch.testing.assert_close(jitter(grey, [0, 0, 0, 0.5]), grey, atol=1e-5, rtol=0)  # hue turns colours, not greys
    pale = 0.25 + 0.5 * x
    turned = jitter(pale, [0, 0, 0, 0.5], clamp=False)  # a chroma rotation keeps luma (unless clamped)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((turned * luma).sum(1), (pale * luma).sum(1), atol=1e-5, rtol=0)
    assert (turned - pale).abs().mean() > 0.02


def test_clamp():
    x = torch.rand(8, 3, 12, 12)
    out = views((12, 12), jitter=[0.9, 0.9, 0.9, 0.5], jitter_p=1.0, noise=0.5, noise_p=1.0).view(x, gen(), 8, ALL)
    assert out.min() >= 0 and out.max() <= 1 and (out == 1).any()
    bright = views((4, 4), "off", intensity=[1.5, 1.5], intensity_p=1.0).view(torch.ones(2, 1, 4, 4), gen(), 2, ALL)
    torch.testing.assert_close(bright, torch.full_like(bright, 1.5))  # clamp False keeps values above 1


def test_blur_spreads_an_impulse_and_keeps_its_sum():
    x = torch.zeros(4, 2, 64, 64)
    x[..., 32, 32] = 1.0
    out = views((64, 64), "off", blur_p=1.0, blur_sigma=[1.0, 2.0]).view(x, gen(), 4, ALL)
    torch.testing.assert_close(out.sum((2, 3)), torch.ones(4, 2))
    assert (out[..., 32, 32] < 0.2).all() and (out[..., 32, 33] > 0.02).all()
    torch.testing.assert_close(out, out.flip(-1).roll(1, -1))  # symmetric about the impulse


@pytest.mark.parametrize("channels", [1, 5])
def test_other_channel_counts_skip_colour_operations(channels):
    x = torch.rand(4, channels, 10, 10)
    colour = {"jitter": [0, 0, 1.0, 0.5], "jitter_p": 1.0, "grayscale_p": 1.0}
    out = views((10, 10), "off", **colour).view(x, gen(), 4, ALL)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    v1, v2 = views((6, 6), "microscopy", **colour)(x, gen(), 4, ALL)
    assert v1.shape == v2.shape == (4, channels, 6, 6)


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("nope", None, "unknown preset 'nope'; known: natural, microscopy"),
        ("natural", {"crop_scale": [0.5, 0.2]}, "crop_scale [0.5, 0.2] is not a valid range"),
        ("natural", {"crop_scale": [0.0, 1.0]}, "crop_scale"),
        ("natural", {"crop_size": 3}, "unknown setting(s) crop_size"),
        ("natural", {"jitter": [0.4, 0.4, 0.4]}, "jitter must be a list of 4 numbers"),
        ("natural", {"jitter": [0.4, 0.4, 0.4, 0.7]}, "hue"),
        ("microscopy", {"blur_p": 1.5}, "blur_p must be a probability"),
        ("microscopy", {"noise": -1}, "noise must be >= 0"),
    ],
)
def test_bad_configs_raise_one_line_errors(preset, overrides, message):
    with pytest.raises(DeepscopeError) as info:
        view_config(preset, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
