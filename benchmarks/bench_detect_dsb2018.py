"""DSB2018 nuclei as boxes: CenterNet trained from scratch on the CPU at native scale, then whole-image against tiled prediction.

Part ``train``: CenterNet (tiny backbone, stride 4) learns every nucleus of ``dsb2018/train`` as a box for a fixed wall
time; the number of epochs is set from a short calibration run so the cosine schedule ends near the budget. The model
works at native scale (``image_size=0``: no resizing, in training or prediction), since a nucleus has a physical size;
scale augmentation comes from ``augment.scale_jitter`` and random crops (which also bound the memory of the large
images), with vertical flips and quarter turns because microscopy has no "up". The 50 test images are scored as they
are, twice: at COCO's 100 detections per image and at 500, since several test images hold over 100 nuclei and
COCO's limit caps their recall whatever the model does.

Part ``tiling``: at native scale a tile and the whole image are seen at the same scale, so the training checkpoint
itself predicts both. A 4096 x 4096 mosaic is packed from the original test images (no resizing; portrait ones
transposed, boxes with them) and predicted whole and in 512 px tiles; the 50 test images are predicted whole and in
256 px tiles. GroupNorm normalises over a whole feature map, so a tile's statistics differ slightly from the whole
image's and small differences between the two are expected. Each ``deepscope predict`` runs in its own process, whose
peak resident memory (``os.wait4``) and wall time are recorded.

Everything lives under ``.cache/dsb2018_detect/``; a finished step (its ``bench.json``) is not redone, delete it to
redo it. The RESULTS.md sections list every finished run found there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import CACHE, SHARED, command_line, header, run, write_section

MAX_DETECTIONS = 500  # the test set's most crowded image holds 329 nuclei
TRAIN_SETTINGS = [
    "model_args.backbone=tiny",
    "model_args.fpn_channels=64",
    "image_size=0",
    "val_fraction=0",
    f"inference.max_detections={MAX_DETECTIONS}",
    "augment.scale_jitter=[0.75,1.33]",
    "augment.crop=0.5",
    "augment.vflip=0.5",
    "augment.rot90=true",
]
# the test images (161 to 696 px a side) in up to 3 x 3 tiles; a 256 x 256 one is one tile
TEST_TILE, TEST_OVERLAP = (256, 64)
MOSAIC_TILE, MOSAIC_OVERLAP = 512, 64
WORK = CACHE / "dsb2018_detect"


def deepscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepscope", *args]


def shown(cmd: list[str]) -> str:
    """A command as the table shows it: ``deepscope ...`` with paths relative to ``benchmarks/``."""
    return (
        shlex.join(["deepscope", *cmd[3:]])
        .replace(str(CACHE) + "/", ".cache/")
        .replace(str(SHARED) + "/", "shared/data/")
    )


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---- part 1: training and the test scores ----------------------------------------------------------------------------


def train_command(data: Path, out: Path, minutes: float, epochs: int) -> list[str]:
    sets = [*TRAIN_SETTINGS, f"epochs={epochs}"]
    return deepscope(
        "train",
        "detect",
        "--data",
        str(data),
        "--model",
        "centernet",
        "--max-minutes",
        f"{minutes:g}",
        "--out",
        str(out),
        *(arg for s in sets for arg in ("--set", s)),
    )


def evaluate_command(checkpoint: Path, data: Path, max_detections: int, out: Path) -> list[str]:
    return deepscope(
        "evaluate",
        str(checkpoint),
        "--data",
        str(data),
        "--split",
        "test",
        "--max-detections",
        str(max_detections),
        "--out",
        str(out),
    )


def calibrate(data: Path, out: Path, minutes: float) -> float:
    """Training images per second on this machine, from a run stopped by its time limit: a fixed epoch count would
    end the cosine schedule far before or after the budget depending on the processor."""
    if not (out / "metrics.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        run(train_command(data, out, minutes, 1000), out.parent / f"{out.name}.log")
    return float(read_json(out / "metrics.json")["history"][-1]["images_per_s"])


def epochs_for(minutes: float, images_per_s: float, train_images: int) -> int:
    """Whole epochs that fit in 95% of the budget (the rest: reading the data set before the first step)."""
    return max(1, math.floor(0.95 * minutes * 60 * images_per_s / train_images))


def train_and_score(data: Path, out: Path, minutes: float, epochs: int | None) -> dict[str, Any]:
    """Train (epochs from a calibration run unless given), then score best.pt on the test split at 500 and 100."""
    train_images = len(list((data / "train" / "images").iterdir()))
    rate = None
    if epochs is None:
        rate = calibrate(data, out.parent / f"{out.name}-calibration", max(0.05, min(1.0, minutes / 10)))
        epochs = epochs_for(minutes, rate, train_images)
    command = train_command(data, out, minutes, epochs)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run folder: the trainer would otherwise find an older run's files
    run(command, out.parent / f"{out.name}.log")
    metrics = read_json(out / "metrics.json")
    scores = {}
    for limit in (MAX_DETECTIONS, 100):
        run(
            evaluate_command(out / "best.pt", data, limit, out / f"test_maxdets{limit}.json"),
            out / f"evaluate{limit}.log",
        )
        scores[str(limit)] = read_json(out / f"test_maxdets{limit}.json")
    return {
        "minutes": minutes,
        "epochs_set": epochs,
        "epochs": metrics["epochs_completed"],
        "train_min": metrics["train_time_s"] / 60,
        "calibrated_images_per_s": rate,
        "images_per_s": metrics["history"][-1]["images_per_s"],
        "precision": metrics["precision"]["dtype"],
        "train_images": train_images,
        "command": shown(command),
        "evaluate": shown(evaluate_command(out / "best.pt", data, MAX_DETECTIONS, out / "test_maxdets500.json")),
        "scores": scores,
    }


# ---- part 2: the mosaic, whole and tiled prediction -----------------------------------------------------------------


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)


def write_truth(path: Path, items: list[Any]) -> None:
    from deepscope.metrics.coco_files import det_items_to_coco

    path.write_text(json.dumps(det_items_to_coco(["object"], items)))


def truth_item(name: str, path: Path, image: np.ndarray, boxes: np.ndarray, image_id: int) -> Any:
    from deepscope.data.detection.types import DetItem

    return DetItem(
        name,
        path,
        image.shape[1],
        image.shape[0],
        boxes.astype(np.float32),
        np.ones(len(boxes), np.int64),
        np.zeros(len(boxes), bool),
        image_id=image_id,
    )


def test_images(data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, boxes) of every test image as it is, for the mosaic (masks are not needed: boxes are what is scored)."""
    from deepscope.data.detection.annotations import load_detection_data
    from deepscope.data.io.images import read_image

    (items,) = load_detection_data(data / "test").splits.values()
    return [(read_image(item.path), item.boxes[~item.crowd]) for item in items]


def shelf_pack(sizes: list[tuple[int, int]], side: int) -> list[tuple[int, int, int]]:
    """(image index, y, x) of images packed in rows into a side x side square, the images taken in turn and again
    until none fits: each row takes the next images that fit in its width, skipping those that do not, and is as tall
    as its tallest image; packing stops at a row that takes nothing. Written here because the layout only needs to
    fill the square with whole images; a bin-packing library would optimise what does not matter."""
    placed: list[tuple[int, int, int]] = []
    turn, y = 0, 0
    while True:
        x, row_height, misses = 0, 0, 0
        while misses < len(sizes):
            index = turn % len(sizes)
            turn += 1
            height, width = sizes[index]
            if x + width <= side and y + height <= side:
                placed.append((index, y, x))
                x, row_height, misses = x + width, max(row_height, height), 0
            else:
                misses += 1
        if row_height == 0:
            return placed
        y += row_height


def build_mosaic(images: list[tuple[np.ndarray, np.ndarray]], side: int, folder: Path) -> dict[str, Any]:
    """``folder/mosaic<side>.png`` (black between the images) and ``folder/truth.json`` with every box shifted. Portrait
    images are transposed (mirrored on the diagonal, boxes with them) and all are packed tallest first, so that images
    of about the same height share a row and the rows leave little black below their images (86% of 4096 x 4096
    filled, against 69% in file order)."""
    images = [
        (image.transpose(1, 0, 2), boxes[:, [1, 0, 3, 2]]) if image.shape[0] > image.shape[1] else (image, boxes)
        for image, boxes in images
    ]
    images.sort(key=lambda pair: -pair[0].shape[0])
    placed = shelf_pack([image.shape[:2] for image, _ in images], side)
    mosaic = np.zeros((side, side, images[0][0].shape[2]), np.uint8)
    boxes = []
    for index, y, x in placed:
        image, found = images[index]
        mosaic[y : y + image.shape[0], x : x + image.shape[1]] = image
        boxes.append(found + np.array([x, y, x, y], np.float32))
    path = folder / f"mosaic{side}.png"
    write_png(path, mosaic)
    all_boxes = np.concatenate(boxes)
    write_truth(folder / "truth.json", [truth_item(path.name, path, mosaic, all_boxes, 1)])
    return {
        "side": side,
        "images_placed": len(placed),
        "objects": len(all_boxes),
        "filled": float(sum(images[i][0].shape[0] * images[i][0].shape[1] for i, _, _ in placed) / side**2),
    }


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of a command run in its own process. ``os.wait4`` gives that
    process's own peak; RUSAGE_CHILDREN would give the largest of all children so far."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"command failed ({process.returncode}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def predict_command(
    checkpoint: Path, inputs: Path, out: Path, max_detections: int, tile: int | None, overlap: int
) -> list[str]:
    tiling = ["--tile", str(tile), str(tile), "--overlap", str(overlap)] if tile else []
    return deepscope(
        "predict", str(checkpoint), str(inputs), "--out", str(out), "--max-detections", str(max_detections), *tiling
    )


def score_command(pred: Path, truth: Path, max_detections: int) -> list[str]:
    return deepscope(
        "evaluate",
        "detect",
        "--pred",
        str(pred),
        "--truth",
        str(truth),
        "--max-detections",
        str(max_detections),
        "--out",
        str(pred.with_name(pred.stem + "_scores.json")),
    )


def tiling_commands(
    checkpoint: Path, inputs: Path, truth: Path, folder: Path, tile: int, overlap: int, max_detections: int
) -> dict[str, list[str]]:
    """Whole and tiled prediction of ``inputs`` by the same checkpoint, and their scoring against ``truth``."""
    commands = {}
    for mode, tiling in (("whole", None), ("tiled", tile)):
        out = folder / f"{mode}.json"
        commands[f"{mode} predict"] = predict_command(checkpoint, inputs, out, max_detections, tiling, overlap)
        commands[f"{mode} score"] = score_command(out, truth, max_detections)
    return commands


def whole_and_tiled(folder: Path, commands: dict[str, list[str]]) -> dict[str, Any]:
    result = {}
    for mode in ("whole", "tiled"):
        wall, peak = run_measured(commands[f"{mode} predict"], folder / f"{mode}_predict.log")
        run(commands[f"{mode} score"], folder / f"{mode}_score.log")
        scores = read_json(folder / f"{mode}_scores.json")
        detections = len(read_json(folder / f"{mode}.json")["annotations"])
        result[mode] = {
            "wall_s": wall,
            "peak_rss_mib": peak,
            "detections": detections,
            "scores": scores,
            "command": shown(commands[f"{mode} predict"]),
        }
    return result


def tiling_plan(
    data: Path, run_dir: Path, mosaic_side: int, mosaic_limit: int
) -> dict[str, tuple[Path, dict[str, list[str]]]]:
    """The folder (predictions and scores) and the commands of both comparisons: the test images are read and scored
    where they are, the mosaic and its truth are written into the folder."""
    checkpoint = run_dir / "best.pt"
    folder = run_dir / f"tiling-mosaic{mosaic_side}"
    test, mosaic = folder / "test", folder / "mosaic"
    return {
        "test": (
            test,
            tiling_commands(
                checkpoint, data / "test" / "images", data / "test", test, TEST_TILE, TEST_OVERLAP, MAX_DETECTIONS
            ),
        ),
        "mosaic": (
            mosaic,
            tiling_commands(
                checkpoint,
                mosaic / f"mosaic{mosaic_side}.png",
                mosaic / "truth.json",
                mosaic,
                MOSAIC_TILE,
                MOSAIC_OVERLAP,
                mosaic_limit,
            ),
        ),
    }


def tiling(data: Path, run_dir: Path, mosaic_side: int) -> dict[str, Any]:
    """Whole against tiled prediction on the test images and on a mosaic of them, all at native scale."""
    checkpoint = run_dir / "best.pt"
    if not checkpoint.exists():
        raise SystemExit(f"{checkpoint}: not found; run the training part first (--only train, same --minutes)")
    images = test_images(data)
    mosaic_folder = tiling_plan(data, run_dir, mosaic_side, 0)["mosaic"][0]
    mosaic = build_mosaic(images, mosaic_side, mosaic_folder)
    limit = math.ceil(1.5 * mosaic["objects"] / 1000) * 1000  # above the mosaic's object count
    plan = tiling_plan(data, run_dir, mosaic_side, limit)
    return {
        "run": run_dir.name,
        "mosaic": {**mosaic, "max_detections": limit, **whole_and_tiled(*plan["mosaic"])},
        "test": {"images": len(images), "max_detections": MAX_DETECTIONS, **whole_and_tiled(*plan["test"])},
    }


# ---- RESULTS.md ------------------------------------------------------------------------------------------------------


def test_counts(data: Path) -> list[int]:
    """Nuclei per test image, counted from the instance masks (one box each)."""
    from deepscope.data.detection.annotations import load_detection_data

    (items,) = load_detection_data(data / "test").splits.values()
    return [len(item.boxes) for item in items]


def scores_text(s: dict[str, Any]) -> str:
    return f"{s['map']:.3f} | {s['map_50']:.3f} | {s['map_75']:.3f}"


def render_training(data: Path, benches: list[dict[str, Any]]) -> str:
    counts = test_counts(data)
    rows = [
        f"| centernet (tiny, fpn 64) | native | {b['precision']} | {b['train_min']:.1f} | {b['epochs']} | "
        f"{b['images_per_s']:.2f} | {limit} | {scores_text(b['scores'][limit])} | `{b['command']}` |"
        for b in benches
        for limit in (str(MAX_DETECTIONS), "100")
    ]
    return "\n".join(
        [
            header(command_line()),
            (
                f"Data: `{data.name}/train` ({benches[0]['train_images']} images, all used for training, no validation) "
                f"and `{data.name}/test` ({len(counts)} images, {sum(counts):,} nuclei, {max(counts)} in the most crowded image, "
                f"{sum(c > 100 for c in counts)} images over 100), every instance-mask label a box. CenterNet from random weights "
                "at native scale (`image_size=0`: no resizing in training or prediction, a nucleus keeps its pixel size); scale "
                "jitter 0.75-1.33, random crops, horizontal and vertical flips and quarter turns (microscopy has no up); epochs "
                "set from a calibration run so the cosine schedule ends near the time limit. Box mAP of best.pt (the last "
                "weights: no validation) on the test images as they are, by `deepscope evaluate --max-detections N` (COCO mAP; "
                "N detections per image kept and counted): COCO's "
                f"100 caps recall on the crowded images, {MAX_DETECTIONS} does not. Prediction runs in float32."
            ),
            "",
            (
                "| model | size | precision | train min | epochs | images/s | max dets | box mAP@[.5:.95] | mAP@0.5 | mAP@0.75 "
                "| command |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )


def tiling_row(what: str, mode: str, r: dict[str, Any], tile: str) -> str:
    return (
        f"| {what} | {mode} | {tile} | {r['detections']:,} | {r['peak_rss_mib']:,.0f} | {r['wall_s']:.1f} | "
        f"{scores_text(r['scores'])} | `{r['command']}` |"
    )


def render_tiling(benches: list[dict[str, Any]], trained: dict[str, dict[str, Any]]) -> str:
    rows, references = [], []
    for b in benches:
        if b["run"] in trained:
            references.append(
                f"{b['run']} {scores_text(trained[b['run']]['scores'][str(MAX_DETECTIONS)]).replace(' |', ',')}"
            )
        m, t = b["mosaic"], b["test"]
        what = (
            f"{b['run']}: {m['side']}x{m['side']} mosaic of {m['images_placed']} test images ({m['filled']:.0%} filled), "
            f"{m['objects']:,} nuclei, max dets {m['max_detections']:,}"
        )
        rows += [
            tiling_row(what, "whole", m["whole"], "-"),
            tiling_row(what, "tiled", m["tiled"], f"{MOSAIC_TILE}, overlap {MOSAIC_OVERLAP}"),
        ]
        what = f"{b['run']}: {t['images']} test images, max dets {t['max_detections']}"
        rows += [
            tiling_row(what, "whole", t["whole"], "-"),
            tiling_row(what, "tiled", t["tiled"], f"{TEST_TILE}, overlap {TEST_OVERLAP}"),
        ]
    reference = (
        f"For comparison, `deepscope evaluate` of the same checkpoints on the test split, max dets {MAX_DETECTIONS}, "
        f"mAP@[.5:.95], @0.5, @0.75: {'; '.join(references)}."
        if references
        else ""
    )
    return "\n".join(
        [
            header(command_line()),
            (
                "The checkpoint of the training section above, predicting whole images and tiles. It works at native scale, so "
                "a tile and the whole image are seen at the same scale and the same checkpoint predicts both; GroupNorm "
                "normalises over a whole feature map, so a tile's statistics differ slightly from the whole image's and small "
                "differences between the two are expected. The mosaic is packed from the original test images, not resized, in "
                "rows (whole images, portrait ones transposed, tallest first and again in turn until the square is full, black "
                "at the row ends; truth boxes moved with them, written as COCO JSON); the test images are predicted where they "
                "are and scored against their instance masks (`--truth` the test folder). "
                f"Tiles of {MOSAIC_TILE} px (mosaic) and {TEST_TILE} px (test images; "
                "a side shorter than the tile is not cut). Each `deepscope predict` runs in its own process: peak RSS is that "
                "process's (torch and the model included), wall time includes starting it and writing the JSON. Scores: "
                "`deepscope evaluate detect --max-detections` with a limit above the object count."
            ),
            "",
            "| input | prediction | tile | detections | peak RSS MiB | wall s | box mAP@[.5:.95] | mAP@0.5 | mAP@0.75 | command |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            reference,
        ]
    )


# ---- main ------------------------------------------------------------------------------------------------------------


def dry_run(data: Path, run_dir: Path, minutes: float, epochs: int | None, mosaic_side: int, only: str | None) -> None:
    """The commands, with the epochs of the calibration (or ``--epochs``) shown as a placeholder when not yet known."""
    if only != "tiling":
        if epochs is None:
            calibration = run_dir.parent / f"{run_dir.name}-calibration"
            print(
                f"# calibration\n{shlex.join(train_command(data, calibration, max(0.05, min(1.0, minutes / 10)), 1000))}"
            )
        train = shlex.join(train_command(data, run_dir, minutes, epochs or 0))
        print(f"# train\n{train.replace('epochs=0', 'epochs=<calibrated>')}")
        for limit in (MAX_DETECTIONS, 100):
            scores = run_dir / f"test_maxdets{limit}.json"
            print(
                f"# evaluate, max dets {limit}\n{shlex.join(evaluate_command(run_dir / 'best.pt', data, limit, scores))}"
            )
    if only != "train":
        print(
            f"# tiling: the {mosaic_side} px mosaic of the original test images and its truth written into "
            f"{run_dir / f'tiling-mosaic{mosaic_side}' / 'mosaic'}"
        )
        for name, (_, commands) in tiling_plan(data, run_dir, mosaic_side, 0).items():
            for step, cmd in commands.items():
                print(
                    f"# {name} {step}\n{shlex.join(cmd)}".replace(
                        "--max-detections 0", "--max-detections <1.5 x objects>"
                    )
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=str(SHARED / "dsb2018"), help="DSB2018 folder with train/ and test/ (images/ + masks/)"
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time")
    parser.add_argument(
        "--epochs", type=int, help="epochs to train (default: from a calibration run sized to --minutes)"
    )
    parser.add_argument("--mosaic", type=int, default=4096, help="side of the square mosaic of test images")
    parser.add_argument("--only", choices=["train", "tiling"])
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    data = Path(args.data)
    run_dir = WORK / f"centernet-tiny-native-{args.minutes:g}min"
    if args.dry_run:
        dry_run(data, run_dir, args.minutes, args.epochs, args.mosaic, args.only)
        return
    steps = {
        "train": (run_dir / "bench.json", lambda: train_and_score(data, run_dir, args.minutes, args.epochs)),
        "tiling": (run_dir / f"tiling-mosaic{args.mosaic}" / "bench.json", lambda: tiling(data, run_dir, args.mosaic)),
    }
    for name, (done, step) in steps.items():
        if args.only not in (None, name):
            continue
        if done.exists():
            print(f"{done} exists, kept (delete it to redo)")
            continue
        result = step()
        done.write_text(json.dumps(result, indent=1))
    trained = {p.parent.name: read_json(p) for p in sorted(WORK.glob("*/bench.json"))}
    tiled = [read_json(p) for p in sorted(WORK.glob("*/tiling-mosaic*/bench.json"))]
    if trained and args.only != "tiling":
        text = render_training(data, list(trained.values()))
        write_section("dsb2018_detect", "DSB2018 nuclei as detection (CPU)", text)
        print(text)
    if tiled and args.only != "train":
        text = render_tiling(tiled, trained)
        write_section("dsb2018_tiled_detect", "Tiled detection inference (CPU)", text)
        print(text)


if __name__ == "__main__":
    main()
