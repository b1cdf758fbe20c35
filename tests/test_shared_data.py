"""On the real CIFAR-10 images (when ../shared is present): the folder reader at scale and a short training run."""

from __future__ import annotations

import io
import json

import numpy as np
from conftest import write_tree
from PIL import Image

from deepscope.cli import main


def decode_subset(pack, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    buf, off = pack[f"{split}_jpeg"], pack[f"{split}_offsets"]
    images = [np.asarray(Image.open(io.BytesIO(buf[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in range(count)]
    return np.stack(images), pack[f"y_{split}"][:count].astype(np.int64)


def test_cifar10_subset_trains_well_above_chance(shared_data, tmp_path, capsys):
    pack = np.load(shared_data / "cifar10" / "cifar10_jpeg.npz")
    names = [str(n) for n in pack["class_names"]]
    for split, count in [("train", 3000), ("test", 1000)]:
        x, y = decode_subset(pack, split, count)
        write_tree(tmp_path / "cifar" / split, x, y, names)
    out = tmp_path / "run"
    args = ["train", "classify", "--data", str(tmp_path / "cifar"), "--model", "cnn", "--epochs", "4", "--batch-size", "64",
            "--optimizer", "adamw", "--lr", "0.003", "--device", "cpu", "--amp", "bf16", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == 1000
    assert metrics["test_accuracy"] > 0.35  # chance is 0.10
    assert metrics["worst"] and (out / "worst.png").exists()
