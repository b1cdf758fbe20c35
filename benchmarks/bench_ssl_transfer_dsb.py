"""DSB2018 nuclei with 10 % of the labels: the U-Net from scratch against the same U-Net whose encoder was first
pre-trained without labels (SimCLR on patches of all training images).

The question a user with few annotations asks: does pre-training on the unlabelled images pay off? Both segment runs
use the recipe of bench_dsb2018.py (``recipes/dsb2018_unet.yaml``) on the same seeded, modality-stratified 10 % of the
labelled training images, for the same minutes, and are scored on the 50 test images as bench_dsb2018.py scores them;
the pre-training builds its U-Net encoder from the same recipe's ``model_args`` so ``--init-from`` finds every encoder
tensor (the run log's "initialised N of M tensors" line is quoted in the section). Each run keeps its folder under
``.cache/ssl_dsb2018/``; finished runs are not redone (delete the folder to redo one).

    python benchmarks/bench_ssl_transfer_dsb.py --pretrain-minutes 15 --minutes 10
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

from bench_dsb2018 import describe
from common import CACHE, HERE, SHARED, command_line, header, run, write_section

RUNS = CACHE / "ssl_dsb2018"


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.unlink(missing_ok=True)
    link_path.symlink_to(target.resolve())


def labelled_subset(shared: Path, fraction: float) -> tuple[Path, int, int]:
    """train/ with a seeded, modality-stratified ``fraction`` of the training images (symlinks to images/ and masks/)
    and test/ as it is; returns the folder, the number of training images kept and of all."""
    from deepscope.tasks.ssl.probe import stratified_indices

    with open(shared / "train" / "index.csv") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["image_id"])
    _, modality = np.unique([r["modality"] for r in rows], return_inverse=True)
    keep = [rows[i]["image_id"] for i in stratified_indices(modality, round(fraction * len(rows)), 0)]
    target = RUNS / f"dsb2018-labels{fraction:g}"
    for old in (target / "train").glob("*/*"):
        old.unlink()
    for name in keep:
        link(shared / "train" / "images" / f"{name}.png", target / "train" / "images" / f"{name}.png")
        link(shared / "train" / "masks" / f"{name}.tif", target / "train" / "masks" / f"{name}.tif")
    link(shared / "test", target / "test")
    return target, len(keep), len(rows)


def deepscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepscope", *args]


def log_of(out: Path) -> Path:
    """The log beside a run folder (not ``with_suffix``: "0.5min" has a dot)."""
    return out.parent / f"{out.name}.log"


def train(cmd: list[str], out: Path) -> None:
    """Run a training command into a fresh ``out`` (an unfinished earlier attempt is removed)."""
    shutil.rmtree(out, ignore_errors=True)
    run(cmd, log_of(out))


def pretrain(shared: Path, recipe: Path, out: Path, args: argparse.Namespace) -> None:
    """SimCLR on patches of every training image (labels unused), the encoder shaped by the recipe's ``model_args``."""
    model_args = yaml.safe_load(recipe.read_text()).get("model_args", {})
    sets = [f"patch_size={args.patch_size}", *(f"model_args.{k}={v}" for k, v in model_args.items()), *args.ssl_set]
    cmd = deepscope(
        "train",
        "ssl",
        "--method",
        "simclr",
        "--model",
        "unet",
        "--data",
        str(shared / "train"),
        "--max-minutes",
        f"{args.pretrain_minutes:g}",
        "--out",
        str(out),
        "--device",
        args.device,
        *(["--epochs", str(args.pretrain_epochs)] if args.pretrain_epochs else []),
        *(["--batch-size", str(args.pretrain_batch_size)] if args.pretrain_batch_size else []),
        *(a for s in sets for a in ("--set", s)),
    )
    train(cmd, out)


def segment(data: Path, recipe: Path, out: Path, args: argparse.Namespace, init: Path | None) -> None:
    cmd = deepscope(
        "train",
        "segment",
        "--config",
        str(recipe),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-minutes",
        f"{args.minutes:g}",
        "--device",
        args.device,
        *(["--init-from", str(init)] if init else []),
        *(a for s in args.segment_set for a in ("--set", s)),
    )
    train(cmd, out)


def init_note(out: Path) -> str:
    """The trainer's line saying which tensors ``--init-from`` took, from the run's log."""
    found = re.search(r"initialised \d+ of \d+ tensors[^\n]*", log_of(out).read_text())
    return found.group(0).replace(str(CACHE) + "/", ".cache/") if found else "no --init-from line in the log"


def describe_pretraining(out: Path) -> str:
    metrics = json.loads((out / "metrics.json").read_text())
    return (
        f"SimCLR pre-training, {metrics['epochs_completed']} epochs in {metrics['train_time_s'] / 60:.1f} min, "
        f"{metrics['precision']['dtype']}, stopped by {metrics['stopped'] or 'end of schedule'}"
    )


def gain(runs: dict[str, Path]) -> str:
    """What the pre-trained encoder changes on all test images, when both runs of this invocation are done."""
    if not all((out / "metrics.json").exists() for out in runs.values()):
        return ""
    test = {kind: json.loads((out / "metrics.json").read_text())["test"] for kind, out in runs.items()}
    at = {kind: t["thresholds"]["0.5"]["score"] for kind, t in test.items()}
    mean = {kind: t["mean_score"] for kind, t in test.items()}
    return (
        f"Self-supervised encoder vs scratch (all test images): score@0.5 {at['ssl']:.3f} vs {at['scratch']:.3f} "
        f"(**{at['ssl'] - at['scratch']:+.3f}**), mean score {mean['ssl']:.3f} vs {mean['scratch']:.3f} "
        f"({mean['ssl'] - mean['scratch']:+.3f})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-minutes", type=float, default=15.0, help="wall budget of the SimCLR pre-training")
    parser.add_argument("--pretrain-epochs", type=int, help="length of its schedule (default: train ssl's)")
    parser.add_argument("--pretrain-batch-size", type=int, help="its batch size (default: train ssl's)")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall budget of each segment run")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the labelled training images used")
    parser.add_argument("--patch-size", type=int, default=128, help="side of the pre-training patches")
    parser.add_argument("--ssl-set", action="append", default=[], metavar="KEY=VALUE", help="more --set for train ssl")
    parser.add_argument(
        "--segment-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more --set for both segment runs (e.g. epochs=2, so the schedule ends within --minutes)",
    )
    parser.add_argument("--recipe", default=str(HERE / "recipes" / "dsb2018_unet.yaml"))
    parser.add_argument("--data", default=str(SHARED / "dsb2018"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    shared, recipe = Path(args.data), Path(args.recipe)
    subset, n_train, n_all = labelled_subset(shared, args.fraction)
    pre = RUNS / f"pretrain-simclr-{args.pretrain_minutes:g}min"
    runs = {
        "scratch": RUNS / f"scratch-labels{args.fraction:g}-{args.minutes:g}min",
        "ssl": RUNS / f"simclr{args.pretrain_minutes:g}min-labels{args.fraction:g}-{args.minutes:g}min",
    }
    if not (pre / "best.pt").exists():
        pretrain(shared, recipe, pre, args)
    for kind, out in runs.items():
        if (out / "metrics.json").exists():
            print(f"{out} is done, kept (delete it to redo)")
            continue
        segment(subset, recipe, out, args, pre / "best.pt" if kind == "ssl" else None)
    with open(shared / "test" / "index.csv") as handle:
        fluo = {r["image_id"] for r in csv.DictReader(handle) if r["modality"] == "fluorescence_gray"}
    finished = sorted(p for p in RUNS.iterdir() if (p / "metrics.json").exists() and not p.name.startswith("pretrain-"))
    lines = [
        header(command_line()),
        (
            f"Both U-Nets train with `{recipe.name}` (`deepscope train segment --config RECIPE --max-minutes M`) on the same "
            f"{n_train} training images ({args.fraction:.0%} of `train/`, seeded, stratified by modality, 5% of them carved "
            "for validation) and are scored on `test/` (50 images, 41 fluorescence) as in the DSB2018 section. "
            "`simclr*` runs start with `--init-from` the encoder of `deepscope train ssl --method simclr --model unet` "
            f"on {args.patch_size}x{args.patch_size} patches of all {n_all} `train/` images (no labels), same `model_args`; "
            "`scratch*` runs start from random weights."
        ),
        "",
        "| run | test images | n | score@0.5 | F1@0.5 | score@0.75 | score@0.9 | mean score 0.5-0.9 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for folder in finished:
        lines += describe(folder, shared, fluo)
    lines.append("")
    for pretrained in (p for p in RUNS.glob("pretrain-*") if (p / "metrics.json").exists()):
        lines.append(f"- `{pretrained.name}`: {describe_pretraining(pretrained)}")
    for folder in finished:
        if folder.name.startswith("simclr"):
            lines.append(f"- `{folder.name}`: {init_note(folder)}")
    lines += ["", gain(runs)]
    write_section(
        "ssl_dsb2018", "DSB2018 with few labels: U-Net from scratch vs from a self-supervised encoder", "\n".join(lines)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
