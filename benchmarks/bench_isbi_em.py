"""ISBI 2012 EM membranes: a 2D U-Net (two classes) against a filter-bank random forest, on the same held-out slices.

Slices 00-19 train, 20-24 are scored (the challenge's own test labels are not public). The random forest is the
ilastik-style peer, run here in the same process: scikit-image ``multiscale_basic_features`` and scikit-learn's
``RandomForestClassifier`` (100 trees) fitted on 60,000 labelled pixels drawn from the training slices.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import RandomForestClassifier

from common import CACHE, HERE, SHARED, command_line, header, train_segment, write_section
from deepscope.metrics.semantic import confusion, confusion_scores

TEST = range(20, 25)


def prepare() -> Path:
    """train/ and test/ folders of images/ + masks/ as links to the shared slices."""
    root = CACHE / "isbi2012"
    source = SHARED / "isbi2012_em"
    for i in range(25):
        split = "test" if i in TEST else "train"
        for kind, folder in (("images", "images"), ("labels", "masks")):
            target = root / split / folder / f"{i:02d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(source / kind / f"{i:02d}.png")
    return root


def read(root: Path, split: str, kind: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((root / split / kind).glob("*.png"))]


def forest(root: Path) -> tuple[dict, float]:
    start = time.perf_counter()

    def features(image: np.ndarray) -> np.ndarray:
        return multiscale_basic_features(image, sigma_min=0.5, sigma_max=8, num_sigma=5)

    rng = np.random.default_rng(0)
    x, y = [], []
    for image, mask in zip(read(root, "train", "images"), read(root, "train", "masks")):
        f = features(image)
        pick = rng.choice(mask.size, 3000, replace=False)
        x.append(f.reshape(-1, f.shape[-1])[pick])
        y.append((mask.ravel()[pick] > 0).astype(int))
    model = RandomForestClassifier(100, n_jobs=2, random_state=0).fit(np.concatenate(x), np.concatenate(y))
    matrix = np.zeros((2, 2), np.int64)
    for image, mask in zip(read(root, "test", "images"), read(root, "test", "masks")):
        f = features(image)
        pred = model.predict(f.reshape(-1, f.shape[-1])).reshape(mask.shape)
        matrix += confusion((mask > 0).astype(int), pred, 2)
    return confusion_scores(matrix, ["0", "255"]), time.perf_counter() - start


def row(method: str, scores: dict, seconds: float) -> str:
    membrane, interior = scores["per_class"]["0"], scores["per_class"]["255"]
    return (
        f"| {method} | {membrane['iou']:.3f} | {membrane['dice']:.3f} | {interior['iou']:.3f} | "
        f"{scores['pixel_accuracy']:.3f} | {seconds:.0f} s |"
    )


def main() -> None:
    root = prepare()
    metrics = train_segment(HERE / "recipes" / "isbi2012_unet.yaml", root, CACHE / "isbi2012_run")
    rf, rf_s = forest(root)
    lines = [
        header(command_line()),
        "| method | membrane IoU | membrane Dice | interior IoU | pixel accuracy | time |",
        "| --- | --- | --- | --- | --- | --- |",
        row(
            f"2D U-Net ({metrics['parameters']:,} parameters, `recipes/isbi2012_unet.yaml`)",
            metrics["test"],
            metrics["wall_time_s"],
        ),
        row("filter bank + random forest (scikit-image, scikit-learn)", rf, rf_s),
        "",
        "Scored on slices 20-24 (trained on 00-19). U-Net time = training + test prediction on 2 CPU cores; forest time = "
        "features, fit and prediction. peer-baselines.md reports membrane IoU 0.554 / accuracy 0.895 for a forest from "
        "sparse labels on slices 25-29, which are not in the shared data, so it is not the same exam.",
    ]
    write_section("isbi2012", "ISBI 2012 EM membranes (2D semantic, CPU)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
