"""DSB2018 nuclei: train a U-Net (foreground + boundaries, watershed) on train/, score instances on test/.

Scores are the DSB/StarDist score TP / (TP + FP + FN) summed over the data set, at IoU 0.5 to 0.9, for all test
images and for the fluorescence images alone (``modality`` in test/index.csv). Training goes through the CLI, so the
figures are what a user gets from ``deepscope train segment``. Each (recipe, time budget) run keeps its folder under
``.cache/dsb2018/``; the RESULTS.md section lists every run found there. ``--rescore`` re-evaluates a finished run's
best checkpoint with the current prediction and post-processing code instead of training again.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from common import CACHE, HERE, SHARED, command_line, header, run, write_section
from deepscope.metrics.instance import summarize
from deepscope.tasks.segment.predict import evaluate_checkpoint

RUNS = CACHE / "dsb2018"


def subset_scores(test: dict, names: set[str]) -> dict:
    return summarize([image for image in test["per_image"] if image["name"] in names])


def row(run: str, label: str, report: dict, images: int) -> str:
    at = report["thresholds"]
    return (
        f"| {run} | {label} | {images} | {at['0.5']['score']:.3f} | {at['0.5']['f1']:.3f} | {at['0.75']['score']:.3f} | "
        f"{at['0.9']['score']:.3f} | {report['mean_score']:.3f} |"
    )


def describe(out: Path, data: Path, fluo: set[str]) -> list[str]:
    metrics = json.loads((out / "metrics.json").read_text())
    test = (
        json.loads((out / "test_scores.json").read_text()) if (out / "test_scores.json").exists() else metrics["test"]
    )
    # runs from before the precision was recorded ran bf16
    precision = metrics.get("precision", {}).get("dtype", "bf16")
    name = (
        f"`{out.name}`: {metrics['parameters']:,} parameters, {metrics['epochs_completed']} epochs, "
        f"{metrics['train_time_s'] / 60:.1f} min, {precision}"
    )
    return [
        row(name, "all", test, test["images"]),
        row(name, "fluorescence only", subset_scores(test, fluo), len(fluo & {i["name"] for i in test["per_image"]})),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=str(HERE / "recipes" / "dsb2018_unet.yaml"))
    parser.add_argument("--data", default=str(SHARED / "dsb2018"))
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--rescore", action="store_true", help="re-evaluate the run's best.pt instead of training")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from the runs on disk")
    args = parser.parse_args()
    data = Path(args.data)
    out = RUNS / f"{Path(args.recipe).stem}-{args.max_minutes:g}min"
    if args.rescore:
        result = evaluate_checkpoint(out / "best.pt", data, "test", torch.device("cpu"))
        (out / "test_scores.json").write_text(json.dumps(result))
    elif not args.render_only:
        if (out / "last.pt").exists():
            raise SystemExit(f"{out} holds a previous run; remove it first")
        cmd = [
            sys.executable,
            "-m",
            "deepscope",
            "train",
            "segment",
            "--config",
            args.recipe,
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-minutes",
            str(args.max_minutes),
        ]
        run(cmd, out.with_suffix(".log"))
    with open(data / "test" / "index.csv") as handle:
        fluo = {r["image_id"] for r in csv.DictReader(handle) if r["modality"] == "fluorescence_gray"}
    lines = [
        header(command_line()),
        "Training through `deepscope train segment --config RECIPE --max-minutes M` on DSB2018 `train/` (664 images, 5% "
        "carved for validation, best epoch by validation mean score); scored on `test/` (50 images, 41 fluorescence). "
        "Times are training incl. per-epoch validation on 2 CPU cores; precision per run (`--amp auto`: bf16 on CPUs with "
        "native bf16, float32 elsewhere) in the run column.",
        "",
        "| run | test images | n | score@0.5 | F1@0.5 | score@0.75 | score@0.9 | mean score 0.5-0.9 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for folder in sorted(p for p in RUNS.iterdir() if (p / "metrics.json").exists()):
        lines += describe(folder, data, fluo)
    lines += [
        "",
        "Score = TP / (TP + FP + FN) counted over the data set (StarDist `matching_dataset`, by_image=False).",
        "References, not the same exam (another split, fluorescence only, GPU training): StarDist paper table 1 at IoU 0.5,",
        "U-Net 2-class 0.674, U-Net 3-class 0.806, Mask R-CNN 0.832, StarDist 0.864. Peer on this machine",
        "(peer-baselines.md, not re-run here): torch-em UNet2d with boundary targets, 15 min on CPU, 0.287 at IoU 0.5",
        "(0.150 at 0.7) on 15 test images.",
    ]
    write_section("dsb2018", "DSB2018 nuclei instance segmentation (2D U-Net, CPU)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
