"""Pixel classification quality: forests trained from scribbles at 0.1 % of the training pixels, next to the U-Nets.

ISBI 2012 EM membranes (train slices 00-19, test 20-24, as bench_isbi_em.py) and DSB2018 nuclei foreground (train/
664 images, test/ 50). Scribbles are sampled once from the dense training labels (``deepscope pixel scribbles``
logic: straight strokes of up to 16 pixels inside one class, the budget split evenly over the classes) and shared by:
deepscope's forest (ilastik's 6 filters at 7 scales, 100 trees, through ``train_pixel`` / ``predict_files``), and the
same scikit-learn forest on scikit-image ``multiscale_basic_features`` (7 scales 0.5-16) fitted on the same pixels.
The U-Nets are the checkpoints the segmentation benchmarks trained (bench_isbi_em.py, bench_dsb2018.py with
``dsb2018_unet_long.yaml``), predicted on the same test images. IoU is summed over the test set.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import RandomForestClassifier

from bench_isbi_em import prepare as prepare_isbi
from common import CACHE, SHARED, command_line, header, write_section
from deepscope.data.scribbles import dense_classes, sample_scribbles
from deepscope.tasks.pixel.config import PixelConfig
from deepscope.tasks.pixel.predict import predict_files as forest_predict
from deepscope.tasks.pixel.train import train_pixel
from deepscope.tasks.segment.predict import predict_files as unet_predict

FRACTION = 0.001
CPU = torch.device("cpu")


def read(path: Path) -> np.ndarray:
    image = np.asarray(Image.open(path))
    return image[..., :3] if image.ndim == 3 else image


def write_scribbles(masks: list[Path], out: Path, foreground: bool) -> int:
    """Sparse labels for every mask (classes 1..K); returns the number of labelled pixels."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in masks:
        sparse = sample_scribbles(dense_classes(read(path), foreground=foreground), FRACTION, rng=rng)
        tifffile.imwrite(out / f"{path.stem}.tif", sparse)
        total += int(np.count_nonzero(sparse))
    return total


def iou(pred: list[np.ndarray], truth: list[np.ndarray]) -> float:
    inter = sum(int(np.count_nonzero(p & t)) for p, t in zip(pred, truth))
    union = sum(int(np.count_nonzero(p | t)) for p, t in zip(pred, truth))
    return inter / union


def deepscope_forest(
    images: Path, scribbles: Path, test: list[Path], run: Path, positive: int
) -> tuple[list[np.ndarray], float, dict]:
    start = time.perf_counter()
    metrics = train_pixel(
        PixelConfig(images=str(images), labels=str(scribbles), out=str(run), cache="off", predict=False)
    )
    records = forest_predict(metrics["classifier"], test, run / "test", CPU)
    pred = [tifffile.imread(r["classes"]) == positive for r in records]
    return pred, time.perf_counter() - start, metrics


def skimage_forest(
    images: list[Path], scribbles: Path, test: list[Path], positive: int
) -> tuple[list[np.ndarray], float]:
    start = time.perf_counter()

    def features(path: Path) -> np.ndarray:
        image = read(path).astype(np.float32)
        return multiscale_basic_features(
            image, sigma_min=0.5, sigma_max=16, num_sigma=7, channel_axis=-1 if image.ndim == 3 else None
        )

    x, y = [], []
    for path in images:
        sparse = tifffile.imread(scribbles / f"{path.stem}.tif")
        where = sparse > 0
        x.append(features(path)[where])
        y.append(sparse[where])
    forest = RandomForestClassifier(100, n_jobs=2, random_state=0).fit(np.concatenate(x), np.concatenate(y))
    pred = []
    for path in test:
        f = features(path)
        pred.append(forest.predict(f.reshape(-1, f.shape[-1])).reshape(f.shape[:-1]) == positive)
    return pred, time.perf_counter() - start


def unet(checkpoint: Path, test: list[Path], out: Path, channel: int) -> tuple[list[np.ndarray], float]:
    start = time.perf_counter()
    records = unet_predict(checkpoint, test, out, CPU)
    probs = [tifffile.imread(r["probabilities"]) for r in records]
    return [p[channel] > 0.5 if p.ndim == 3 else p > 0.5 for p in probs], time.perf_counter() - start


def data_set(name: str) -> dict:
    if name == "isbi2012":
        root = prepare_isbi()
        train, test = root / "train", root / "test"
        return {
            "train_images": train / "images",
            "train_masks": sorted((train / "masks").glob("*.png")),
            "test": sorted((test / "images").glob("*.png")),
            "truth": [read(p) == 0 for p in sorted((test / "masks").glob("*.png"))],
            "foreground": False,
            "positive": 1,
            "unet": CACHE / "isbi2012_run" / "best.pt",
            "unet_channel": 0,
            "target": "membrane",
        }
    root = SHARED / "dsb2018"
    truth = [read(p) > 0 for p in sorted((root / "test" / "masks").glob("*"))]
    return {
        "train_images": root / "train" / "images",
        "train_masks": sorted((root / "train" / "masks").glob("*")),
        "test": sorted((root / "test" / "images").glob("*")),
        "truth": truth,
        "foreground": True,
        "positive": 2,
        "unet": CACHE / "dsb2018" / "dsb2018_unet_long-35min" / "best.pt",
        "unet_channel": 0,
        "target": "nuclei",
    }


def main() -> None:
    rows = []
    for name, title in (("isbi2012", "ISBI 2012 membranes"), ("dsb2018", "DSB2018 nuclei")):
        data = data_set(name)
        run = CACHE / "pixel" / name
        scribbles = run / "scribbles"
        labelled = write_scribbles(data["train_masks"], scribbles, data["foreground"])
        train_images = sorted(p for p in Path(data["train_images"]).iterdir() if (scribbles / f"{p.stem}.tif").exists())
        ours, ours_s, metrics = deepscope_forest(
            data["train_images"], scribbles, data["test"], run / "forest", data["positive"]
        )
        peer, peer_s = skimage_forest(train_images, scribbles, data["test"], data["positive"])
        net, net_s = unet(data["unet"], data["test"], run / "unet", data["unet_channel"])
        what = f"{title} ({data['target']} IoU, {len(data['test'])} test images; {labelled:,} scribbled pixels on {len(train_images)} training images)"
        rows += [
            f"| {what} | deepscope forest ({metrics['features']} features, 100 trees) | {iou(ours, data['truth']):.3f} | "
            f"{ours_s:.0f} s (features {metrics['feature_s']:.0f} s, fit {metrics['fit_s']:.1f} s) |",
            f"| | scikit-image features + same forest, same pixels | {iou(peer, data['truth']):.3f} | {peer_s:.0f} s |",
            f"| | U-Net of the segmentation benchmark (dense labels) | {iou(net, data['truth']):.3f} | {net_s:.0f} s to predict |",
        ]
        print("\n".join(rows[-3:]), flush=True)
    lines = [
        header(command_line()),
        "| data | method | IoU | time (features + fit + test prediction) |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "Scribbles: 0.1 % of the training pixels, as strokes of up to 16 pixels, split evenly between the classes "
        "(membrane/interior; background/nucleus). The U-Nets learnt from every training pixel (ISBI: slices 00-19; "
        "DSB2018: train/ for 33 minutes), so they are the ceiling the forests are measured against, not a peer with the "
        "same labels. DSB2018 forests see RGB (3 x the features); its test set mixes fluorescence, bright field and "
        "histology.",
    ]
    write_section("pixel", "Pixel classification from scribbles (CPU, 2 cores)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
