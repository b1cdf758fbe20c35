"""Filter-bank features: known answers against scipy.ndimage, eigenvalues against LAPACK, tiles against the whole."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage

from deepscope.errors import DeepscopeError
from deepscope.tasks.pixel.features import (
    FILTERS,
    FeatureSpec,
    auto_tile,
    compute_features,
    radius,
    symmetric_eigenvalues,
)

SCALES = (0.7, 1.6, 3.5)


def smooth_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)


def scipy_maps(image: np.ndarray, name: str, sigma: float) -> list[np.ndarray]:
    """The reference: scipy's Gaussian derivatives with the same (mirror) border, in float64."""
    x, nd = image.astype(np.float64), image.ndim

    def g(order, s=sigma, values=x):
        return ndimage.gaussian_filter(values, s, order=order, mode="mirror")

    unit = [tuple(int(a == b) for b in range(nd)) for a in range(nd)]
    if name == "gaussian":
        return [g((0,) * nd)]
    if name == "log":
        return [sum(g(tuple(2 * np.array(u))) for u in unit)]
    if name == "dog":
        return [g((0,) * nd) - g((0,) * nd, 0.66 * sigma)]
    if name == "ggm":
        return [np.sqrt(sum(g(u) ** 2 for u in unit))]
    matrix = np.empty(x.shape + (nd, nd))
    for a in range(nd):
        for b in range(a, nd):
            if name == "hessian":
                value = g(tuple(np.add(unit[a], unit[b])))
            else:
                value = ndimage.gaussian_filter(g(unit[a]) * g(unit[b]), 0.5 * sigma, mode="mirror")
            matrix[..., a, b] = matrix[..., b, a] = value
    return list(np.moveaxis(np.linalg.eigvalsh(matrix)[..., ::-1], -1, 0))


@pytest.mark.parametrize("ndim", [2, 3])
def test_every_filter_matches_scipy_gaussian_derivatives(ndim):
    image = smooth_image((40, 44) if ndim == 2 else (36, 38, 40))
    spec = FeatureSpec.from_selection(FILTERS, SCALES, ndim)
    features = compute_features(image[None], spec, device="cpu")
    names = spec.names()
    assert features.shape == (len(names), *image.shape)
    for name in FILTERS:
        for sigma in SCALES:
            for i, expected in enumerate(scipy_maps(image, name, sigma)):
                label = f"{name}_{sigma:g}" + (f"_ev{i}" if name in ("structure", "hessian") else "")
                got = features[names.index(label)]
                # the structure tensor smooths gradient products: at the border, scipy mirrors the products while we
                # mirror the image (a gradient changes sign when mirrored), so only the interior is the same
                inner = tuple(
                    slice(radius(sigma) + 2, -radius(sigma) - 2) if name == "structure" else slice(None)
                    for _ in range(ndim)
                )
                scale = np.abs(expected).max()
                assert np.abs(got[inner] - expected[inner]).max() <= 1e-4 * scale + 1e-7, label


@pytest.mark.parametrize("ndim,tile", [(2, (17, 23)), (3, (9, 11, 13))])
def test_tiled_features_equal_untiled(ndim, tile):
    image = smooth_image((50, 61) if ndim == 2 else (20, 23, 25), seed=1)
    # halos (60 for the 2D default set with scale 10; 21 for the 3D one) are wider than the tiles
    spec = FeatureSpec.default(2) if ndim == 2 else FeatureSpec.from_selection(FILTERS, (1.0, 3.5), 3)
    whole = compute_features(image[None], spec, device="cpu")
    tiled = compute_features(image[None], spec, tile=tile, device="cpu")
    assert np.abs(tiled - whole).max() <= 1e-5 * np.abs(whole).max()


def test_features_written_to_hdf5_equal_numpy(tmp_path):
    image = smooth_image((30, 34))
    spec = FeatureSpec.from_selection(["gaussian", "hessian"], (1.0,))
    with h5py.File(tmp_path / "f.h5", "w") as file:
        out = file.create_dataset("features", (spec.count, 30, 34), np.float32)
        compute_features(image[None], spec, tile=(16, 16), out=out)
        np.testing.assert_allclose(out[...], compute_features(image[None], spec), atol=1e-6)


def test_channels_get_their_own_features_in_channel_major_order():
    a, b = smooth_image((32, 32), 2), smooth_image((32, 32), 3)
    spec1 = FeatureSpec.from_selection(["gaussian", "structure"], (1.0, 2.0))
    spec2 = FeatureSpec.from_selection(["gaussian", "structure"], (1.0, 2.0), channels=2)
    both = compute_features(np.stack([a, b]), spec2)
    assert spec2.names()[: spec1.count] == [f"c0_{n}" for n in spec1.names()]
    np.testing.assert_allclose(both[: spec1.count], compute_features(a[None], spec1), atol=1e-6)
    np.testing.assert_allclose(both[spec1.count :], compute_features(b[None], spec1), atol=1e-6)


def test_closed_form_eigenvalues_match_lapack_including_repeated_ones():
    rng = np.random.default_rng(0)
    for n in (2, 3):
        m = rng.normal(size=(500, n, n))
        m = m + np.swapaxes(m, 1, 2)
        m[:50] = np.eye(n) * rng.normal(size=(50, 1, 1))  # all eigenvalues equal
        m[50:100] = np.eye(n) * 2.0
        m[50:100, 0, 0] = 5.0  # two equal eigenvalues
        tensor = torch.from_numpy(m)
        entries = {(a, b): tensor[:, a, b].float() for a in range(n) for b in range(a, n)}
        got = symmetric_eigenvalues(entries).double().T
        expected = torch.linalg.eigvalsh(tensor).flip(-1)
        assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


def test_spec_rejects_bad_filters_scales_and_images():
    with pytest.raises(DeepscopeError, match="unknown filter 'sobel'"):
        FeatureSpec.create({"sobel": [1.0]})
    with pytest.raises(DeepscopeError, match="positive scales"):
        FeatureSpec.create({"gaussian": [0.0]})
    with pytest.raises(DeepscopeError, match="no features"):
        FeatureSpec.create({})
    with pytest.raises(DeepscopeError, match="does not fit the features of 1-channel 2D"):
        compute_features(np.zeros((3, 20, 20), np.float32), FeatureSpec.default())
    spec = FeatureSpec.default(3)
    assert spec.halo == radius(10) + radius(5)  # structure tensor at 10: gradients, then integration at 5
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_auto_tile_keeps_small_images_whole_and_splits_large_ones():
    spec = FeatureSpec.default(3)
    assert auto_tile((64, 64, 64), spec) == (64, 64, 64)
    tile = auto_tile((2048, 2048, 2048), spec, budget=2**32)
    assert max(tile) < 2048 and np.prod([t + 2 * spec.halo for t in tile]) * 128 <= 2**32
