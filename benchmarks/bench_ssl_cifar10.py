"""CIFAR-10 self-supervised pre-training at a fixed wall budget: deepscope's SimCLR and VICReg against SimCLR built from
lightly's pieces, with a supervised ResNet-18 and the same encoder at random initialisation as the bounds.

Every method trains the same ResNet-18 (``--width``) on the same training images for the same minutes; every encoder
is then judged by the same code, deepscope's probes (kNN, k=200, and logistic regression on 1 %, 10 % and 100 % of the
training labels, on the 10,000 test images): deepscope's runs report them in their metrics.json, lightly's encoder and
the random one go through ``probe_encoder`` with the same split, seed and standardisation. The supervised row is the
test accuracy of ``deepscope train classify`` trained on exactly the labelled images of each probe fraction, same budget
each. lightly lives in its own virtual environment under ``.cache/`` (``--system-site-packages``: it runs on the
installed torch), where ``lightly_simclr.py`` trains; deepscope's defaults of ``train ssl`` set lightly's temperature,
head, views and optimizer.

Each run keeps its folder under ``.cache/ssl_cifar10/`` with a ``bench.json``; finished runs are not redone (delete
the folder to redo one), and the RESULTS.md section lists every run found there (and keeps rows of other machines).

    python benchmarks/bench_ssl_cifar10.py --minutes 30 --width 16 [--methods simclr vicreg lightly supervised random]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import CACHE, HERE, SHARED, command_line, cpu_name, header, run, section_rows, write_section
from deepscope.engine.precision import cpu_description
from prepare_cifar10 import prepare

LIGHTLY = "lightly==1.6.0"
VENV = CACHE / "venv-lightly"
RUNS = CACHE / "ssl_cifar10"
FRACTIONS = (0.01, 0.1, 1.0)
METHODS = ("simclr", "vicreg", "lightly", "supervised", "random")
# lightly's DataLoader workers for the PIL views, by default. Measured on the 2-core CPU at width 16: the two views of an
# image cost 2.9 ms of one core, the training step on them 16 ms, so one worker overlaps all the views with training
# while 0 workers would serialise them (+15%) and a second worker has no core of its own left. A GPU needs more.
LIGHTLY_WORKERS = 1


# ---- lightly's environment ------------------------------------------------------------------------------------------


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> None:
    """The lightly environment, made once. lightly declares pytorch-lightning, hydra-core and tqdm for its trainer and
    CLI; the loss, transforms and heads used here import without them, so it goes in with ``--no-deps`` and pip never
    touches the installed torch (a CUDA build must not be swapped for a CPU wheel, or the reverse)."""
    if not venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
        subprocess.run([str(venv_python()), "-m", "pip", "install", "--quiet", "--no-deps", LIGHTLY], check=True)
    probe = (
        "import torch, lightly, lightly.loss, lightly.transforms, lightly.models.modules, deepscope; "
        "print(torch.__version__, torch.__file__, lightly.__version__)"
    )
    version, path, found = subprocess.run(
        [str(venv_python()), "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    if version != torch.__version__ or Path(path).resolve().is_relative_to(VENV.resolve()):
        raise SystemExit(
            f"{VENV}: torch {version} from {path}, not the installed torch {torch.__version__}; remove the venv"
        )
    if f"lightly=={found}" != LIGHTLY:
        raise SystemExit(f"{VENV}: lightly {found} installed, the benchmark pins {LIGHTLY}; remove the venv")


# ---- data -----------------------------------------------------------------------------------------------------------


def subset_npz(data: Path, n: int) -> Path:
    """A seeded, class-stratified sample of ``n`` training and ``n // 5`` test images, for quick trial runs."""
    from deepscope.tasks.ssl.probe import stratified_indices

    target = RUNS / f"cifar10-sub{n}.npz"
    if not target.exists():
        pack = dict(np.load(data))
        for split, size in (("train", n), ("test", max(n // 5, 10))):
            keep = stratified_indices(pack[f"y_{split}"], size, 0)
            pack[f"x_{split}"], pack[f"y_{split}"] = pack[f"x_{split}"][keep], pack[f"y_{split}"][keep]
        RUNS.mkdir(parents=True, exist_ok=True)
        np.savez(target, **pack)
    return target


def labelled_npz(data: Path, fraction: float, val_fraction: float) -> Path:
    """The training images whose labels the linear probe at ``fraction`` uses (same split and seed as ``train ssl``
    and ``probe_encoder``), with all test images: what a supervised network of that label budget learns from."""
    from deepscope.data.ssl.dataset import load_ssl_data
    from deepscope.tasks.ssl.probe import label_subset

    target = RUNS / f"{data.stem}-labels{fraction:g}.npz"
    if not target.exists():
        splits = load_ssl_data(data, val_fraction=val_fraction, seed=0).splits
        keep = label_subset(splits["train"].labels, fraction, 0)
        arrays = {"class_names": np.load(data)["class_names"]}
        for split, index in (("train", keep), ("test", np.arange(len(splits["test"])))):
            arrays[f"x_{split}"] = splits[split].images[torch.from_numpy(index)].permute(0, 2, 3, 1).numpy()
            arrays[f"y_{split}"] = splits[split].labels[index]
        np.savez(target, **arrays)
    return target


# ---- runs -----------------------------------------------------------------------------------------------------------


def deepscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepscope", *args]


def shown(cmd: list[str]) -> str:
    """A command as a user would type it, cache paths relative to benchmarks/."""
    start = 3 if cmd[1:3] == ["-m", "deepscope"] else 1
    name = "deepscope" if start == 3 else "python"
    return shlex.join([name, *cmd[start:]]).replace(str(CACHE) + "/", ".cache/").replace(str(HERE) + "/", "")


def mean_rate(history: list[dict[str, Any]]) -> float:
    return sum(h["images_per_s"] for h in history) / max(1, len(history))


def run_ssl(method: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = deepscope(
        "train",
        "ssl",
        "--method",
        method,
        "--data",
        str(data),
        "--model",
        "resnet18",
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--max-minutes",
        f"{args.minutes:g}",
        "--out",
        str(out / "run"),
        "--device",
        args.device,
        *(
            a
            for s in [
                f"model_args.width={args.width}",
                f"temperature={args.temperature:g}",
                "probe_fractions=[0.01,0.1,1]",
                "probe_random=false",
                *args.ssl_set,
            ]
            for a in ("--set", s)
        ),
    )
    shutil.rmtree(out / "run", ignore_errors=True)  # an unfinished earlier attempt (no bench.json)
    run(cmd, out / "run.log")
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    curve = [[h["epoch"], h["time_s"], h["val_knn_accuracy"]] for h in metrics["history"] if "val_knn_accuracy" in h]
    return {
        "tool": "deepscope",
        "precision": metrics["precision"]["dtype"],
        "epochs": metrics["epochs_completed"],
        "train_s": metrics["train_time_s"],
        "images_per_s": mean_rate(metrics["history"]),
        "knn": metrics["knn_accuracy"],
        "linear": {f"{f:g}": metrics[f"linear_accuracy@{f:g}"] for f in FRACTIONS},
        "knn_curve": curve,
        "command": shown(cmd),
    }


def lightly_command(data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """lightly_simclr.py with ``train ssl``'s defaults: the same views, temperature, head and optimizer."""
    from deepscope.data.ssl.views import view_config
    from deepscope.tasks.ssl.config import SSLConfig

    cfg, views = SSLConfig(method="simclr"), view_config("natural", {})
    opt = cfg.optim
    settings = {
        "data": data,
        "out": out,
        "width": args.width,
        "epochs": args.epochs,
        "batch-size": args.batch_size,
        "max-minutes": f"{args.minutes:g}",
        "val-fraction": cfg.val_fraction,
        "temperature": args.temperature,
        "projector": cfg.projector_widths(),
        "optimizer": opt.name,
        "lr": opt.lr,
        "momentum": opt.momentum,
        "nesterov": int(opt.nesterov),
        "weight-decay": opt.weight_decay,
        "schedule": opt.schedule,
        "warmup-fraction": opt.warmup_fraction,
        "crop-scale": views.crop_scale[0],
        "jitter": views.jitter,
        "jitter-prob": views.jitter_p,
        "grey-prob": views.grayscale_p,
        "flip-prob": 0.5 if views.flip else 0.0,
        "num-workers": args.lightly_workers,
        "device": args.device,
    }
    flags = [
        x
        for key, value in settings.items()
        for x in (f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)]))
    ]
    return [str(venv_python()), str(HERE / "lightly_simclr.py"), *flags]


def run_lightly(data: Path, out: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from deepscope.models.ssl import build_encoder
    from deepscope.tasks.ssl.task import probe_encoder

    ensure_venv()
    cmd = lightly_command(data, out, args)
    run(cmd, out / "run.log")
    summary = json.loads((out / "summary.json").read_text())
    encoder = build_encoder("resnet18", (3, 32, 32), width=args.width)
    encoder.load_state_dict(torch.load(out / "encoder.pt", map_location="cpu"))
    scores = probe_encoder(encoder, data, FRACTIONS, device, seed=0, mean=summary["mean"], std=summary["std"])
    return {
        "tool": f"{summary['tool']} (num_workers={summary['num_workers']})",
        "precision": summary["precision"]["dtype"],
        "epochs": summary["epochs_completed"],
        "train_s": summary["train_time_s"],
        "images_per_s": summary["images_per_s"],
        "knn": scores["knn_accuracy"],
        "linear": {f"{f:g}": scores[f"linear_accuracy@{f:g}"] for f in FRACTIONS},
        "command": shown(cmd),
    }


def run_random(data: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The encoder at deepscope's random initialisation (seed 0): the floor any pre-training must clear."""
    from deepscope.models.ssl import build_encoder
    from deepscope.tasks.ssl.task import probe_encoder

    torch.manual_seed(0)
    scores = probe_encoder(build_encoder("resnet18", (3, 32, 32), width=args.width), data, FRACTIONS, device, seed=0)
    return {
        "tool": "deepscope",
        "precision": "float32",
        "epochs": 0,
        "train_s": 0.0,
        "images_per_s": None,
        "knn": scores["knn_accuracy"],
        "linear": {f"{f:g}": scores[f"linear_accuracy@{f:g}"] for f in FRACTIONS},
        "command": "probe_encoder(build_encoder('resnet18', width=W)) after torch.manual_seed(0)",
    }


def run_supervised(data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``train classify`` on each probe fraction's labelled images for the same minutes; fraction f trains
    ``supervised_epochs / f`` epochs, so every fraction's schedule has about the same number of steps."""
    from deepscope.tasks.ssl.config import SSLConfig

    result: dict[str, Any] = {
        "tool": "deepscope",
        "knn": None,
        "linear": {},
        "epochs": [],
        "train_s": [],
        "images_per_s": [],
        "commands": [],
    }
    for fraction in args.supervised_fractions:
        labelled = labelled_npz(data, fraction, SSLConfig().val_fraction)
        folder = out / f"labels{fraction:g}"
        cmd = deepscope(
            "train",
            "classify",
            "--data",
            str(labelled),
            "--model",
            "resnet18",
            "--out",
            str(folder),
            "--epochs",
            str(round(args.supervised_epochs / fraction)),
            "--max-minutes",
            f"{args.minutes:g}",
            "--device",
            args.device,
            "--set",
            f"model_args.width={args.width}",
            "--set",
            "val_fraction=0",
        )
        shutil.rmtree(folder, ignore_errors=True)
        run(cmd, out / f"labels{fraction:g}.log")
        metrics = json.loads((folder / "metrics.json").read_text())
        result["linear"][f"{fraction:g}"] = metrics["test_accuracy"]
        result["precision"] = metrics["precision"]["dtype"]
        result["epochs"].append(metrics["epochs_completed"])
        result["train_s"].append(metrics["train_time_s"])
        result["images_per_s"].append(mean_rate(metrics["history"]))
        result["commands"].append(shown(cmd))
    result["command"] = "; ".join(result.pop("commands"))
    return result


# ---- table ----------------------------------------------------------------------------------------------------------

METHOD_NAMES = {
    "simclr": "SimCLR",
    "vicreg": "VICReg",
    "lightly": "SimCLR (lightly)",
    "supervised": "supervised",
    "random": "random encoder",
}


def settings_text(temperature: float, batch: int) -> str:
    """``train ssl``'s defaults that lightly's run copies, for the notes."""
    from deepscope.data.ssl.views import view_config
    from deepscope.tasks.ssl.config import SSLConfig

    cfg, views = SSLConfig(method="simclr"), view_config("natural", {})
    opt = cfg.optim
    return (
        f"SimCLR temperature {temperature:g}, head {'-'.join(map(str, cfg.projector_widths()))}, batch {batch}; "
        f"{opt.name.upper()} lr {opt.lr:g}, momentum {opt.momentum:g}, weight decay {opt.weight_decay:g}, {opt.schedule} "
        f"with {opt.warmup_fraction:.0%} warm-up; views: crop {views.crop_scale[0]:g}-{views.crop_scale[1]:g}, jitter "
        f"{'/'.join(f'{j:g}' for j in views.jitter)} p {views.jitter_p:g}, grey {views.grayscale_p:g}, blur p {views.blur_p:g}"
    )


def cell(value: Any, fmt: str) -> str:
    if value is None or value == []:
        return ""
    return " / ".join(format(v, fmt) for v in value) if isinstance(value, list) else format(value, fmt)


def row(bench: dict[str, Any]) -> str:
    linear = [bench["linear"].get(f"{f:g}") for f in FRACTIONS]
    return (
        f"| `{bench['run']}` | {METHOD_NAMES[bench['method']]} | {bench['tool']} | {bench['device']} | {bench['width']} | "
        f"{bench['minutes']:g} | {bench['precision']} | {cell(bench['knn'], '.2%')} | "
        + " | ".join(cell(a, ".2%") for a in linear)
        + f" | {cell(bench['epochs'], 'd')} | {cell(bench['train_s'], '.0f')} | {cell(bench['images_per_s'], ',.0f')} | "
        f"{bench['date']} | `{bench['command']}` |"
    )


def curve_line(bench: dict[str, Any], target: float) -> str:
    """kNN accuracy on the validation images after each epoch, and when it first reached ``target``."""
    points = ", ".join(f"{acc:.1%} @ {t / 60:.1f}" for _, t, acc in bench["knn_curve"])
    hit = next((t for _, t, acc in bench["knn_curve"] if acc >= target), None)
    reached = f"**{target:.0%} reached at {hit / 60:.1f} min**" if hit is not None else f"{target:.0%} not reached"
    return f"- `{bench['run']}`: {reached}; kNN (validation) @ min: {points}"


def render(target: float, trial: bool, temperature: float, batch: int) -> str:
    """The section from every run on disk: the trial runs (``--subset``) or the real ones."""
    found = [json.loads(p.read_text()) for p in RUNS.glob("*/bench.json")]
    benches = sorted(
        (b for b in found if ("-sub" in b["run"]) == trial),
        key=lambda b: (b["run"].split("-", 1)[1], METHODS.index(b["method"])),
    )
    ours = {f"`{b['run']}`" for b in benches}
    kept = [] if trial else [r for r in section_rows("ssl_cifar10") if r.split("|")[1].strip() not in ours]
    lines = [
        header(command_line()),
        (
            "Every method trains the same ResNet-18 of the width given (CIFAR stem) for the same wall budget on the same "
            "training images: `train/` less the share that `train ssl` keeps for its kNN monitor (seeded), standardised alike. "
            "All encoders are judged by deepscope's probes on the test images: kNN (cosine, k=200, T=0.1, the training "
            "images as the bank) and a logistic regression on the frozen features trained on 1%, 10% and 100% of the "
            f"training labels (seeded, stratified). deepscope rows are `train ssl` with its defaults ({settings_text(temperature, batch)}), "
            "probed at the best epoch by the validation kNN; lightly's row uses lightly's `SimCLRTransform` (PIL images in "
            "DataLoader workers, `num_workers` in its tool cell), `SimCLRProjectionHead` and `NTXentLoss` with the same settings, "
            "deepscope's optimizer code and encoder, and is probed at its last weights. The supervised row is `train "
            "classify` on exactly the labelled images of each fraction (its cells: test accuracy at 1%/10%/100% labels; "
            "epochs, time and images/s per fraction), same budget each. Epochs count the last, partial one; 'train s' "
            "includes data loading and deepscope's per-epoch kNN monitor. The header names the machine of the last "
            "invocation; each row's device names its own processor (rows that say only CPU ran on 2026-11-30 on an "
            "AMD EPYC with AVX2)."
        ),
        "",
        (
            "| run | method | tool | device | width | budget min | precision | kNN | linear 1% | linear 10% | linear 100% | "
            "epochs | train s | images/s | date | command |"
        ),
        "| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        *(row(b) for b in benches),
        *kept,
        "",
    ]
    groups: dict[str, dict[str, float]] = {}
    for b in benches:
        groups.setdefault(b["run"].split("-", 1)[1], {})[b["method"]] = b["knn"]
    for key, knn in sorted(groups.items()):
        if knn.get("simclr") and knn.get("lightly"):
            lines.append(
                f"deepscope SimCLR kNN / lightly SimCLR kNN ({key}): **{knn['simclr'] / knn['lightly']:.3f}**."
            )
    curves = [curve_line(b, target) for b in benches if b.get("knn_curve")]
    if curves:
        lines += [
            "",
            "kNN accuracy during training (validation images, after each epoch; minutes since the run started):",
            *curves,
        ]
    lines += [
        "",
        (
            "Reference, not the same exam (width-64 ResNet-18, lossless CIFAR-10, GPU, kNN on all 50,000 training "
            "images, best epoch by test kNN): lightly's CIFAR-10 benchmark table gives SimCLR 0.848 kNN after 200 "
            "epochs at batch 512 (87 min) and 0.879 after 800 epochs; VICReg is not in that table."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    from deepscope.tasks.ssl.plan import LONG_BATCH

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall budget of each training run")
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 width (64: the standard network)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--epochs", type=int, default=100, help="length of the SSL schedules (the budget may stop them)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="SimCLR temperature of both tools (train ssl plans one when left open: see bench_newcomer.py)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=LONG_BATCH,
        help="batch of both tools (train ssl plans one when left open: see bench_newcomer.py)",
    )
    parser.add_argument(
        "--supervised-epochs", type=int, default=30, help="epochs of the supervised run at 100%% labels"
    )
    parser.add_argument("--supervised-fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument(
        "--lightly-workers", type=int, default=LIGHTLY_WORKERS, help="DataLoader workers of the lightly run"
    )
    parser.add_argument("--ssl-set", action="append", default=[], metavar="KEY=VALUE", help="more --set for train ssl")
    parser.add_argument(
        "--subset", type=int, help="trial: a stratified sample of this many training images (printed, not written)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--target", type=float, default=0.85, help="kNN accuracy whose time to reach is reported")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the RESULTS.md section from the runs on disk"
    )
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    data = prepare(SHARED / "cifar10", CACHE / "cifar10", tree=False)
    if args.subset:
        data = subset_npz(data, args.subset)
    for method in [] if args.render_only else args.methods:
        name = f"{method}-w{args.width}-{args.minutes:g}min-{device.type}" + (
            f"-sub{args.subset}" if args.subset else ""
        )
        out = RUNS / name
        if (out / "bench.json").exists():
            print(f"{out} is done, kept (delete it to redo)")
            continue
        out.mkdir(parents=True, exist_ok=True)
        if method in ("simclr", "vicreg"):
            bench = run_ssl(method, data, out, args)
        elif method == "lightly":
            bench = run_lightly(data, out, args, device)
        elif method == "supervised":
            bench = run_supervised(data, out, args)
        else:
            bench = run_random(data, args, device)
        # the processor per row: the section's header names only the machine of its last invocation, and rows kept
        # from earlier invocations may come from another one
        where = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_name()} ({cpu_description()})"
        )
        bench.update(
            run=name,
            method=method,
            width=args.width,
            minutes=args.minutes,
            device=where,
            date=datetime.date.today().isoformat(),
        )
        (out / "bench.json").write_text(json.dumps(bench, indent=1))
        print(json.dumps(bench), flush=True)
    text = render(args.target, trial=bool(args.subset), temperature=args.temperature, batch=args.batch_size)
    if not args.subset:  # trial runs on a sample are printed only
        write_section("ssl_cifar10", "CIFAR-10 self-supervised pre-training at a fixed budget", text)
    print(text)


if __name__ == "__main__":
    main()
