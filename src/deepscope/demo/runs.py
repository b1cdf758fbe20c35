"""``deepscope demo``: a full run on data bundled with a dependency or generated, so it needs no download.

Classification uses scikit-learn's 8x8 digits (1,797 images), written as an ``.npz``; segmentation uses generated
nuclei images written as TIFF ``images/`` + ``masks/`` folders; denoising uses scikit-image's bundled grey photographs
with Gaussian noise (sigma 25) added by the task, and Noise2Void, which learns from the noisy images alone; pixel
classification uses scikit-image's coins photograph with a few brush strokes written here; self-supervised learning uses
the digits again, their labels only judging the features (kNN and linear probes against a random encoder). All runs
go through the same readers, trainer, checkpoints and report as user data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepscope.demo.data import COINS, write_coins, write_digits_npz, write_nuclei, write_photos, write_shapes
from deepscope.engine.trainer import Trainer

DEMO_SSL_EPOCHS = 40


def demo_classify(out: Path) -> dict[str, Any]:
    from deepscope.data.classification.augment import AugmentConfig
    from deepscope.tasks.classify.config import ClassifyConfig
    from deepscope.tasks.classify.task import ClassifyTask

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
    return {
        "test_accuracy": metrics["test_accuracy"],
        "wall_time_s": round(metrics["wall_time_s"], 1),
        "report": str(out / "report.html"),
    }


def demo_segment(out: Path) -> dict[str, Any]:
    from deepscope.tasks.segment.task import SegmentConfig, SegmentTask

    data = write_nuclei(out / "data")
    # 64x64 patches (a quarter of an image): as many steps as whole-image patches for a quarter of the arithmetic
    config = SegmentConfig(
        data=str(data),
        out=str(out),
        epochs=14,
        batch_size=16,
        patches_per_epoch=256,
        patch_shape=[64, 64],
        model_args={"features": 16, "depth": 3},
        val_fraction=0.15,
    )
    config.optim.lr = 3e-3
    metrics = Trainer(SegmentTask(config)).fit()
    return {
        "test_score_0.5": metrics["test_score_0.5"],
        "test_mean_score": metrics["test_mean_score"],
        "wall_time_s": round(metrics["wall_time_s"], 1),
        "report": str(out / "report.html"),
    }


def demo_denoise(out: Path) -> dict[str, Any]:
    from deepscope.data.denoise.noise import NoiseConfig
    from deepscope.tasks.denoise.config import DenoiseConfig
    from deepscope.tasks.denoise.task import DenoiseTask

    data = write_photos(out / "data")
    # 16 features and batches of 16 patches: as good as 32 features (26.5 dB) at a quarter of the arithmetic, so the demo
    # takes about a minute in float32 on CPUs without native bf16 too
    config = DenoiseConfig(
        data=str(data),
        out=str(out),
        method="n2v",
        noise=NoiseConfig(kind="gaussian", sigma=25),
        epochs=6,
        batch_size=16,
        patches_per_epoch=1024,
        val_fraction=0.15,
        model_args={"features": 16},
    )
    config.optim.lr = 4e-3
    metrics = Trainer(DenoiseTask(config)).fit()
    return {
        "test_psnr": metrics["test_psnr"],
        "test_psnr_noisy": metrics["test_psnr_input"],
        "test_ssim": metrics["test_ssim"],
        "wall_time_s": round(metrics["wall_time_s"], 1),
        "report": str(out / "report.html"),
    }


def demo_pixel(out: Path) -> dict[str, Any]:
    """Forest from a few strokes on the coins, every pixel predicted, coins counted by a seeded watershed."""
    from deepscope.engine.distributed import pick_device
    from deepscope.tasks.pixel.config import PixelConfig
    from deepscope.tasks.pixel.predict import InstanceSettings, predict_files
    from deepscope.tasks.pixel.train import train_pixel

    images, labels = write_coins(out / "data")
    metrics = train_pixel(
        PixelConfig(images=str(images), labels=str(labels), out=str(out), class_names=["background", "coin"])
    )
    settings = InstanceSettings(seeds="maxima", min_distance=15, min_size=200)
    record = predict_files(
        metrics["classifier"], [images / "coins.png"], out / "instances", pick_device("auto"), instances=settings
    )[0]
    return {
        "labelled_pixels": metrics["labelled_pixels"],
        "features": metrics["features"],
        "fit_s": metrics["fit_s"],
        "oob_accuracy": metrics["oob_accuracy"],
        "coins_found": record["objects"],
        "coins_in_image": COINS,
        "instances": record["instances"],
        "report": metrics["report"],
    }


def demo_detect(out: Path) -> dict[str, Any]:
    from deepscope.data.detection.augment import DetAugmentConfig
    from deepscope.tasks.detect.config import DetectConfig
    from deepscope.tasks.detect.task import DetectTask

    data = write_shapes(out / "data")
    # CenterNet on the tiny backbone at the images' own size: the detector that learns this fastest on 2 CPU cores
    config = DetectConfig(
        data=str(data),
        out=str(out),
        model="centernet",
        epochs=14,
        batch_size=4,
        image_size=128,
        max_size=128,
        scale_range=[1.0, 1.0],
        model_args={"backbone": "tiny", "fpn_channels": 64},
        augment=DetAugmentConfig(crop=0.0, scale_jitter=[1.0, 1.0]),
    )
    config.optim.lr = 3e-3
    metrics = Trainer(DetectTask(config)).fit()
    return {
        "map": metrics["test_map"],
        "map_50": metrics["test_map_50"],
        "wall_time_s": round(metrics["wall_time_s"], 1),
        "report": str(out / "report.html"),
    }


def demo_ssl(out: Path) -> dict[str, Any]:
    """SimCLR on the digits' training images (labels unused by training), judged by a kNN classifier and linear probes on
    the frozen features against the same encoder at random initialisation."""
    from deepscope.tasks.ssl.config import SSLConfig
    from deepscope.tasks.ssl.task import SSLTask

    data = write_digits_npz(out / "data" / "digits.npz")
    config = SSLConfig(
        data=str(data),
        model="resnet18",
        model_args={"width": 16},
        out=str(out),
        epochs=DEMO_SSL_EPOCHS,
        batch_size=128,
        view_settings={"crop_scale": [0.3, 1.0]},
    )
    metrics = Trainer(SSLTask(config)).fit()
    keep = ("knn_accuracy", "random_encoder_knn_accuracy")
    result = {k: metrics[k] for k in keep}
    result["linear_accuracy"] = metrics["linear_accuracy@1"]
    result["random_encoder_linear_accuracy"] = metrics["random_encoder_linear_accuracy@1"]
    result.update(
        {k: v for k, v in metrics.items() if k.startswith(("linear_accuracy@", "random_encoder_linear_accuracy@"))}
    )
    return {**result, "wall_time_s": round(metrics["wall_time_s"], 1), "report": str(out / "report.html")}


def run_demo(task: str, out: Path) -> dict[str, Any]:
    demos = {
        "classify": demo_classify,
        "segment": demo_segment,
        "denoise": demo_denoise,
        "pixel": demo_pixel,
        "detect": demo_detect,
        "ssl": demo_ssl,
    }
    return demos[task](out)
