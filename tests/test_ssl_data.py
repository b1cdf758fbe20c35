"""SSL data: reading every layout into memory, patches, normalisation, errors, and the batch iterators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from deepscope.data.io.views import percentile_normalize
from deepscope.data.ssl.dataset import SSLEvalBatches, SSLImages, SSLTrainBatches, load_ssl_data, ssl_stats
from deepscope.errors import DataError, DeepscopeError

CPU = torch.device("cpu")


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def rng_image(seed: int, shape: tuple[int, ...], high: int = 256, dtype: type = np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def corners(images: SSLImages) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.rsplit(":", 1)[1].split(",")) for s in images.sources]


def test_npz_labelled_with_carved_stratified_val(tmp_path: Path) -> None:
    x = rng_image(0, (20, 8, 8, 3))
    y = np.repeat([0, 1], 10)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    data = load_ssl_data(tmp_path / "d.npz", val_fraction=0.1, seed=3)
    assert (data.kind, data.channels, data.class_names) == ("natural", 3, ["0", "1"])
    train, val, test = data.splits["train"], data.splits["val"], data.splits["test"]
    assert (len(train), len(val), len(test)) == (18, 2, 4)
    assert sorted(val.labels.tolist()) == [0, 1]  # stratified: one of each class
    assert train.images.dtype == torch.uint8 and train.images.shape == (18, 3, 8, 8) and train.scale == 255.0
    index = [int(s.split("[")[1].rstrip("]")) for s in val.sources]
    assert torch.equal(val.images, torch.from_numpy(x[index]).permute(0, 3, 1, 2))
    assert val.labelled and np.array_equal(val.labels, y[index])


def test_class_folders_conform_channels(tmp_path: Path) -> None:
    for c, name in enumerate(["cat", "dog"]):
        for i in range(3):
            save(tmp_path / name / f"{i}.png", np.full((6, 6), 10 * c + i, np.uint8))
    data = load_ssl_data(tmp_path, val_fraction=0, channels=3)
    train = data.splits["train"]
    assert data.class_names == ["cat", "dog"] and list(data.splits) == ["train"]
    assert train.images.shape == (6, 3, 6, 6) and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images[4].unique().tolist() == [11]  # grey repeated into 3 channels


def test_plain_rgb_folder_is_natural_whole_and_unlabelled(tmp_path: Path) -> None:
    arrays = [rng_image(i, (12, 10, 3)) for i in range(5)]
    for i, a in enumerate(arrays):
        save(tmp_path / f"im{i}.png", a)
    data = load_ssl_data(tmp_path, val_fraction=0.2)
    train, val = data.splits["train"], data.splits["val"]
    assert (data.kind, data.class_names, len(train), len(val)) == ("natural", [], 4, 1)
    assert not train.labelled and train.labels.tolist() == [-1] * 4
    i = int(Path(val.sources[0]).stem[2:])
    assert val.images.dtype == torch.uint8 and torch.equal(val.images[0], torch.from_numpy(arrays[i]).permute(2, 0, 1))


def test_images_folder_grid_patches_cover_each_image(tmp_path: Path) -> None:
    a, b = rng_image(1, (40, 50)), rng_image(2, (32, 32))
    save(tmp_path / "images" / "a.png", a)
    save(tmp_path / "images" / "b.png", b)
    data = load_ssl_data(tmp_path, patch_size=16, val_fraction=0)
    train = data.splits["train"]
    assert (data.kind, data.channels) == ("microscopy", 1)
    assert train.images.shape == (12 + 4, 1, 16, 16) and train.images.dtype == torch.float16 and train.scale == 1.0
    # last row/column shifted inward
    assert corners(train)[:12] == [(y, x) for y in (0, 16, 24) for x in (0, 16, 32, 34)]
    expected = percentile_normalize(a, 1.0, 99.8)[24:40, 34:50]
    np.testing.assert_allclose(train.images[11, 0].float().numpy(), expected, atol=2e-3)
    capped = load_ssl_data(tmp_path, patch_size=16, val_fraction=0, max_patches=5, seed=1).splits["train"]
    index = [train.sources.index(src) for src in capped.sources]
    assert len(capped) == 5 and index == sorted(index) and torch.equal(capped.images, train.images[index])


def test_object_crops_are_centred_on_each_object(tmp_path: Path) -> None:
    mask = np.zeros((40, 40), np.uint16)
    mask[8:13, 10:15] = 1  # centre (10, 12)
    mask[24:27, 28:33] = 2  # centre (25, 30)
    mask[0:3, 36:40] = 7  # at the corner: the patch shifts inward
    image = rng_image(3, (40, 40), 65536, np.uint16)
    save(tmp_path / "train" / "images" / "x.tif", image)
    save(tmp_path / "train" / "masks" / "x.tif", mask)
    data = load_ssl_data(tmp_path, patch_size=9, crops="objects", val_fraction=0)
    train = data.splits["train"]
    assert train.images.shape == (3, 1, 9, 9)
    assert corners(train) == [(10 - 4, 12 - 4), (25 - 4, 30 - 4), (0, 40 - 9)]
    np.testing.assert_allclose(train.images[1, 0].float().numpy(), percentile_normalize(image)[21:30, 26:35], atol=2e-3)


def test_uint16_patches_are_percentile_normalised(tmp_path: Path) -> None:
    image = rng_image(4, (64, 64), 50000, np.uint16) + 10000
    save(tmp_path / "images" / "x.tif", image)
    whole = load_ssl_data(tmp_path, val_fraction=0).splits["train"].images.float()
    assert whole.shape == (1, 1, 64, 64)
    assert abs(torch.quantile(whole.flatten(), 0.01).item()) < 0.01
    assert abs(torch.quantile(whole.flatten(), 0.998).item() - 1) < 0.01
    patches = load_ssl_data(tmp_path, patch_size=32, val_fraction=0).splits["train"].images.float()
    assert patches.shape == (4, 1, 32, 32) and patches.min() > -0.05 and patches.max() < 1.05


def test_channels_follow_the_segment_task(tmp_path: Path) -> None:
    """RGBA pictures lose alpha (as the segment task reads DSB2018), grey ones are repeated to the most channels."""
    save(tmp_path / "images" / "rgba.png", rng_image(5, (16, 16, 4)))
    save(tmp_path / "images" / "grey.png", rng_image(6, (16, 16)))
    data = load_ssl_data(tmp_path, val_fraction=0)
    images = data.splits["train"].images
    assert data.channels == 3 and images.shape == (2, 3, 16, 16)
    assert torch.equal(images[0, 0], images[0, 2])  # grey.png sorts first


def test_normalize_makes_rgb_microscopy(tmp_path: Path) -> None:
    for i in range(2):
        save(tmp_path / f"{i}.png", rng_image(i, (8, 8, 3)))
    data = load_ssl_data(tmp_path, normalize=[0, 100], val_fraction=0)
    assert data.kind == "microscopy" and data.splits["train"].images.dtype == torch.float16
    images = data.splits["train"].images.float()
    assert images.amin((2, 3)).abs().max() < 1e-3 and (images.amax((2, 3)) - 1).abs().max() < 1e-3


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, dict, str]]:
    cases: dict[str, tuple[Path, dict, str]] = {"missing": (tmp_path / "nope", {}, "nope")}
    (tmp_path / "empty").mkdir()
    cases["no images"] = (tmp_path / "empty", {}, "empty")
    save(tmp_path / "small" / "images" / "tiny.png", rng_image(0, (20, 30)))
    cases["too small"] = (
        tmp_path / "small",
        {"patch_size": 32},
        "tiny.png: image is 20x30, smaller than the 32x32 crop",
    )
    save(tmp_path / "nomask" / "images" / "a.png", rng_image(0, (20, 30)))
    cases["no masks"] = (tmp_path / "nomask", {"patch_size": 8, "crops": "objects"}, "nomask")
    save(tmp_path / "badmask" / "images" / "a.png", rng_image(0, (20, 30)))
    save(tmp_path / "badmask" / "masks" / "a.tif", np.ones((20, 31), np.uint16))
    cases["mask size"] = (tmp_path / "badmask", {"patch_size": 8, "crops": "objects"}, "a.tif")
    save(tmp_path / "corrupt" / "good.png", rng_image(0, (8, 8, 3)))
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"not a png")
    cases["corrupt"] = (tmp_path / "corrupt", {}, "bad.png")
    save(tmp_path / "mixed" / "a.png", rng_image(0, (8, 8, 3)))
    save(tmp_path / "mixed" / "b.png", rng_image(0, (9, 8, 3)))
    cases["mixed sizes"] = (tmp_path / "mixed", {}, "b.png: image size 9x8 differs")
    return cases


@pytest.mark.parametrize(
    "case", ["missing", "no images", "too small", "no masks", "mask size", "corrupt", "mixed sizes"]
)
def test_bad_input_names_the_file(tmp_path: Path, case: str) -> None:
    path, kwargs, named = _bad_inputs(tmp_path)[case]
    with pytest.raises(DataError) as info:
        load_ssl_data(path, **kwargs)
    message = str(info.value)
    assert named in message and "\n" not in message
    if case == "mixed sizes":
        assert "patch_size" in message


class StandInViews:
    """Deterministic two views whose randomness is drawn for the global batch and sliced, as TwoViews does."""

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator, n: int, rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift = torch.rand(n, generator=generator)[rows].view(-1, 1, 1, 1)
        return x + shift, x.flip(-1)


def ssl_images(n: int = 12, c: int = 2) -> SSLImages:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, c, 4, 4).contiguous()
    return SSLImages(images, np.arange(n, dtype=np.int64), [str(i) for i in range(n)], 255.0)


def epoch_batches(loader: SSLTrainBatches, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_train_batches_deterministic_per_epoch_and_standardised() -> None:
    mean, std = [0.01, 0.02], [0.5, 0.25]
    loader = SSLTrainBatches(ssl_images(), StandInViews(), 4, mean, std, CPU, seed=5)
    first, again, other = epoch_batches(loader, 1), epoch_batches(loader, 1), epoch_batches(loader, 2)
    assert len(loader) == len(first) == 3
    assert all(torch.equal(a, b) for ba, bb in zip(first, again) for a, b in zip(ba, bb))
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(first, other))
    _, v2, y = first[0]
    raw = y.view(-1, 1, 1, 1).float().expand(4, 2, 4, 4) / 255  # image i is filled with i
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    assert torch.allclose(v2, (raw - m) / s)
    assert sorted(torch.cat([b[2] for b in first]).tolist()) == list(range(12))  # each image once per epoch


def test_train_batches_two_ranks_make_up_the_global_batch() -> None:
    args = (ssl_images(), StandInViews(), 4, [0.0, 0.0], [1.0, 1.0], CPU)
    whole = epoch_batches(SSLTrainBatches(*args, seed=2), 3)
    shares = [epoch_batches(SSLTrainBatches(*args, seed=2, rank=r, world=2), 3) for r in range(2)]
    for b, batch in enumerate(whole):
        for k in range(3):
            assert torch.equal(torch.cat([shares[0][b][k], shares[1][b][k]]), batch[k])


def test_train_batches_refuse_small_shares_and_small_data() -> None:
    with pytest.raises(DeepscopeError, match="at least 2 images per process"):
        SSLTrainBatches(ssl_images(), StandInViews(), 2, [0.0, 0.0], [1.0, 1.0], CPU, world=2)
    with pytest.raises(DeepscopeError, match="fewer than one batch"):
        SSLTrainBatches(ssl_images(3), StandInViews(), 4, [0.0, 0.0], [1.0, 1.0], CPU)


def test_eval_batches_cover_every_image_once_across_ranks() -> None:
    data = ssl_images(7)
    seen = []
    for rank in range(2):
        loader = SSLEvalBatches(data, 2, [0.0, 0.0], [1.0, 1.0], CPU, rank=rank, world=2)
        batches = list(loader)
        assert len(loader) == len(batches)
        for x, y in batches:
            assert torch.allclose(x[:, 0, 0, 0] * 255, y.float())
            seen += y.tolist()
    assert sorted(seen) == list(range(7))


def test_eval_batches_centre_crop_to_the_view_size() -> None:
    data = ssl_images(2)
    data.images[:, :, 1:3, 1:3] = 200
    ((x, _),) = SSLEvalBatches(data, 4, [0.0, 0.0], [1.0, 1.0], CPU, size=(2, 2))
    assert x.shape == (2, 2, 2, 2) and torch.all(x * 255 == 200)
    with pytest.raises(DataError, match="smaller than the 8x8 views"):
        SSLEvalBatches(data, 4, [0.0, 0.0], [1.0, 1.0], CPU, size=(8, 8))


def test_ssl_stats() -> None:
    data = ssl_images(4, c=3)
    data.images[:, 1] = 255
    mean, std = ssl_stats(data, "natural")
    np.testing.assert_allclose(mean, [1.5 / 255, 1.0, 1.5 / 255], rtol=1e-6)
    np.testing.assert_allclose(std[1], 0.0, atol=1e-5)
    assert ssl_stats(data, "microscopy") == ([0.0] * 3, [1.0] * 3)


def test_train_batches_with_the_real_views_agree_across_ranks() -> None:
    from deepscope.data.ssl.views import TwoViews, view_config

    data = SSLImages(torch.randn(8, 1, 12, 12).half(), np.full(8, -1, np.int64), [str(i) for i in range(8)], 1.0)
    args = (data, TwoViews(view_config("microscopy"), (8, 8)), 4, [0.0], [1.0], CPU)
    whole = epoch_batches(SSLTrainBatches(*args, seed=1), 0)
    shares = [epoch_batches(SSLTrainBatches(*args, seed=1, rank=r, world=2), 0) for r in range(2)]
    assert whole[0][0].shape == (4, 1, 8, 8) and not torch.equal(whole[0][0], whole[0][1])
    for b, batch in enumerate(whole):
        for k in range(3):
            assert torch.equal(torch.cat([shares[0][b][k], shares[1][b][k]]), batch[k])


@pytest.mark.parametrize("normalize", [[1.0, 2.0, 3.0], [99.8, 1.0], [1.0], [-1.0, 50.0]])
def test_normalize_must_be_two_percentiles(normalize):
    from deepscope.tasks.ssl.config import SSLConfig

    with pytest.raises(DeepscopeError, match="normalize must be two percentiles"):
        SSLConfig(data="d", normalize=normalize)
