"""Tiled prediction against known answers: the untiled model on the same (reflect-padded) image."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepscope.errors import DeepscopeError
from deepscope.inference.tiling import predict_tiled
from deepscope.models.unet import UNet

CASES = {2: ((1, 70, 90), 32), 3: ((1, 20, 30, 30), 16)}  # shapes that are not multiples of the tile
HALO = 4


def conv_net(dim: int, seed: int = 0) -> nn.Module:
    """Two 3x3(x3) convs with zero padding: receptive radius 2, so halo 4 covers it twice over."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    return nn.Sequential(conv(1, 4, 3, padding=1), nn.Tanh(), conv(4, 2, 3, padding=1)).eval()


def pointwise_net(dim: int) -> nn.Module:
    torch.manual_seed(1)
    return (nn.Conv2d if dim == 2 else nn.Conv3d)(1, 2, 1).eval()


class Recorder(nn.Module):
    """Wraps a model and keeps the shapes it is called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.inner(x)


def image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@torch.no_grad()
def untiled(model: nn.Module, x: np.ndarray, pad: int = 0, flips: bool = False) -> np.ndarray:
    """The model on the whole image. Tiles are mirrored where their halo leaves the image, so the tiled output can only
    match a model that also sees a mirrored border: the image is reflect-padded by the halo and the output cropped
    back (the zero padding of the convs then falls outside the kept part, as it does for each tile)."""
    padded = np.pad(x, [(0, 0)] + [(pad, pad)] * (x.ndim - 1), mode="reflect")
    t = torch.from_numpy(padded)[None]
    dims = range(2, t.ndim)
    subsets = [d for r in range(len(dims) + 1 if flips else 1) for d in itertools.combinations(dims, r)]
    y = sum(model(t.flip(d)).flip(d) for d in subsets) / len(subsets)
    return y[0].numpy()[(slice(None),) + (slice(pad, -pad or None),) * (x.ndim - 1)]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("blend", ["none", "gaussian", "linear"])
def test_halo_covering_receptive_field_matches_untiled(dim: int, blend: str) -> None:
    # with blending only the tile plus half the halo is weighted, so radius 2 <= halo // 2 keeps overlaps identical
    shape, tile = CASES[dim]
    x, model = image(shape), conv_net(dim)
    got = predict_tiled(model, x, tile, HALO, 2, blend=blend, device="cpu")
    np.testing.assert_allclose(got, untiled(model, x, HALO), atol=1e-5 if blend == "none" else 1e-4)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("blend", ["none", "gaussian", "linear"])
def test_pointwise_model_is_exact_in_every_blend(dim: int, blend: str) -> None:
    shape, tile = CASES[dim]
    x, model = image(shape, seed=2), pointwise_net(dim)
    got = predict_tiled(model, x, tile, (HALO,) * dim, 2, blend=blend, device="cpu")
    assert got.dtype == np.float32 and got.shape == (2,) + shape[1:]
    np.testing.assert_allclose(got, untiled(model, x), atol=1e-5)


def test_model_sees_only_tiles_in_batches() -> None:
    x = image((1, 70, 90))
    model = Recorder(pointwise_net(2))
    predict_tiled(model, x, 32, HALO, 2, batch_size=2, device="cpu")
    assert model.shapes and all(s[0] <= 2 and s[1:] == (1, 40, 40) for s in model.shapes)
    assert sum(s[0] for s in model.shapes) == 3 * 3  # ceil(70/32) * ceil(90/32) tiles, each once


@pytest.mark.parametrize("blend", ["none", "gaussian"])
def test_progress_counts_every_window_once(blend: str) -> None:
    x = image((1, 70, 90))
    model, seen = Recorder(pointwise_net(2)), []
    predict_tiled(
        model,
        x,
        32,
        HALO,
        2,
        blend=blend,
        batch_size=2,
        device="cpu",
        progress=lambda done, total: seen.append((done, total)),
    )
    calls = [0] + [s[0] for s in model.shapes]  # the windows of each model call, as the callback should count them
    assert seen == [(sum(calls[: i + 1]), 9) for i in range(1, len(calls))]
    assert seen[-1] == (9, 9)  # 3 x 3 windows, counted up one batch at a time


class LoggedArray:
    """An array that logs every read and write with its slices, standing in for an on-disk dataset."""

    def __init__(self, data: np.ndarray, log: list) -> None:
        self.data, self.log, self.shape = data, log, data.shape

    def __getitem__(self, index: tuple) -> np.ndarray:
        self.log.append(("read", index))
        return self.data[index]

    def __setitem__(self, index: tuple, value: np.ndarray) -> None:
        self.log.append(("write", index))
        self.data[index] = value


@pytest.mark.parametrize("blend", ["none", "gaussian"])
def test_reads_are_windows_and_writes_stream(blend: str) -> None:
    log: list = []
    x = image((1, 100, 40))
    out = LoggedArray(np.zeros((2, 100, 40), np.float32), log)
    predict_tiled(pointwise_net(2), LoggedArray(x, log), 16, HALO, 2, out=out, blend=blend, device="cpu")
    reads = [i for op, i in log if op == "read"]
    assert all(s.stop - s.start <= 16 + 2 * HALO for i in reads for s in i[1:])
    writes = [n for n, (op, _) in enumerate(log) if op == "write"]
    # output leaves before the input is all read
    assert writes[0] < max(n for n, (op, _) in enumerate(log) if op == "read")
    np.testing.assert_allclose(out.data, untiled(pointwise_net(2), x), atol=1e-5)


def test_memmap_input_and_output(tmp_path: Path) -> None:
    x = image((1, 70, 90), seed=3)
    source = np.lib.format.open_memmap(tmp_path / "in.npy", mode="w+", dtype=np.float32, shape=x.shape)
    source[:] = x
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(2, 70, 90))
    model = conv_net(2)
    assert predict_tiled(model, source, 32, HALO, 2, out=out, device="cpu") is out
    out.flush()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), untiled(model, x, HALO), atol=1e-4)


@pytest.mark.parametrize("blend", ["none", "gaussian"])
def test_flip_tta(blend: str) -> None:
    x = image((1, 70, 90), seed=4)
    plain = predict_tiled(pointwise_net(2), x, 32, HALO, 2, blend=blend, device="cpu")
    np.testing.assert_allclose(
        predict_tiled(pointwise_net(2), x, 32, HALO, 2, blend=blend, flip_tta=True), plain, atol=1e-5
    )
    model = conv_net(2)
    tta = predict_tiled(model, x, 32, HALO, 2, blend=blend, device="cpu", flip_tta=True)
    assert np.abs(tta - predict_tiled(model, x, 32, HALO, 2, blend=blend, device="cpu")).max() > 1e-3
    np.testing.assert_allclose(tta, untiled(model, x, HALO, flips=True), atol=1e-4)


@pytest.mark.parametrize("dim", [2, 3])
def test_image_smaller_than_a_tile(dim: int) -> None:
    shape = (1, 10, 12) if dim == 2 else (1, 6, 10, 12)
    x, model = image(shape, seed=5), Recorder(conv_net(dim))
    for blend in ("none", "linear"):
        got = predict_tiled(model, x, 32, HALO, 2, blend=blend, device="cpu")
        np.testing.assert_allclose(got, untiled(model.inner, x, HALO), atol=1e-4)
    assert set(model.shapes) == {(1, 1) + tuple(n + 2 * HALO for n in shape[1:])}


def test_model_divisor_pads_windows_for_a_unet() -> None:
    unet = Recorder(UNet(1, 2, depth=2, features=4, norm="none"))
    for shape in [(1, 70, 90), (1, 10, 13)]:  # clipped last tiles; an image smaller than a tile (window 18x21 -> 20x24)
        got = predict_tiled(
            unet, image(shape), 24, HALO, 2, blend="linear", device="cpu", model_divisor=unet.inner.divisor
        )
        assert got.shape == (2,) + shape[1:] and np.isfinite(got).all()
    assert {s[2:] for s in unet.shapes} == {(32, 32), (20, 24)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile": 32, "halo": 24}, r"tile \(32, 32\) must be at least twice the halo \(24, 24\)"),
        ({"tile": (32, 32, 32)}, "tile must give 2 sizes"),
        ({"halo": (4,)}, "halo must give 2 sizes"),
        ({"out": np.zeros((2, 70, 91), np.float32)}, r"out must have shape \(2, 70, 90\)"),
        ({"blend": "median"}, "unknown blend 'median'"),
        (
            {"model_divisor": 16},
            r"window tile \+ 2 \* halo \(40, 40\) must be divisible by the model divisor \(16, 16\)",
        ),
        (
            {"image": np.zeros((70, 90), np.float32)},
            r"image must be \(C, H, W\) or \(C, D, H, W\), got shape \(70, 90\)",
        ),
    ],
)
def test_bad_arguments_are_explained(kwargs: dict, message: str) -> None:
    args = {"image": np.zeros((1, 70, 90), np.float32), "tile": 32, "halo": HALO} | kwargs
    with pytest.raises(DeepscopeError, match=message):
        predict_tiled(pointwise_net(2), args.pop("image"), args.pop("tile"), args.pop("halo"), 2, device="cpu", **args)


class TileIndex(nn.Module):
    """Predicts the running number of each window it sees, so blended voxels reveal the weights of their windows."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(self.seen, self.seen + len(x), dtype=x.dtype).view(-1, 1, 1, 1)
        self.seen += len(x)
        return ids.expand(-1, 1, *x.shape[2:]).clone()


@pytest.mark.parametrize("blend", ["gaussian", "linear"])
def test_blend_weights(blend: str) -> None:
    # windows of tile 32 + halo 4 start at -4 and 28; each is weighted over the tile grown by halo // 2 = 2 (length 36),
    # so window 0 owns [0, 30), both share [30, 34) and window 1 owns [34, 56), despite the windows overlapping on [28, 36)
    got = predict_tiled(TileIndex(), np.zeros((1, 8, 56), np.float32), (8, 32), (0, 4), 1, blend=blend, batch_size=1)[
        0, 0
    ]
    x = np.arange(36) - 17.5
    profile = np.exp(-0.5 * (x / 4.5) ** 2) if blend == "gaussian" else 1 - np.abs(x) / 18.5
    # voxels 30..33 are at 32..35 of extent 0 (from -2) and 0..3 of extent 1 (from 30)
    w0, w1 = (profile[32:], profile[:4])
    np.testing.assert_allclose(got[30:34], w1 / (w0 + w1), atol=1e-6)
    assert (got[:30] == 0).all() and (got[34:] == 1).all()


@pytest.mark.parametrize("blend", ["none", "gaussian"])
def test_peak_memory_does_not_grow_with_the_volume(tmp_path: Path, blend: str) -> None:
    """HDF5 in and out: numpy memory traced while predicting stays flat when the volume grows 8x along z."""
    import tracemalloc

    import h5py

    peaks = {}
    for depth in (64, 512):
        path = tmp_path / f"volume_{depth}_{blend}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset(
                "raw",
                data=np.random.default_rng(0).random((1, depth, 96, 96), dtype=np.float32),
                chunks=(1, 16, 96, 96),
            )
            f.create_dataset("out", shape=(2, depth, 96, 96), dtype="float32", chunks=(1, 16, 96, 96))
        with h5py.File(path, "r+") as f:
            tracemalloc.start()
            predict_tiled(pointwise_net(3), f["raw"], 32, 8, 2, out=f["out"], blend=blend, device=torch.device("cpu"))
            peaks[depth] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            expected = pointwise_net(3)(torch.from_numpy(f["raw"][:, -5:])[None])[0].detach().numpy()
            np.testing.assert_allclose(f["out"][:, -5:], expected, atol=1e-5)
    output_bytes = 2 * 512 * 96 * 96 * 4
    assert peaks[512] < 1.25 * peaks[64]  # 8x the volume, (almost) the same memory
    assert peaks[512] < output_bytes / 2  # never near the whole prediction
