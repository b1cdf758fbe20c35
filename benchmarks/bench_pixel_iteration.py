"""Retraining after new labels: ``deepscope pixel train`` on a 1024x1024 image, first run and rerun with more strokes.

The image is a 2x2 mosaic of ISBI 2012 EM slices 00-03; scribbles (0.1 %, then 0.2 % with new strokes) are sampled
from its dense labels. The rerun finds the image's features in the run's cache, so it pays only for reading the
labelled pixels, fitting the forest and predicting the image for the report. Times are whole CLI processes
(including Python start-up and imports), on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import tifffile
from PIL import Image

from common import CACHE, SHARED, command_line, header, write_section
from deepscope.data.scribbles import dense_classes, sample_scribbles


def mosaic(folder: str) -> np.ndarray:
    tiles = [np.asarray(Image.open(SHARED / "isbi2012_em" / folder / f"{i:02d}.png")) for i in range(4)]
    return np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])


def train(root, run) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [
            "deepscope",
            "pixel",
            "train",
            "--images",
            str(root / "images"),
            "--labels",
            str(root / "labels"),
            "--out",
            str(run),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    root = CACHE / "pixel" / "iteration"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "images" / "mosaic.tif", mosaic("images"))
    classes = dense_classes(mosaic("labels"))
    run = root / "run"
    for path in run.glob("feature_cache/*.npy"):
        path.unlink()
    rows = []
    for step, (fraction, seed) in enumerate(((0.001, 0), (0.002, 1))):
        tifffile.imwrite(
            root / "labels" / "mosaic.tif", sample_scribbles(classes, fraction, rng=np.random.default_rng(seed))
        )
        metrics, wall = train(root, run)
        rows.append(
            f"| {'first run' if step == 0 else 'rerun, new strokes'} | {metrics['labelled_pixels']:,} | "
            f"{'cache' if metrics['features_from_cache'] else 'computed'}: {metrics['feature_s']:.2f} s | "
            f"{metrics['fit_s']:.2f} s | {metrics['predict_s']:.2f} s | {wall:.1f} s |"
        )
    lines = [
        header(command_line()),
        "| run | labelled pixels | features (49, ilastik's set) | forest fit | predict 1024x1024 | whole command |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    write_section("pixel-iteration", "Retraining a pixel classifier after new labels (CPU, 2 cores)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
