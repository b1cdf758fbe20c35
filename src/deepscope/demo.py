"""``deepscope demo``: a full run on data bundled with a dependency or generated, so it needs no download.

Classification uses scikit-learn's 8x8 digits (1,797 images), written as an ``.npz``; segmentation uses generated
nuclei images written as TIFF ``images/`` + ``masks/`` folders; denoising uses scikit-image's bundled grey photographs
with Gaussian noise (sigma 25) added by the task, and Noise2Void, which learns from the noisy images alone; pixel
classification uses scikit-image's coins photograph with a few brush strokes written here. All runs
go through the same readers, trainer, checkpoints and report as user data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
import tifffile
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from deepscope.data.augment import AugmentConfig
from deepscope.data.noise import NoiseConfig
from deepscope.data.synthetic import nuclei_set
from deepscope.engine.trainer import Trainer
from deepscope.tasks.classify import ClassifyConfig, ClassifyTask
from deepscope.tasks.denoise import DenoiseTask
from deepscope.tasks.denoise_config import DenoiseConfig
from deepscope.tasks.segment import SegmentConfig, SegmentTask


def write_digits_npz(path: Path, seed: int = 0) -> Path:
    """scikit-learn digits as uint8 images (values 0..16 scaled to 0..255), 80/20 stratified split."""
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=np.array([str(i) for i in range(10)]))
    return path


def demo_classify(out: Path) -> dict[str, Any]:
    data = write_digits_npz(out / "data" / "digits.npz")
    config = ClassifyConfig(
        data=str(data),
        model="cnn",
        out=str(out),
        epochs=12,
        batch_size=64,
        augment=AugmentConfig(crop_padding=1, flip=False),
    )
    config.optim.name = "adamw"
    config.optim.lr = 3e-3
    config.optim.weight_decay = 1e-4
    metrics = Trainer(ClassifyTask(config)).fit()
    return {"test_accuracy": metrics["test_accuracy"], "wall_time_s": round(metrics["wall_time_s"], 1), "report": str(out / "report.html")}


def write_nuclei(root: Path, train: int = 32, test: int = 8, size: int = 128) -> Path:
    """Generated nuclei as ``train/`` and ``test/`` folders of ``images/`` and ``masks/`` TIFFs."""
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i, (image, labels) in enumerate(nuclei_set(n, size, seed)):
            tifffile.imwrite(root / split / "images" / f"{i:03d}.tif", image)
            tifffile.imwrite(root / split / "masks" / f"{i:03d}.tif", labels)
    return root


def demo_segment(out: Path) -> dict[str, Any]:
    data = write_nuclei(out / "data")
    # 64x64 patches (a quarter of an image): as many steps as whole-image patches for a quarter of the arithmetic
    config = SegmentConfig(data=str(data), out=str(out), epochs=14, batch_size=16, patches_per_epoch=256, patch_shape=[64, 64],
                           model_args={"features": 16, "depth": 3}, val_fraction=0.15)
    config.optim.lr = 3e-3
    metrics = Trainer(SegmentTask(config)).fit()
    return {"test_score_0.5": metrics["test_score_0.5"], "test_mean_score": metrics["test_mean_score"],
            "wall_time_s": round(metrics["wall_time_s"], 1), "report": str(out / "report.html")}


DENOISE_TRAIN = ("moon", "coins", "text", "page", "brick", "grass", "gravel", "clock")
DENOISE_TEST = ("camera",)


def write_photos(root: Path) -> Path:
    """scikit-image's grey photographs as ``train/clean`` and ``test/clean`` PNGs (the camera man is the test image)."""
    from PIL import Image

    for split, names in (("train", DENOISE_TRAIN), ("test", DENOISE_TEST)):
        (root / split / "clean").mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(getattr(skimage.data, name)()).save(root / split / "clean" / f"{name}.png")
    return root


def demo_denoise(out: Path) -> dict[str, Any]:
    data = write_photos(out / "data")
    # 16 features and batches of 16 patches: as good as 32 features (26.5 dB) at a quarter of the arithmetic, so the demo
    # takes about a minute in float32 on CPUs without native bf16 too
    config = DenoiseConfig(data=str(data), out=str(out), method="n2v", noise=NoiseConfig(kind="gaussian", sigma=25),
                           epochs=6, batch_size=16, patches_per_epoch=1024, val_fraction=0.15, model_args={"features": 16})
    config.optim.lr = 4e-3
    metrics = Trainer(DenoiseTask(config)).fit()
    return {"test_psnr": metrics["test_psnr"], "test_psnr_noisy": metrics["test_psnr_input"], "test_ssim": metrics["test_ssim"],
            "wall_time_s": round(metrics["wall_time_s"], 1), "report": str(out / "report.html")}


# brush strokes (row0, col0, row1, col1) on scikit-image's coins, as a user would paint them: background along the
# gaps between the rows of coins and the borders, a short stroke across 16 of the 24 coins
COIN_STROKES = {
    1: [(6, 5, 6, 378), (86, 5, 86, 378), (152, 5, 152, 378), (222, 5, 222, 378), (298, 5, 298, 378), (5, 4, 298, 4),
        (5, 380, 298, 380)],
    2: [(258, 25, 258, 60), (258, 160, 258, 192), (190, 330, 190, 362), (45, 255, 45, 280), (125, 320, 125, 345),
        (190, 120, 190, 140), (120, 30, 120, 50), (55, 40, 55, 60), (55, 150, 55, 170), (50, 325, 50, 350),
        (118, 95, 118, 112), (118, 240, 118, 258), (188, 40, 188, 58), (188, 190, 188, 208), (262, 95, 262, 120),
        (262, 300, 262, 322)],
}
COINS = 24


def write_coins(root: Path) -> tuple[Path, Path]:
    """scikit-image's coins photograph and its brush-stroke labels (1 background, 2 coin) as PNG and TIFF."""
    from PIL import Image
    from skimage.draw import line

    image = skimage.data.coins()
    labels = np.zeros(image.shape, np.uint8)
    for value, strokes in COIN_STROKES.items():
        for r0, c0, r1, c1 in strokes:
            labels[line(r0, c0, r1, c1)] = value
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / "coins.png")
    tifffile.imwrite(root / "labels" / "coins.tif", labels)
    return root / "images", root / "labels"


def demo_pixel(out: Path) -> dict[str, Any]:
    """Forest from a few strokes on the coins, every pixel predicted, coins counted by a seeded watershed."""
    from deepscope.engine.distributed import pick_device
    from deepscope.tasks.pixel import InstanceSettings, predict_files, train_pixel
    from deepscope.tasks.pixel_config import PixelConfig

    images, labels = write_coins(out / "data")
    metrics = train_pixel(PixelConfig(images=str(images), labels=str(labels), out=str(out), class_names=["background", "coin"]))
    settings = InstanceSettings(seeds="maxima", min_distance=15, min_size=200)
    record = predict_files(metrics["classifier"], [images / "coins.png"], out / "instances", pick_device("auto"), instances=settings)[0]
    return {"labelled_pixels": metrics["labelled_pixels"], "features": metrics["features"], "fit_s": metrics["fit_s"],
            "oob_accuracy": metrics["oob_accuracy"], "coins_found": record["objects"], "coins_in_image": COINS,
            "instances": record["instances"], "report": metrics["report"]}


def run_demo(task: str, out: Path) -> dict[str, Any]:
    return {"classify": demo_classify, "segment": demo_segment, "denoise": demo_denoise, "pixel": demo_pixel}[task](out)
