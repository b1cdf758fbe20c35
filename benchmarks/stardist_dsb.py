"""StarDist2D trained from scratch on DSB2018 under a wall-clock budget: the peer of ``deepscope train segment`` in
bench_nuclei.py.

Runs inside ``benchmarks/.cache/venv-stardist`` (made by bench_nuclei.py: the ``stardist`` package with tensorflow-cpu,
whose pins clash with ours). Everything is StarDist's documented DSB2018 recipe (its ``examples/2D/2_training``
notebook): ``Config2D(n_rays=32, grid=(2, 2), n_channel_in=1)`` with the package's defaults (U-Net depth 3, 32 filters,
256x256 patches, batch 4, lr 3e-4, 100 steps per epoch), images as one grey channel normalised to percentiles 1-99.8,
``fill_label_holes`` on the masks, 15 % of the training images for validation, the notebook's augmenter (flips,
rot90, intensity scale and shift), then ``optimize_thresholds`` on the validation images. The only change is the stop:
a Keras callback ends training once ``--minutes`` have passed since the data were read (the same clock as deepscope's
``--max-minutes``); threshold optimisation and test prediction come after it, as deepscope's threshold tuning and test
scoring do. Predicted test labels go to OUT/pred/<image>.tif for the parent to score with deepscope's metric; a JSON
summary is the last line of stdout (also OUT/summary.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile
from csbdeep.utils import normalize
from imageio.v3 import imread
from stardist import fill_label_holes
from stardist.models import Config2D, StarDist2D
from tensorflow import keras


def grey(path: Path) -> np.ndarray:
    image = imread(path)
    return image[..., :3].mean(-1) if image.ndim == 3 else image.astype(np.float32)


def read_split(folder: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    names = sorted(p.stem for p in (folder / "images").glob("*.png"))
    images = [normalize(grey(folder / "images" / f"{n}.png"), 1, 99.8, axis=(0, 1)) for n in names]
    masks = [fill_label_holes(tifffile.imread(folder / "masks" / f"{n}.tif")) for n in names]
    return names, images, masks


def augmenter(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The notebook's augmenter: a random flip and right-angle rotation, then intensity scale and shift."""
    turns = np.random.randint(4)
    x, y = np.rot90(x, turns), np.rot90(y, turns)
    for axis in (0, 1):
        if np.random.rand() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    x = x * np.random.uniform(0.8, 1.2) + np.random.uniform(-0.2, 0.2)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


class TimeLimit(keras.callbacks.Callback):
    """Stops training at the end of the first batch past the deadline."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if time.time() > self.deadline:
            self.model.stop_training = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    start = time.time()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, images, masks = read_split(data / "train")
    rng = np.random.RandomState(args.seed)
    order = rng.permutation(len(images))
    n_val = max(1, round(0.15 * len(order)))
    val, train = order[:n_val], order[n_val:]
    config = Config2D(n_rays=32, grid=(2, 2), n_channel_in=1, use_gpu=False)
    model = StarDist2D(config, name="stardist", basedir=str(out))
    model.prepare_for_training()
    model.callbacks.append(TimeLimit(start + 60 * args.minutes))
    history = model.train(
        [images[i] for i in train],
        [masks[i] for i in train],
        validation_data=([images[i] for i in val], [masks[i] for i in val]),
        augmenter=augmenter,
        epochs=10_000,
        steps_per_epoch=100,
    )
    train_s = time.time() - start
    model.load_weights("weights_best.h5")
    thresholds = model.optimize_thresholds([images[i] for i in val], [masks[i] for i in val])
    names, test_images, _ = read_split(data / "test")
    (out / "pred").mkdir(exist_ok=True)
    for name, image in zip(names, test_images):
        labels, _ = model.predict_instances(image)
        tifffile.imwrite(out / "pred" / f"{name}.tif", labels.astype(np.int32), compression="zlib")
    epochs = len(history.history["loss"])
    summary = {
        "train_s": train_s,
        "epochs": epochs,
        "steps": epochs * 100,
        "thresholds": thresholds,
        "train_images": len(train),
        "val_images": len(val),
        "parameters": int(model.keras_model.count_params()),
        "total_s": time.time() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
