"""On the real data sets (when ../shared is present): CIFAR-10 read from folders and trained briefly; Noise2Void on BSD (slow)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_tree
from deepscope.cli import main


def decode_subset(pack, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    buf, off = pack[f"{split}_jpeg"], pack[f"{split}_offsets"]
    images = [
        np.asarray(Image.open(io.BytesIO(buf[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in range(count)
    ]
    return np.stack(images), pack[f"y_{split}"][:count].astype(np.int64)


@pytest.mark.slow  # over 30 s on 2 cores
def test_cifar10_subset_trains_well_above_chance(shared_data, tmp_path, capsys):
    pack = np.load(shared_data / "cifar10" / "cifar10_jpeg.npz")
    names = [str(n) for n in pack["class_names"]]
    for split, count in [("train", 3000), ("test", 1000)]:
        x, y = decode_subset(pack, split, count)
        write_tree(tmp_path / "cifar" / split, x, y, names)
    out = tmp_path / "run"
    args = [
        "train",
        "classify",
        "--data",
        str(tmp_path / "cifar"),
        "--model",
        "cnn",
        "--epochs",
        "4",
        "--batch-size",
        "64",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 1000
    assert metrics["test_accuracy"] > 0.35  # chance is 0.10
    assert metrics["worst"] and (out / "worst.png").exists()


@pytest.mark.slow
def test_noise2void_on_train400_denoises_bsd68(shared_data, tmp_path):
    """End to end on the real BSD sets (under 3 minutes in float32 on 2 AVX2 cores): Noise2Void trained on the noisy
    Train400 images alone (768 steps of a small U-Net), scored on all 68 BSD68 images at sigma 25, gains over 4 dB on the
    noisy input (24.9 dB from 20.2 measured on that machine)."""
    data = tmp_path / "bsd"
    for split, folder in (("train", "train400"), ("test", "bsd68")):
        (data / split).mkdir(parents=True)
        (data / split / "clean").symlink_to(shared_data / "bsd_denoise" / folder)
    out = tmp_path / "n2v"
    args = [
        "train",
        "denoise",
        "--method",
        "n2v",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "12",
        "--batch-size",
        "16",
        "--lr",
        "0.004",
        "--device",
        "cpu",
        "--set",
        "patches_per_epoch=1024",
        "--set",
        "model_args.features=16",
        "--set",
        "noise={kind: gaussian, sigma: 25}",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["images"] == 68
    assert metrics["test_psnr"] > metrics["test_psnr_input"] + 4, (metrics["test_psnr"], metrics["test_psnr_input"])
