"""Data of the demos, bundled with a dependency or generated: the digits, nuclei, photographs, coins and shapes
(the tests train on them too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
import tifffile
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from deepscope.data.synthetic import SHAPES, nuclei_set, shapes_image


def write_digits_npz(path: Path, seed: int = 0) -> Path:
    """scikit-learn digits as uint8 images (values 0..16 scaled to 0..255), 80/20 stratified split."""
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=np.array([str(i) for i in range(10)]),
    )
    return path


def write_nuclei(root: Path, train: int = 32, test: int = 8, size: int = 128) -> Path:
    """Generated nuclei as ``train/`` and ``test/`` folders of ``images/`` and ``masks/`` TIFFs."""
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i, (image, labels) in enumerate(nuclei_set(n, size, seed)):
            tifffile.imwrite(root / split / "images" / f"{i:03d}.tif", image)
            tifffile.imwrite(root / split / "masks" / f"{i:03d}.tif", labels)
    return root


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


# brush strokes (row0, col0, row1, col1) on scikit-image's coins, as a user would paint them: background along the
# gaps between the rows of coins and the borders, a short stroke across 16 of the 24 coins
COIN_STROKES = {
    1: [
        (6, 5, 6, 378),
        (86, 5, 86, 378),
        (152, 5, 152, 378),
        (222, 5, 222, 378),
        (298, 5, 298, 378),
        (5, 4, 298, 4),
        (5, 380, 298, 380),
    ],
    2: [
        (258, 25, 258, 60),
        (258, 160, 258, 192),
        (190, 330, 190, 362),
        (45, 255, 45, 280),
        (125, 320, 125, 345),
        (190, 120, 190, 140),
        (120, 30, 120, 50),
        (55, 40, 55, 60),
        (55, 150, 55, 170),
        (50, 325, 50, 350),
        (118, 95, 118, 112),
        (118, 240, 118, 258),
        (188, 40, 188, 58),
        (188, 190, 188, 208),
        (262, 95, 262, 120),
        (262, 300, 262, 322),
    ],
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


def write_shapes(root: Path, train: int = 160, test: int = 24, size: int = 128) -> Path:
    """Generated shapes as ``train/`` and ``test/`` folders of ``images/`` PNGs and one COCO ``annotations.json`` each."""
    for split, n, seed in (("train", train, 0), ("test", test, 10_000)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for i in range(n):
            image, boxes, labels = shapes_image(size, seed + i)
            name = f"{i:04d}.png"
            Image.fromarray(image).save(root / split / "images" / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": label,
                        "iscrowd": 0,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                    }
                )
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / split / "annotations.json").write_text(json.dumps(coco))
    return root
