"""Denoising building blocks: blind-spot masking, the masked loss, noise, patch cutting, PSNR/SSIM, N2V2 U-Net, TTA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from deepscope.data.denoise.blind_spot import BlindSpotConfig, box_size, mask_pixels
from deepscope.data.denoise.dataset import DenoiseItem, PatchBank
from deepscope.data.denoise.noise import NoiseConfig, add_noise, noise_generator
from deepscope.errors import DataError, DeepscopeError
from deepscope.inference.tiling import predict_tiled
from deepscope.losses.denoise import masked_mse
from deepscope.metrics.denoise import data_range_for, psnr, ssim
from deepscope.models.unet import MaxBlurPool, UNet


def unique_batch(n: int = 2, c: int = 2, h: int = 40, w: int = 36) -> torch.Tensor:
    """Every pixel a different value, so a replaced value tells where it came from."""
    return torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)


def test_uniform_blind_spot_replaces_masked_pixels_by_a_neighbour_within_the_radius():
    x = unique_batch()
    cfg = BlindSpotConfig(ratio=0.02, radius=2, replace="uniform")
    masked, mask = mask_pixels(x, cfg, torch.Generator().manual_seed(0))
    assert mask.shape == x.shape and set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(masked[mask == 0], x[mask == 0])  # everything else untouched
    # one masked pixel per box of side box_size, per image and channel
    box = box_size(0.02, 2)
    assert box == 7 and int(mask[0, 0].sum()) == len(range(0, 40, box)) * len(range(0, 36, box))
    h, w = x.shape[2:]
    for n, c, i, j in mask.nonzero().tolist():
        value = int(masked[n, c, i, j])
        src_n, rest = divmod(value, 2 * h * w)
        src_c, rest = divmod(rest, h * w)
        si, sj = divmod(rest, w)
        assert (src_n, src_c) == (n, c)  # from the same image and channel
        # a mirrored neighbour: within the radius after reflection at the border, never the pixel itself
        near = {
            (ri, rj)
            for di, dj in itertools.product(range(-2, 3), repeat=2)
            if (di, dj) != (0, 0)
            for ri in [abs(i + di) if i + di < h else 2 * (h - 1) - (i + di)]
            for rj in [abs(j + dj) if j + dj < w else 2 * (w - 1) - (j + dj)]
        }
        assert (si, sj) in near and (si, sj) != (i, j)


def test_median_blind_spot_uses_the_median_of_the_neighbourhood_without_the_centre():
    x = torch.rand(1, 1, 30, 30, generator=torch.Generator().manual_seed(3))
    masked, mask = mask_pixels(
        x, BlindSpotConfig(ratio=0.01, radius=1, replace="median"), torch.Generator().manual_seed(1)
    )
    padded = np.pad(x[0, 0].numpy(), 1, mode="reflect")
    for _, _, i, j in mask.nonzero().tolist():
        window = padded[i : i + 3, j : j + 3].ravel()
        expected = torch.tensor(np.delete(window, 4)).median()  # torch's lower median of the 8 neighbours
        assert float(masked[0, 0, i, j]) == pytest.approx(float(expected))


def test_blind_spot_masking_works_in_3d_and_is_seeded():
    x = torch.rand(2, 1, 8, 16, 16)
    a = mask_pixels(x, BlindSpotConfig(ratio=0.05), torch.Generator().manual_seed(5))
    b = mask_pixels(x, BlindSpotConfig(ratio=0.05), torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].sum() > 0 and torch.equal(a[0][a[1] == 0], x[a[1] == 0])


def test_masked_loss_counts_only_masked_pixels():
    target = torch.zeros(1, 1, 4, 4)
    pred = torch.zeros(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 1, 2] = mask[0, 0, 3, 0] = 1
    pred[0, 0, 1, 2], pred[0, 0, 3, 0] = 2.0, 4.0
    assert float(masked_mse(pred, target, mask)) == pytest.approx((4 + 16) / 2)
    pred[0, 0, 0, 0] = 100.0  # an unmasked pixel changes nothing
    assert float(masked_mse(pred, target, mask)) == pytest.approx(10.0)
    assert float(masked_mse(pred, target)) == pytest.approx((4 + 16 + 10000) / 16)


def test_bad_blind_spot_settings_are_refused():
    for kwargs in ({"ratio": 0}, {"ratio": 0.9}, {"radius": 0}, {"replace": "zero"}):
        with pytest.raises(DeepscopeError):
            BlindSpotConfig(**kwargs)


def test_gaussian_noise_is_not_clipped_unless_asked():
    clean = torch.full((200, 200), 5.0)
    noisy = add_noise(clean, NoiseConfig(kind="gaussian", sigma=25), torch.Generator().manual_seed(0))
    assert float(noisy.std()) == pytest.approx(25, rel=0.02) and float(noisy.min()) < 0
    clipped = add_noise(
        clean, NoiseConfig(kind="gaussian", sigma=25, clip=True), torch.Generator().manual_seed(0), clip_to=255
    )
    assert float(clipped.min()) == 0 and torch.equal(clipped, noisy.clamp(0, 255))


def test_poisson_noise_keeps_the_mean_and_scales_with_gain():
    clean = torch.full((300, 300), 10.0)
    low = add_noise(clean, NoiseConfig(kind="poisson", gain=1.0), torch.Generator().manual_seed(0))
    high = add_noise(clean, NoiseConfig(kind="poisson", gain=100.0), torch.Generator().manual_seed(0))
    assert float(low.mean()) == pytest.approx(10, rel=0.01) and float(low.var()) == pytest.approx(10, rel=0.05)
    assert float(high.var()) == pytest.approx(0.1, rel=0.05)


def test_fixed_noise_depends_only_on_seed_split_and_index():
    cfg = NoiseConfig(kind="gaussian", sigma=10)
    a = add_noise(torch.zeros(8, 8), cfg, noise_generator(cfg, "test", 3))
    b = add_noise(torch.zeros(8, 8), cfg, noise_generator(cfg, "test", 3))
    c = add_noise(torch.zeros(8, 8), cfg, noise_generator(cfg, "train", 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_patch_bank_cuts_the_same_window_from_every_role():
    items = []
    for k, shape in enumerate([(20, 30), (20, 30), (25, 18)]):
        noisy = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape) + 1000 * k
        items.append(DenoiseItem(f"im{k}", {"noisy": noisy, "clean": -noisy}, np.dtype(np.float32)))
    bank = PatchBank(items, ["noisy", "clean"], (8, 6), torch.device("cpu"))
    crops = bank.sample(64, torch.Generator().manual_seed(0))
    assert crops["noisy"].shape == (64, 1, 8, 6) and torch.equal(crops["clean"], -crops["noisy"])
    for crop in crops["noisy"][:, 0]:
        k = int(crop[0, 0]) // 1000
        shape = items[k].spatial
        i, j = divmod(int(crop[0, 0]) - 1000 * k, shape[1])
        assert torch.equal(crop, torch.from_numpy(items[k].images["noisy"][0, i : i + 8, j : j + 6]))
    with pytest.raises(DataError, match="smaller than the patch"):
        PatchBank(items, ["noisy"], (30, 30), torch.device("cpu"))


def test_psnr_on_known_cases():
    truth = np.full((10, 10), 100, np.uint8)
    assert psnr(truth, truth.astype(float) + 5, 255) == pytest.approx(20 * np.log10(255 / 5))
    assert psnr(truth, truth.astype(float) + 1, 1.0) == pytest.approx(0.0)
    # the mean squared error is over all pixels: one pixel off by 10 in 100 gives MSE 1
    pred = truth.astype(float)
    pred[0, 0] += 10
    assert psnr(truth, pred, 255) == pytest.approx(10 * np.log10(255**2 / 1))


def test_ssim_is_one_for_identical_images_and_matches_scikit_image():
    rng = np.random.default_rng(0)
    a = rng.random((40, 50)) * 255
    b = a + rng.normal(0, 20, a.shape)
    assert ssim(a, a, 255) == pytest.approx(1.0)
    expected = structural_similarity(
        a, b, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(a, b, 255) == pytest.approx(expected)
    assert 0 < ssim(rng.random((5, 30, 30)), rng.random((5, 30, 30)), 1.0) < 0.2  # a thin stack shrinks the window


def test_data_range_follows_the_dtype_and_refuses_a_mismatch():
    assert data_range_for(np.array([[0, 3]], np.uint8), np.dtype(np.uint8), None, "a") == 255
    assert data_range_for(np.array([[0.0, 0.5]]), np.dtype(np.float32), None, "a") == 0.5
    with pytest.raises(DataError, match="does not match its dtype uint8"):
        data_range_for(np.array([[0, 3]], np.uint8), np.dtype(np.uint8), 1000, "a.png")
    with pytest.raises(DataError, match="wider than the data range"):
        data_range_for(np.array([[0.0, 200.0]]), np.dtype(np.float32), 1.0, "b.tif")
    with pytest.raises(DataError, match="constant float image"):
        data_range_for(np.zeros((3, 3)), np.dtype(np.float32), None, "c.tif")


def test_n2v2_unet_variant_and_residual_output():
    x = torch.randn(2, 1, 32, 32)
    net = UNet(1, 1, 2, depth=2, features=8, blurpool=True, top_skip=False, residual=True)
    assert net(x).shape == x.shape
    assert net.decoder[-1][0].in_channels == 8  # no skip at full resolution
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    assert torch.equal(net(x), x)  # a residual network with a zero head is the identity
    with pytest.raises(ValueError, match="residual"):
        UNet(1, 2, 2, residual=True)
    pooled = MaxBlurPool((2, 2))(torch.ones(1, 3, 8, 8))
    assert pooled.shape == (1, 3, 4, 4) and torch.allclose(pooled, torch.ones(()))


def test_rotation_tta_averages_all_eight_views():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    image = np.random.default_rng(0).random((1, 24, 24)).astype(np.float32)
    got = predict_tiled(conv, image, 64, 0, 1, blend="none", flip_tta=True, rotate_tta=True)
    x = torch.from_numpy(image)[None]
    views = []
    with torch.no_grad():
        for k in range(4):
            for flip in (False, True):
                seen = x.flip(-1) if flip else x
                y = conv(seen.rot90(k, (-2, -1))).rot90(-k, (-2, -1))
                views.append(y.flip(-1) if flip else y)
    np.testing.assert_allclose(got, torch.stack(views).mean(0)[0].numpy(), atol=1e-5)
    symmetric = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        symmetric.weight.copy_(torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).view(1, 1, 3, 3))
    plain = predict_tiled(symmetric, image, 64, 0, 1, blend="none")
    np.testing.assert_allclose(
        predict_tiled(symmetric, image, 64, 0, 1, blend="none", flip_tta=True, rotate_tta=True), plain, atol=1e-5
    )
