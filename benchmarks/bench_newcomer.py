"""The newcomer's command: what a new user gets from only data and a time budget, beside the best recipe and the peer.

Each row runs ``deepscope train TASK --data DATA --max-minutes M --out OUT`` and nothing else (every task plans its
model, size and schedule from the data and the budget), prepares the data exactly as the task's own benchmark does
(by importing that script's functions) and scores the run the same way that benchmark does, so the newcomer's figure
sits in the same units as the figures it is compared with:

    detect-10, detect-30  Penn-Fudan split of bench_detect_pennfudan.py; box mAP@[.5:.95] by `deepscope evaluate detect`
    nuclei-20             DSB2018; score@0.5 on the 50 test images from `deepscope predict --instances` files (bench_nuclei.py)
    classify-10           CIFAR-10 npz of prepare_cifar10.py; test accuracy (bench_cifar10.py)
    denoise-10            BSD68 sigma 25 with bench_bsd68.py's fixed noise, written as noisy/ images (Noise2Void data);
                          PSNR by `deepscope evaluate` (bench_bsd68.py)
    ssl-10                CIFAR-10 npz; kNN accuracy of the encoder on the test images (bench_ssl_cifar10.py)

The best hand-tuned recipe and the peer of a row are quoted from RESULTS.md (or peer-baselines.md) by default, with
the date and processor they were measured on; ``--peers`` runs them instead through their own benchmark scripts
(which keep their own run folders and sections) at the row's budget. Every finished row is stored as JSON under
``.cache/newcomer/``, so rows can be measured in different sessions and the table keeps those already measured (in
a checkout without those records, the lines RESULTS.md holds for them); a
budget other than the row's own (``--minutes-scale``, ``--minutes``) is a trial, stored and shown apart.

    python benchmarks/bench_newcomer.py --rows classify-10 denoise-10 [--peers]
    python benchmarks/bench_newcomer.py --rows classify-10 --minutes-scale 0.5    # a 5-minute trial
    python benchmarks/bench_newcomer.py --rows ssl-10 --plan-only                  # the plans, nothing trained
    python benchmarks/bench_newcomer.py --render-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from common import CACHE, HERE, SHARED, command_line, header, kept_lines, run, section_body, where, write_section

STORE = CACHE / "newcomer"
RUNS = STORE / "runs"
PEER_BASELINES = SHARED.parent / "reference" / "peer-baselines.md"
BSD68_DATA = STORE / "bsd68-noisy"


# ---- quoted figures -------------------------------------------------------------------------------------------------

PROCESSORS = {
    "avx2": "AMD EPYC (AVX2, no native bf16), float32, 2 cores",
    "avx2-1t": "AMD EPYC (AVX2, no native bf16), float32, 1 thread",
    "avx512": "AMD EPYC (AVX512 with native bf16, as reported in issue 12), bf16, 2 cores",
    "xeon": "Intel(R) Xeon(R) Processor (AVX512, native bf16 and fp16), bf16, 2 cores",
    "epycf32": "AMD EPYC (AVX512, native bf16), float32, 2 cores",
    "epycb16": "AMD EPYC (AVX512, native bf16), bf16, 2 cores",
    "peers": "2 CPU cores (processor not recorded)",
}
# The recipe and peer figures quoted when --peers is not given, copied by hand from the sections named (of RESULTS.md,
# or ../shared/reference/peer-baselines.md); date and processor are those of that section's "Measured" line. Columns:
# row | recipe or peer | figure | what and at what budget | section | date | processor | tag. The table checks that
# one line of the section still holds the tag and the figure as printed there (last column) and says so if not.
# Choices: detection's best recipe is the ablation's light-dfl flags (the network and box regression the plan now
# gives, by hand; its weights predicted at NMS IoU 0.7, as the newcomer's now are), at 30 minutes with 416 px images
# (dfl-416, the size the plan now grows to there); nuclei's is the tuned boundary recipe
# (flows-20min, one flag beyond the newcomer's command, has 0.492 on one thread); CIFAR-10's best within 10 minutes is
# fastnet80 (cnn ties; fastnet's 87.96% took 11.1 min); denoising's is Noise2Void, the method of Noise2Void's data.
QUOTED = """
detect-10   | recipe | 0.645  | FCOS csp-light + dfl flags, 10 min        | detect_ablation   | 2026-12-07 | xeon    | light-dfl              | 0.645
detect-30   | recipe | 0.692  | FCOS csp-light + dfl at 416 px, 30 min    | detect_ablation   | 2026-12-07 | xeon    | dfl-416, 30 min        | 0.692
detect-10   | peer   | 0.531  | YOLOv8n from scratch, 10 min              | pennfudan_detect  | 2026-12-07 | epycf32 | yolov8n                | 0.531
detect-30   | peer   | 0.661  | YOLOv8n from scratch, 30 min              | pennfudan_detect  | 2026-12-07 | epycf32 | yolov8n                | 0.661
nuclei-20   | recipe | 0.458  | recipe dsb2018_unet, 15 min               | dsb2018           | 2026-11-23 | avx512  | dsb2018_unet-15min     | 0.458
nuclei-20   | peer   | 0.046  | StarDist package 0.9.2, 20 min            | nuclei            | 2026-11-30 | avx2-1t | stardist-package-20min | 0.046
classify-10 | recipe | 0.8427 | recipe fastnet80, 3.2 min                 | cifar10           | 2026-11-23 | avx512  | fastnet80              | 84.27%
classify-10 | peer   | 0.599  | course SimpleCNN, 12 min                  | peer-baselines.md | 2026-11-23 | peers   | SimpleCNN              | 59.9
denoise-10  | recipe | 26.84  | Noise2Void, 1200 steps, 8.2 min           | bsd68             | 2026-11-23 | avx512  | Noise2Void             | 26.84
denoise-10  | peer   | 25.49  | CAREamics 0.3.5 N2V, 1200 steps, 11.1 min | bsd68             | 2026-11-23 | avx512  | CAREamics              | 25.49
ssl-10      | recipe | 0.4676 | VICReg width 8, 4 epochs, 10 min          | ssl_cifar10       | 2026-11-30 | avx2    | vicreg-w8-10min        | 46.76%
ssl-10      | peer   | 0.4623 | lightly 1.6.0 SimCLR, 10 min              | ssl_cifar10       | 2026-12-07 | epycb16 | lightly-w8-10min-cpu   | 46.23%
"""


@dataclass(frozen=True)
class Quote:
    """A figure quoted from another section, with when and where it was measured."""

    score: float
    label: str
    section: str
    date: str
    processor: str
    anchor: tuple[str, str]  # a line of the section holds both: the figure is still there


def quotes() -> dict[tuple[str, str], Quote]:
    """QUOTED by (row, "recipe" or "peer")."""
    found = {}
    for line in QUOTED.strip().splitlines():
        row, which, score, label, section, date, processor, tag, printed = (c.strip() for c in line.split("|"))
        found[row, which] = Quote(float(score), label, section, date, PROCESSORS[processor], (tag, printed))
    return found


def section_text(name: str) -> str:
    """The text of a RESULTS.md section, or of peer-baselines.md; empty when not found."""
    if name.endswith(".md"):
        return PEER_BASELINES.read_text() if PEER_BASELINES.exists() else ""
    return section_body(name)


def still_there(quote: Quote) -> bool:
    """Whether the quoted figure is still in its section (a rerun of that benchmark may have replaced it)."""
    return any(all(a in line for a in quote.anchor) for line in section_text(quote.section).splitlines())


# ---- data, as each task's benchmark prepares it ---------------------------------------------------------------------


def detect_data() -> Path:
    """bench_detect_pennfudan.py's split (100 train / 30 test, VOC XML); the newcomer trains on train/."""
    from bench_detect_pennfudan import SPLIT, make_split

    make_split(SHARED / "pennfudan")
    return SPLIT


def nuclei_data() -> Path:
    """The shared DSB2018 folder as bench_nuclei.py uses it (train/ 664 images, test/ 50)."""
    return SHARED / "dsb2018"


def cifar_data() -> Path:
    """prepare_cifar10.py's npz, as bench_cifar10.py and bench_ssl_cifar10.py train on it."""
    from prepare_cifar10 import prepare

    return prepare(SHARED / "cifar10", CACHE / "cifar10", tree=False)


def bsd68_data() -> Path:
    """bench_bsd68.py's noisy images (its export for CAREamics: fixed Gaussian noise sigma 25 on the 0..255 scale,
    unclipped) written as float32 TIFFs: train/noisy (Noise2Void's data, as CAREamics gets it), test/noisy beside
    links to the clean BSD68 images. With noisy/ images on disk the newcomer needs no noise setting, and the test
    images are bit for bit those bench_bsd68.py scores."""
    import numpy as np
    import tifffile
    from PIL import Image

    from bench_bsd68 import export_arrays, prepare
    from deepscope.data.denoise.dataset import find_denoise_files

    if (BSD68_DATA / "test" / "clean").exists():
        return BSD68_DATA
    clean_root = prepare()
    arrays = np.load(export_arrays(clean_root))
    for split in ("train", "test"):
        files = find_denoise_files(clean_root / split, synthetic=True)["all"]["clean"]
        (BSD68_DATA / split / "noisy").mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(sorted(files)):  # export_arrays numbers the images in load_split's order
            if not np.array_equal(np.asarray(Image.open(files[name])), arrays[f"{split}_clean_{i:03d}"]):
                raise SystemExit(f"{files[name]} is not image {i} of bench_bsd68's export")
            tifffile.imwrite(BSD68_DATA / split / "noisy" / f"{name}.tif", arrays[f"{split}_noisy_{i:03d}"])
            if split == "test":
                link = BSD68_DATA / "test" / "clean" / files[name].name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.unlink(missing_ok=True)
                link.symlink_to(files[name].resolve())
    return BSD68_DATA


# ---- scores, as each task's benchmark computes them -----------------------------------------------------------------


def metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


def detect_score(out: Path, data: Path, nms_iou: float | None = None) -> dict[str, Any]:
    """Predict the test images at score 0.001 and score them with `deepscope evaluate detect`: the commands of
    bench_detect_pennfudan.py (its predict command depends on the run folder alone, not on the model it names), at
    the run's own NMS IoU or at ``nms_iou``; the IoU used is returned with the scores."""
    import bench_detect_pennfudan as pf

    predict = pf.deepscope_commands("fcos", 0, 0, out)["predict"]
    run([*predict, *(["--nms-iou", f"{nms_iou:g}"] if nms_iou else [])], out / "predict.log")
    used = json.loads((out / "predict.log").read_text().strip().splitlines()[-1])["settings"]["nms_iou"]
    scores = pf.score(out)
    return {"score": scores["map"], "map_50": scores["map_50"], "map_75": scores["map_75"], "nms_iou": used}


def nuclei_score(out: Path, data: Path) -> dict[str, Any]:
    """bench_nuclei.py's newcomer scoring: `deepscope predict --instances` on test/, the label files scored."""
    from bench_nuclei import predict_newcomer

    predict_newcomer(out, data)
    report = json.loads((out / "predict_scores.json").read_text())
    return {"score": report["thresholds"]["0.5"]["score"], "mean_score": report["mean_score"]}


def classify_score(out: Path, data: Path) -> dict[str, Any]:
    """bench_cifar10.py's figure: the run's test accuracy on the 10,000 test images."""
    return {"score": metrics(out)["test_accuracy"]}


def denoise_score(out: Path, data: Path) -> dict[str, Any]:
    """bench_bsd68.py's figure: `deepscope evaluate` of best.pt on the 68 test images, without TTA."""
    target = out / "eval_test.json"
    cmd = [sys.executable, "-m", "deepscope", "evaluate", str(out / "best.pt"), "--data", str(data)]
    run([*cmd, "--split", "test", "--out", str(target)], target.with_suffix(".log"))
    result = json.loads(target.read_text())
    return {"score": result["psnr"], "ssim": result["ssim"], "psnr_input": result["psnr_input"]}


def ssl_score(out: Path, data: Path) -> dict[str, Any]:
    """bench_ssl_cifar10.py's figure: the kNN accuracy (k=200) that `train ssl` reports on the test images."""
    return {"score": metrics(out)["knn_accuracy"]}


# ---- the recipes and peers, run by their own scripts (--peers) ------------------------------------------------------


def bench(script: str, *args: str, log: str) -> None:
    """Run another benchmark script: it keeps its own run folders (finished runs are not redone) and its section."""
    run([sys.executable, str(HERE / script), *args], STORE / "refs" / f"{log}.log")


def figure(score: float, precision: str, minutes: float, label: str, file: Path) -> dict[str, Any]:
    """A recipe's or peer's result; ``file`` holds it (its age tells a kept earlier run from a new one)."""
    return {"score": score, "precision": precision, "minutes": minutes, "run": label, "file": str(file)}


def pennfudan_run(model: str, minutes: float) -> dict[str, Any]:
    """A run of bench_detect_pennfudan.py at 320 px (its default), read back from its bench.json."""
    from bench_detect_pennfudan import RUNS as PF_RUNS

    out = PF_RUNS / f"{model}-320px-{minutes:g}min"
    which = ["--only", "yolo"] if model == "yolov8n" else ["--only", "deepscope", "--models", model]
    bench("bench_detect_pennfudan.py", "--minutes", f"{minutes:g}", *which, log=out.name)
    b = json.loads((out / "bench.json").read_text())
    return figure(b["scores"]["map"], b["precision"], b["train_min"], f"`{out.name}`", out / "bench.json")


def nuclei_recipe(minutes: float) -> dict[str, Any]:
    """bench_dsb2018.py with the tuned recipe dsb2018_unet.yaml at the row's budget (a kept run is reused: the
    script refuses to train over one)."""
    from bench_dsb2018 import RUNS as DSB_RUNS

    out = DSB_RUNS / f"dsb2018_unet-{minutes:g}min"
    if not (out / "metrics.json").exists():
        recipe = str(HERE / "recipes" / "dsb2018_unet.yaml")
        bench("bench_dsb2018.py", "--recipe", recipe, "--max-minutes", f"{minutes:g}", log=out.name)
    m = metrics(out)
    test = json.loads((out / "test_scores.json").read_text()) if (out / "test_scores.json").exists() else m["test"]
    score = test["thresholds"]["0.5"]["score"]
    return figure(score, m["precision"]["dtype"], m["train_time_s"] / 60, f"`{out.name}`", out / "metrics.json")


def nuclei_peer(minutes: float) -> dict[str, Any]:
    """bench_nuclei.py's StarDist package run (its own venv) at the row's budget, with all cores."""
    from bench_nuclei import job, scores

    data = nuclei_data()
    out = job("stardist-package", minutes, data)[1]
    bench("bench_nuclei.py", "--minutes", f"{minutes:g}", "--runs", "stardist-package", log=out.name)
    report = scores("stardist-package", out, data)
    if report is None:
        raise SystemExit(f"{out}: no predictions, see {out.with_suffix('.log')}")
    train_s = json.loads((out / "summary.json").read_text())["train_s"]
    return figure(report["thresholds"]["0.5"]["score"], "float32", train_s / 60, f"`{out.name}`", out / "summary.json")


def classify_recipe(minutes: float) -> dict[str, Any]:
    """bench_cifar10.py's fastnet80 recipe (fixed epochs: it is not cut at the row's budget, its time is shown)."""
    bench("bench_cifar10.py", "--recipes", "fastnet80", log="cifar10_fastnet80")
    store = CACHE / "cifar10_results.json"
    row = {r["recipe"]: r for r in json.loads(store.read_text())}["fastnet80"]
    precision = metrics(CACHE / "runs" / "cifar10_fastnet80")["precision"]["dtype"]
    return figure(row["test_acc"], precision, row["wall_s"] / 60, "recipe fastnet80", store)


def bsd68_run(method: str) -> dict[str, Any]:
    """bench_bsd68.py at its 1200 steps: deepscope's Noise2Void (the recipe) or CAREamics (the peer, its own venv)."""
    which = ["--methods", "n2v", "--no-peer"] if method == "n2v" else ["--methods"]  # no methods: CAREamics alone
    bench("bench_bsd68.py", "--steps", "1200", *which, log=f"bsd68-{method}")
    results = CACHE / "bsd68-results-1200.json"
    r = json.loads(results.read_text())[method]
    precision = "float32" if method == "careamics" else precision_auto()
    return figure(r["plain"]["psnr"], precision, r["train_s"] / 60, f"{method}, 1200 steps", results)


SSL_EPOCHS = {"vicreg": 4, "lightly": 5}  # width 8, batch 256: the epochs that fill 10 minutes on 2 cores (lightly's
# 4 took 7.9 min on the AVX-512 Xeon, 2026-12-07; VICReg's 4 filled them on the AVX2 EPYC), scaled with the budget


def ssl_run(method: str, minutes: float) -> dict[str, Any]:
    """bench_ssl_cifar10.py's 10-minute settings (width 8, batch 256, ``SSL_EPOCHS``): VICReg (recipe) or lightly
    (peer)."""
    import torch

    from bench_ssl_cifar10 import RUNS as SSL_RUNS

    out = SSL_RUNS / f"{method}-w8-{minutes:g}min-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    epochs = max(1, round(SSL_EPOCHS[method] * minutes / 10))
    settings = ["--width", "8", "--epochs", str(epochs), "--batch-size", "256", "--methods", method]
    bench("bench_ssl_cifar10.py", "--minutes", f"{minutes:g}", *settings, log=out.name)
    b = json.loads((out / "bench.json").read_text())
    return figure(b["knn"], b["precision"], b["train_s"] / 60, f"`{out.name}`", out / "bench.json")


def precision_auto() -> str:
    import torch

    from deepscope.engine.precision import resolve_precision

    return resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")).name


# ---- rows -----------------------------------------------------------------------------------------------------------

Scores = dict[str, float | None]  # newcomer, recipe, peer
REFERENCES = ("recipe", "peer")


def at_least(share: float, of: str) -> Callable[[Scores], bool | None]:
    """Goal: the newcomer reaches ``share`` times the ``of`` score (None when that score is not known)."""
    return lambda s: None if s.get(of) is None else s["newcomer"] >= share * s[of]


def absolute(value: float) -> Callable[[Scores], bool | None]:
    return lambda s: s["newcomer"] >= value


@dataclass(frozen=True)
class Task:
    """A deepscope task as its benchmark runs it: the data it prepares and the figure it scores."""

    name: str
    metric: str
    percent: bool  # scores are fractions, shown as percentages
    data: Callable[[], Path]
    score: Callable[[Path, Path], dict[str, Any]]


@dataclass(frozen=True)
class Row:
    name: str
    task: Task
    minutes: float
    recipe_run: Callable[[float], dict[str, Any]] | None  # with --peers; None: quoted only
    peer_run: Callable[[float], dict[str, Any]] | None
    goals: dict[str, Callable[[Scores], bool | None]] = field(default_factory=dict)


DETECT = Task("detect", "box mAP@[.5:.95]", False, detect_data, detect_score)
NUCLEI = Task("segment", "score@0.5, 50 test images", False, nuclei_data, nuclei_score)
CLASSIFY = Task("classify", "test accuracy", True, cifar_data, classify_score)
DENOISE = Task("denoise", "PSNR (dB), BSD68", False, bsd68_data, denoise_score)
SSL = Task("ssl", "kNN accuracy", True, cifar_data, ssl_score)

RECIPE_GOAL = {">= 0.95 x recipe": at_least(0.95, "recipe")}
YOLO_GOAL = {**RECIPE_GOAL, ">= YOLOv8n": at_least(1.0, "peer")}
NUCLEI_GOAL = {**RECIPE_GOAL, ">= 0.55 on 2 cores": absolute(0.55)}
LIGHTLY_GOAL = {**RECIPE_GOAL, ">= 1.2 x lightly": at_least(1.2, "peer")}
ROWS = {
    row.name: row
    for row in [
        Row("detect-10", DETECT, 10, partial(pennfudan_run, "fcos-tiny"), partial(pennfudan_run, "yolov8n"), YOLO_GOAL),
        Row("detect-30", DETECT, 30, partial(pennfudan_run, "fcos-tiny"), partial(pennfudan_run, "yolov8n"), YOLO_GOAL),
        Row("nuclei-20", NUCLEI, 20, nuclei_recipe, nuclei_peer, NUCLEI_GOAL),
        Row("classify-10", CLASSIFY, 10, classify_recipe, None, RECIPE_GOAL),
        Row("denoise-10", DENOISE, 10, lambda _: bsd68_run("n2v"), lambda _: bsd68_run("careamics"), RECIPE_GOAL),
        Row("ssl-10", SSL, 10, partial(ssl_run, "vicreg"), partial(ssl_run, "lightly"), LIGHTLY_GOAL),
    ]
}


# ---- running a row --------------------------------------------------------------------------------------------------


def newcomer_command(row: Row, data: Path, minutes: float, out: Path) -> list[str]:
    """Only the data, the budget and the run folder: everything else is the task's plan."""
    flags = ["--data", str(data), "--max-minutes", f"{minutes:g}", "--out", str(out)]
    return [sys.executable, "-m", "deepscope", "train", row.task.name, *flags]


def shown(cmd: list[str]) -> str:
    """A command as typed, with cache paths relative to benchmarks/."""
    text = shlex.join(["deepscope", *cmd[3:]]) if cmd[1:3] == ["-m", "deepscope"] else shlex.join(cmd)
    return text.replace(str(CACHE) + "/", ".cache/").replace(str(SHARED) + "/", "shared/data/")


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def plan_summary(plan: dict[str, Any], epochs_done: int | None) -> str:
    """The planned settings in a few words (scalars and lists; grouped settings such as optim stay in the JSON)."""
    parts = [
        f"{key.removeprefix('model_args.')} {json.dumps(value, separators=(',', ':')).strip(chr(34))}"
        for key, value in plan.get("settings", {}).items()
        if not isinstance(value, dict)
    ]
    if epochs_done is not None:
        parts.append(f"{epochs_done} epochs run")
    return ", ".join(parts)


def read_plan(out: Path) -> dict[str, Any]:
    """The run's plan from metrics.json; from config.yaml (its settings, reasons as header comments) if absent."""
    found = metrics(out).get("plan") if (out / "metrics.json").exists() else None
    if found:
        return found
    import yaml

    text = (out / "config.yaml").read_text()
    config = yaml.safe_load(text)
    keys = ("model", "method", "target", "image_size", "patch_shape", "batch_size", "epochs", "steps_per_epoch")
    settings = {k: config[k] for k in keys if config.get(k) is not None}
    settings.update({f"model_args.{k}": v for k, v in (config.get("model_args") or {}).items()})
    reasons = [line.lstrip("# ") for line in text.splitlines() if line.startswith("#")]
    return {"settings": settings, "reasons": reasons}


def key_of(row: Row, minutes: float) -> str:
    """The stored name: the row's own for its own budget, a trial name for any other."""
    return row.name if minutes == row.minutes else f"{row.name}@{minutes:g}min"


def run_newcomer(row: Row, minutes: float) -> dict[str, Any]:
    """Train with the newcomer's command, score as the task's benchmark does, and record the plan and the machine."""
    data = row.task.data()
    out = RUNS / key_of(row, minutes)
    shutil.rmtree(out, ignore_errors=True)
    cmd = newcomer_command(row, data, minutes, out)
    cpu = child_cpu_s()
    wall = run(cmd, out.with_suffix(".log"))
    cpu = child_cpu_s() - cpu
    m, plan = metrics(out), read_plan(out)
    return {
        "row": row.name,
        "minutes": minutes,
        **where(),
        "precision": m.get("precision", {}).get("dtype", "?"),
        "wall_min": wall / 60,
        "cpu_min": cpu / 60,
        "train_min": m.get("train_time_s", 0) / 60,
        "epochs": m.get("epochs_completed"),
        "plan_summary": plan_summary(plan, m.get("epochs_completed")),
        "plan": plan,
        "command": shown(cmd),
        **row.task.score(out, data),
    }


def run_reference(row: Row, which: str, minutes: float) -> dict[str, Any] | None:
    """The recipe or the peer by its own script; None where none can be run here (the course CNN). A script that
    kept a finished run from earlier returns it unchanged: that figure is dated by where the run's JSON says it ran,
    else by its file, its processor unknown."""
    runner = row.recipe_run if which == "recipe" else row.peer_run
    if runner is None:
        return None
    started = time.time()
    result = {**runner(minutes), **where(), "row_minutes": minutes}
    made = Path(result["file"]).stat().st_mtime
    if made < started:
        kept = json.loads(Path(result["file"]).read_text()).get("where") if result["file"].endswith(".json") else None
        result.update(
            kept
            or {
                "date": datetime.date.fromtimestamp(made).isoformat(),
                "processor": f"a machine not recorded (a run {Path(result['file']).parent.name} kept from earlier)",
                "machine": "not recorded",
                "cores": "?",
            }
        )
    return result


def stored(name: str) -> dict[str, Any] | None:
    """A stored row (``ROW`` or ``ROW@Mmin``) or a measured reference (``refs/ROW-recipe``, ``refs/ROW-peer``)."""
    path = STORE / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def store(name: str, record: dict[str, Any]) -> None:
    path = STORE / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))


# ---- table ----------------------------------------------------------------------------------------------------------


def fmt(row: Row, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if row.task.percent else f"{value:.3f}" if value < 10 else f"{value:.2f}"


def reference_cell(row: Row, key: str, which: str) -> tuple[str, float | None]:
    """The recipe or peer cell: measured (a stored --peers run) if there is one, else the quoted figure."""
    measured = stored(f"refs/{key}-{which}")
    if measured:
        text = (
            f"{fmt(row, measured['score'])} ({measured['run']}; measured {measured['date']} on {measured['processor']}, "
            f"{measured['precision']}, {measured['cores']} cores, {measured['minutes']:.1f} min)"
        )
        return text, measured["score"]
    quote = quotes().get((row.name, which)) if key == row.name else None  # a trial is compared at its own budget
    if quote is None:
        return "not measured at this budget (`--peers` runs it)", None
    stale = "" if still_there(quote) else "; **no longer in that section, re-check**"
    text = (
        f"{fmt(row, quote.score)} ({quote.label}; quoted from {source(quote.section)}, measured {quote.date} on "
        f"{quote.processor}{stale})"
    )
    return text, quote.score


def source(section: str) -> str:
    return section if section.endswith(".md") else f"section {section}"


def ratio(a: float, b: float | None) -> str:
    return "-" if b is None else f"{a / b:.2f}"


def goals_cell(row: Row, record: dict[str, Any], scores: dict[str, float | None]) -> str:
    if record["minutes"] != row.minutes:
        return f"- (trial at {record['minutes']:g} of {row.minutes:g} min)"
    checks = []
    for label, goal in row.goals.items():
        met = goal(scores)
        if label.endswith("on 2 cores") and (record["cores"] > 2 or "no GPU" not in record["machine"]):
            met = None  # the goal is for 2 CPU cores; another machine's figure neither meets nor misses it
        checks.append(f"{label}: {'?' if met is None else 'yes' if met else 'no'}")
    return "; ".join(checks)


def table_row(row: Row, record: dict[str, Any] | None) -> str:
    """One row of the table; a row not measured yet shows what it will be compared with."""
    if record is None:
        recipe, peer = reference_cell(row, row.name, "recipe")[0], reference_cell(row, row.name, "peer")[0]
        return (
            f"| `{row.name}` | {row.task.name} | {row.task.metric} | {row.minutes:g} min | | not measured yet | | "
            f"{recipe} | | {peer} | | |"
        )
    key = key_of(row, record["minutes"])
    recipe, recipe_score = reference_cell(row, key, "recipe")
    peer, peer_score = reference_cell(row, key, "peer")
    scores = {"newcomer": record["score"], "recipe": recipe_score, "peer": peer_score}
    return (
        f"| `{key}` | {row.task.name} | {row.task.metric} | {record['minutes']:g} min | {record['cores']} | "
        f"**{fmt(row, record['score'])}** ({record['precision']}, {record['wall_min']:.1f} min wall) | "
        f"{record['plan_summary']} | {recipe} | {ratio(record['score'], recipe_score)} | {peer} | "
        f"{ratio(record['score'], peer_score)} | {goals_cell(row, record, scores)} |"
    )


def records() -> list[tuple[Row, dict[str, Any] | None]]:
    """Every stored newcomer row in the rows' order, trials after their row; None for a row not measured yet."""
    found: list[tuple[Row, dict[str, Any] | None]] = []
    for row in ROWS.values():
        own = stored(row.name)
        trials = [json.loads(p.read_text()) for p in sorted(STORE.glob(f"{row.name}@*.json"))]
        found += [(row, own), *((row, t) for t in trials)]
    return found


def render() -> str:
    rows = records()
    # rows measured before whose records this checkout lacks keep their lines (and "where" lines) from RESULTS.md
    kept_rows, kept_where = kept_lines("newcomer", r"^\| `([^`]+)` \|.*"), kept_lines("newcomer", r"^- `([^`]+)`: .*")
    table = [
        kept_rows[row.name] if record is None and row.name in kept_rows else table_row(row, record)
        for row, record in rows
    ]
    where_lines = [
        f"- `{key_of(row, r['minutes'])}`: {r['date']} on {r['machine']}; {r['precision']}, {r['wall_min']:.1f} min "
        f"wall, {r['cpu_min']:.1f} CPU-min, {r['train_min']:.1f} min training. `{r['command']}`"
        if r is not None
        else kept_where[row.name]
        for row, r in rows
        if r is not None or row.name in kept_where
    ]
    lines = [
        header(command_line()),
        (
            "Each row is what a new user types with only data and a time budget, `deepscope train TASK --data DATA "
            "--max-minutes M --out OUT` (the task plans model, size and schedule itself), on the data prepared as the "
            "task's own benchmark prepares it and scored as that benchmark scores it. Rows are stored under "
            "`.cache/newcomer/` and kept between invocations (a row whose record a fresh checkout lacks keeps its line "
            "as this section held it), so each row names its own date, processor and precision below. Recipe and "
            "peer cells say whether they were measured by their own scripts (`--peers`) or quoted from another "
            "section: quoted figures come from another day and often another processor and budget."
        ),
        "",
        "Goals: every newcomer row >= 0.95 x the best hand-tuned recipe of its row; detection >= YOLOv8n at both "
        "budgets; DSB2018 newcomer >= 0.55 score@0.5 on the 50 test images in 20 minutes on 2 cores; SSL kNN >= 1.2 x "
        "lightly's.",
        "",
        "| row | task | metric | budget | cores | newcomer | plan chosen | best recipe | newcomer / recipe | peer | "
        "newcomer / peer | goals met |",
        "| --- | --- | --- | --- | ---: | --- | --- | --- | ---: | --- | ---: | --- |",
        *table,
        "",
        "Where and how each newcomer row ran:" if where_lines else "No newcomer row measured yet.",
        *where_lines,
        "",
        "CPU-min well below cores x wall means other work shared the processor during the run.",
        "",
        (
            "Scoring per row: detection predicts the 30 test images at score 0.001 and scores them with `deepscope "
            "evaluate detect` (bench_detect_pennfudan.py), at the run's NMS IoU (0.7 since 2026-12-07, the value "
            "YOLOv8n predicts at; 0.5 before); nuclei runs `deepscope predict --instances` on the 50 test "
            "images and scores the label files (bench_nuclei.py); CIFAR-10 is the run's test accuracy (bench_cifar10.py); "
            "denoising is `deepscope evaluate` PSNR on BSD68 with bench_bsd68.py's fixed sigma-25 noise, the training "
            "images given as their noisy copies alone (Noise2Void's data, what CAREamics trains on), so its ratios are "
            "of dB; SSL is the kNN accuracy (k=200) on the test images (bench_ssl_cifar10.py). The nuclei recipe is the "
            "tuned boundary recipe; `flows-20min` in section nuclei (0.492, one thread) is one flag away from the "
            "newcomer's command. The CIFAR-10 peer, the course's SimpleCNN, is quoted only (its code is not here)."
        ),
    ]
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------------------


def budgets(args: argparse.Namespace) -> dict[str, float]:
    """Minutes per chosen row: the row's own, times --minutes-scale, or a --minutes override."""
    overrides = dict(item.split("=", 1) for item in args.minutes)
    unknown = set(overrides) - set(args.rows)
    if unknown:
        raise SystemExit(f"--minutes names rows not in --rows: {', '.join(sorted(unknown))}")
    return {name: float(overrides.get(name, ROWS[name].minutes * args.minutes_scale)) for name in args.rows}


def show_plan(row: Row, minutes: float) -> None:
    """``deepscope plan TASK`` with the newcomer's arguments: the settings chosen, nothing trained."""
    cmd = newcomer_command(row, row.task.data(), minutes, RUNS / "plan-only")
    cmd = [*cmd[:3], "plan", *cmd[4:-2], "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        print(f"{row.name}: {shown(cmd)} failed:\n{result.stderr[-2000:]}")
        return
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{row.name} ({minutes:g} min): {plan_summary(plan, None)}\n  " + "\n  ".join(plan["reasons"]))


def measure(row: Row, minutes: float, references: Sequence[str], newcomer: bool = True) -> None:
    """One row: the newcomer's run (unless not ``newcomer``) and the ``references`` named (recipe, peer); each
    stored as it finishes."""
    key = key_of(row, minutes)
    if newcomer:
        record = run_newcomer(row, minutes)
        store(key, record)
        print(f"{key}: {fmt(row, record['score'])} ({record['plan_summary']})", flush=True)
    for which in references:
        reference = run_reference(row, which, minutes)
        if reference is not None:
            store(f"refs/{key}-{which}", reference)
            print(f"{key} {which}: {fmt(row, reference['score'])} ({reference['run']})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW", help=", ".join(ROWS)
    )
    parser.add_argument("--minutes-scale", type=float, default=1.0, help="scale every row's budget (a trial if not 1)")
    parser.add_argument("--minutes", action="append", default=[], metavar="ROW=M", help="one row's budget (a trial)")
    parser.add_argument("--peers", action="store_true", help="also run the recipe and the peer by their own scripts")
    parser.add_argument(
        "--references",
        nargs="+",
        choices=REFERENCES,
        default=[],
        help="run only these references of the rows (by their own scripts), not the newcomer's command",
    )
    parser.add_argument(
        "--plan-only", action="store_true", help="print each row's plan (deepscope plan), train nothing"
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite the section from the stored rows")
    args = parser.parse_args()
    failed = []
    for name, minutes in ({} if args.render_only else budgets(args)).items():
        if args.plan_only:
            show_plan(ROWS[name], minutes)
            continue
        try:
            references = args.references or (REFERENCES if args.peers else ())
            measure(ROWS[name], minutes, references, newcomer=not args.references)
        except SystemExit as error:  # common.run's failure names the command and its log
            failed.append(f"{name}: {error}")
        except Exception as error:  # a figure missing from a run's files: keep the other rows going
            traceback.print_exc()
            failed.append(f"{name}: {type(error).__name__}: {error}")
    if args.plan_only:
        return
    text = render()
    write_section("newcomer", "Newcomer's command: only data and a budget", text)
    print(text)
    if failed:
        raise SystemExit("failed rows:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
