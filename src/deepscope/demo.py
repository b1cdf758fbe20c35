"""``deepscope demo``: a full run on data bundled with a dependency or generated, so it needs no download.

Classification uses scikit-learn's 8x8 digits (1,797 images), written as an ``.npz``; segmentation uses generated
nuclei images written as TIFF ``images/`` + ``masks/`` folders; denoising uses scikit-image's bundled grey photographs
with Gaussian noise (sigma 25) added by the task, and Noise2Void, which learns from the noisy images alone; pixel
classification uses scikit-image's coins photograph with a few brush strokes written here; self-supervised learning uses
the digits again, their labels only judging the features (kNN and linear probes against a random encoder). All runs
go through the same readers, trainer, checkpoints and report as user data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
import tifffile
from sklearn.datasets import load_digits
from PIL import Image
from sklearn.model_selection import train_test_split

from deepscope.data.augment import AugmentConfig
from deepscope.data.det_augment import DetAugmentConfig
from deepscope.data.noise import NoiseConfig
from deepscope.data.synthetic import SHAPES, nuclei_set, shapes_image
from deepscope.engine.trainer import Trainer
from deepscope.tasks.classify import ClassifyConfig, ClassifyTask
from deepscope.tasks.detect.config import DetectConfig
from deepscope.tasks.detect.task import DetectTask
from deepscope.tasks.denoise import DenoiseTask
from deepscope.tasks.denoise_config import DenoiseConfig
from deepscope.tasks.segment.task import SegmentConfig, SegmentTask
from deepscope.tasks.ssl.config import SSLConfig
from deepscope.tasks.ssl.task import SSLTask

DEMO_SSL_EPOCHS = 40


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


def write_shapes(root: Path, train: int = 160, test: int = 24, size: int = 128) -> Path:
    """Generated shapes as ``train/`` and ``test/`` folders of ``images/`` PNGs and one COCO ``annotations.json`` each."""
    for split, n, seed in (("train", train, 0), ("test", test, 10_000)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            image, boxes, labels = shapes_image(size, seed + i)
            name = f"{i:04d}.png"
            Image.fromarray(image).save(root / split / "images" / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label, "iscrowd": 0,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / split / "annotations.json").write_text(json.dumps(coco))
    return root


def demo_detect(out: Path) -> dict[str, Any]:
    data = write_shapes(out / "data")
    # CenterNet on the tiny backbone at the images' own size: the detector that learns this fastest on 2 CPU cores
    config = DetectConfig(data=str(data), out=str(out), model="centernet", epochs=14, batch_size=4, image_size=128, max_size=128,
                          scale_range=[1.0, 1.0], model_args={"backbone": "tiny", "fpn_channels": 64},
                          augment=DetAugmentConfig(crop=0.0, scale_jitter=[1.0, 1.0]))
    config.optim.lr = 3e-3
    metrics = Trainer(DetectTask(config)).fit()
    return {"map": metrics["test_map"], "map_50": metrics["test_map_50"], "wall_time_s": round(metrics["wall_time_s"], 1),
            "report": str(out / "report.html")}


def demo_ssl(out: Path) -> dict[str, Any]:
    """SimCLR on the digits' training images (labels unused by training), judged by a kNN classifier and linear probes on
    the frozen features against the same encoder at random initialisation."""
    data = write_digits_npz(out / "data" / "digits.npz")
    config = SSLConfig(data=str(data), model="resnet18", model_args={"width": 16}, out=str(out), epochs=DEMO_SSL_EPOCHS,
                       batch_size=128, view_settings={"crop_scale": [0.3, 1.0]})
    metrics = Trainer(SSLTask(config)).fit()
    keep = ("knn_accuracy", "random_encoder_knn_accuracy")
    result = {k: metrics[k] for k in keep}
    result["linear_accuracy"] = metrics["linear_accuracy@1"]
    result["random_encoder_linear_accuracy"] = metrics["random_encoder_linear_accuracy@1"]
    result.update({k: v for k, v in metrics.items() if k.startswith(("linear_accuracy@", "random_encoder_linear_accuracy@"))})
    return {**result, "wall_time_s": round(metrics["wall_time_s"], 1), "report": str(out / "report.html")}


def run_demo(task: str, out: Path) -> dict[str, Any]:
    demos = {"classify": demo_classify, "segment": demo_segment, "denoise": demo_denoise, "pixel": demo_pixel, "detect": demo_detect,
             "ssl": demo_ssl}
    return demos[task](out)
