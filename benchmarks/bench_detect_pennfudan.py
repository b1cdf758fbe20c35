"""Penn-Fudan pedestrians, detection from scratch: deepscope's detectors against Ultralytics YOLOv8n, same time budget.

Both tools train from random weights on the same 100 images for the same wall time on the CPU, predict the same 30
test images, and are scored by the same metric (``deepscope evaluate detect``, COCO box mAP), so the table compares
training recipes, not metric implementations. YOLOv8n is the reference a user would reach for first; Ultralytics is
AGPL-3.0 and pins its own dependencies, so it lives in its own virtual environment under ``.cache/`` that reuses the
installed torch (``--system-site-packages``), and runs inside it through this script (``--yolo-worker``).

Each run keeps its folder under ``.cache/pennfudan_runs/`` with a ``bench.json``; finished runs are not redone (delete
the folder to redo one), and the RESULTS.md section lists every run found there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common import CACHE, SHARED, command_line, header, run, section_rows, where, write_section

# model -> extra ``--set`` settings of ``deepscope train detect`` (the detectors' own defaults otherwise)
# model -> extra settings; epochs sized so the cosine schedule ends near a 10-minute budget at 320 px on 2 cores
# (a run name may add a variant after "-": "fcos-tiny" trains model fcos with the tiny backbone)
MODELS: dict[str, list[str]] = {
    "fcos": ["epochs=14"],
    "centernet": ["epochs=12", "model_args.backbone=resnet18"],
    "retinanet": ["epochs=14"],
    "fasterrcnn": ["epochs=10"],
    "fcos-tiny": ["epochs=24", "model_args.backbone=tiny"],
    "centernet-tiny": ["epochs=24", "model_args.backbone=tiny"],
    "retinanet-tiny": ["epochs=24", "model_args.backbone=tiny"],
}
ULTRALYTICS = "ultralytics==8.4.190"
SPLIT = CACHE / "pennfudan_split"
# the same split in the Ultralytics layout, apart: deepscope sees only VOC files
YOLO_DATA = CACHE / "pennfudan_split_yolo"
RUNS = CACHE / "pennfudan_runs"
VENV = CACHE / "venv-ultralytics"
# Ultralytics' settings and fonts live here instead of ~/.config. check_det_dataset() calls check_font("Arial.ttf") even
# with plots=False and, when the font is missing, probes and downloads it from github.com whatever YOLO_OFFLINE
# says; a local font under that name (matplotlib's DejaVuSans) makes it return at once.
YOLO_CONFIG = CACHE / "ultralytics-config"
N_TRAIN = 100
YOLO_BATCH = 16  # Ultralytics' default; it accumulates gradients to its nominal batch of 64
# Offline and from scratch. YOLO_OFFLINE=true makes is_online() False, which turns off the pip update check, the hub
# and the usage events; YOLO_AUTOINSTALL=false stops check_requirements() from pip-installing; device=cpu and amp=False
# skip check_amp(), which downloads yolo26n.pt on CUDA; plots=False avoids the label and result plots. val=False: no
# validation between epochs (all the time budget trains; last.pt is the model scored); the final epoch is validated on
# pf.yaml's val, the test images, which gives Ultralytics' own mAP beside deepscope's. time= (hours) is honoured at
# optimizer steps, every 64 images with the gradient accumulation, so training overshoots by at most one such step.
YOLO_TRAIN = {
    "model": "yolov8n.yaml",
    "pretrained": False,
    "amp": False,
    "plots": False,
    "val": False,
    "device": "cpu",
    "workers": 0,
    "batch": YOLO_BATCH,
}
YOLO_PREDICT = {"conf": 0.001, "max_det": 100, "device": "cpu"}  # Ultralytics' own mAP settings
YOLO_ENV = {"YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_CONFIG_DIR": str(YOLO_CONFIG)}


# ---- data -----------------------------------------------------------------------------------------------------------


def split_names(shared: Path) -> dict[str, list[str]]:
    """The images sorted by name, permuted with numpy's default_rng(0): the first 100 train, the rest test."""
    names = sorted(p.name for p in (shared / "PNGImages").glob("*.png"))
    if len(names) <= N_TRAIN:
        raise SystemExit(f"{shared / 'PNGImages'}: {len(names)} images, need more than {N_TRAIN}")
    order = np.random.default_rng(0).permutation(len(names))
    return {"train": sorted(names[i] for i in order[:N_TRAIN]), "test": sorted(names[i] for i in order[N_TRAIN:])}


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.unlink(missing_ok=True)
    link_path.symlink_to(target.resolve())


def yolo_labels(shared: Path) -> dict[str, str]:
    """YOLO label text per image name (class 0, centre and size over the image size) from the shared COCO file, whose
    boxes are the VOC boxes made 0-based (x = xmin - 1, w = xmax - xmin + 1), as deepscope reads the XML files."""
    coco = json.loads((shared / "annotations_coco.json").read_text())
    images = {image["id"]: image for image in coco["images"]}
    lines: dict[str, list[str]] = {Path(image["file_name"]).name: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        centre_size = (
            (x + w / 2) / image["width"],
            (y + h / 2) / image["height"],
            w / image["width"],
            h / image["height"],
        )
        lines[Path(image["file_name"]).name].append("0 " + " ".join(f"{v:.6f}" for v in centre_size))
    return {name: "".join(line + "\n" for line in found) for name, found in lines.items()}


def make_split(shared: Path) -> dict[str, list[str]]:
    """Symlinked train/ and test/ folders (images/ + Annotations/ VOC XML) for deepscope, and the same split in the
    Ultralytics layout (images/ + labels/ and pf.yaml) beside it; nothing is copied."""
    splits = split_names(shared)
    labels = yolo_labels(shared)
    for split, names in splits.items():
        for folder in (SPLIT / split, YOLO_DATA / split):
            for old in folder.glob("*/*"):
                old.unlink()
        for name in names:
            stem = Path(name).stem
            link(shared / "PNGImages" / name, SPLIT / split / "images" / name)
            link(shared / "Annotations_voc_xml" / f"{stem}.xml", SPLIT / split / "Annotations" / f"{stem}.xml")
            link(shared / "PNGImages" / name, YOLO_DATA / split / "images" / name)
            (YOLO_DATA / split / "labels").mkdir(parents=True, exist_ok=True)
            (YOLO_DATA / split / "labels" / f"{stem}.txt").write_text(labels[name])
    for cache in YOLO_DATA.glob("*/labels.cache"):
        cache.unlink()  # Ultralytics' label cache would outlive a changed split
    yaml = f"path: {YOLO_DATA.resolve()}\ntrain: train/images\nval: test/images\nnames:\n  0: person\n"
    (YOLO_DATA / "pf.yaml").write_text(yaml)
    return splits


# ---- Ultralytics ----------------------------------------------------------------------------------------------------


def venv_python() -> Path:
    return VENV / "bin" / "python"


def venv_commands() -> list[list[str]]:
    """Making the Ultralytics environment: it sees the installed torch and torchvision, so pip keeps them."""
    return [
        [sys.executable, "-m", "venv", "--system-site-packages", str(VENV)],
        [str(venv_python()), "-m", "pip", "install", "--quiet", ULTRALYTICS],
    ]


def ensure_venv() -> None:
    """The Ultralytics environment, made once; it must import the same torch as this interpreter (pip would otherwise
    replace a CUDA build by a CPU wheel, or the reverse, and the comparison would be of two torch builds)."""
    import torch

    if not venv_python().exists():
        for cmd in venv_commands():
            subprocess.run(cmd, check=True)
    probe = "import torch, ultralytics; print(torch.__version__, torch.__file__, ultralytics.__version__)"
    env = {**os.environ, **YOLO_ENV}
    lines = subprocess.run(
        [str(venv_python()), "-c", probe], capture_output=True, text=True, check=True, env=env
    ).stdout
    version, path, found = lines.splitlines()[-1].split()  # the last line: a first import prints a settings notice
    if version != torch.__version__ or Path(path).resolve().is_relative_to(VENV.resolve()):
        raise SystemExit(
            f"{VENV}: torch {version} from {path} replaced the installed torch {torch.__version__}; "
            "remove the venv and install ultralytics with --no-deps and its other requirements"
        )
    if f"ultralytics=={found}" != ULTRALYTICS:
        raise SystemExit(f"{VENV}: ultralytics {found} installed, the benchmark pins {ULTRALYTICS}")
    font = YOLO_CONFIG / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        import matplotlib

        link(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)


def yolo_cli(minutes: float, imgsz: int) -> str:
    """The ``yolo`` command lines equivalent to what the worker does, for the table."""
    train = {**YOLO_TRAIN, "data": "pf.yaml", "imgsz": imgsz, "time": f"{minutes / 60:.4g}"}
    predict = " ".join(f"{k}={v}" for k, v in {**YOLO_PREDICT, "imgsz": imgsz}.items())
    train = " ".join(f"{k}={v}" for k, v in train.items())
    return f"yolo detect train {train}; yolo detect predict model=last.pt source=test/images {predict}"


def guard_network() -> list[str]:
    """Make every connection or name lookup fail, and list them: the run is offline by construction, and any
    download Ultralytics still attempts shows in the log and in bench.json instead of silently succeeding."""
    attempts: list[str] = []

    def refuse(what: str):
        def call(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what} {args[1] if what == 'connect' else args[0]}")
            print(f"benchmark: blocked network {attempts[-1]}", file=sys.stderr, flush=True)
            raise OSError(f"network blocked by the benchmark ({what})")

        return call

    socket.socket.connect = refuse("connect")  # type: ignore[method-assign]
    socket.getaddrinfo = refuse("getaddrinfo")  # type: ignore[assignment]
    return attempts


def yolo_worker(out: Path, minutes: float, imgsz: int, threads: int) -> None:
    """Train YOLOv8n from scratch for ``minutes``, predict the test images with last.pt and write them as COCO JSON.
    Runs in the Ultralytics venv."""
    attempts = guard_network()
    from ultralytics import YOLO
    from ultralytics.utils import torch_utils

    # Ultralytics sets min(8, cores - 1) threads on the CPU (1 on a 2-core machine); give it what deepscope gets.
    torch_utils.NUM_THREADS = threads
    settings = {k: v for k, v in YOLO_TRAIN.items() if k != "model"}
    metrics = YOLO(YOLO_TRAIN["model"]).train(
        data=str(YOLO_DATA / "pf.yaml"),
        imgsz=imgsz,
        time=minutes / 60,
        project=str(out.parent),
        name=out.name,
        exist_ok=True,
        **settings,
    )
    files = sorted((SPLIT / "test" / "images").glob("*.png"))
    results = YOLO(out / "weights" / "last.pt").predict(files, imgsz=imgsz, stream=True, verbose=False, **YOLO_PREDICT)
    images, annotations = [], []
    for image_id, result in enumerate(results, 1):
        height, width = result.orig_shape
        images.append({"id": image_id, "file_name": Path(result.path).name, "width": width, "height": height})
        boxes = result.boxes
        for (x1, y1, x2, y2), score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls) + 1,
                    "score": score,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    coco = {"images": images, "categories": [{"id": 1, "name": "person"}], "annotations": annotations}
    (out / "test_pred.json").write_text(json.dumps(coco))
    summary = {
        "ultralytics_map": metrics.box.map,
        "ultralytics_map_50": metrics.box.map50,
        "network_attempts": attempts,
    }
    (out / "yolo_summary.json").write_text(json.dumps(summary, indent=1))


# ---- runs -----------------------------------------------------------------------------------------------------------


def deepscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepscope", *args]


def deepscope_commands(model: str, minutes: float, imgsz: int, out: Path) -> dict[str, list[str]]:
    # the same pixels as YOLO's letterbox (long side imgsz), all of train used for training, scored as YOLO is (conf 0.001)
    sets = [f"image_size={imgsz}", f"max_size={imgsz}", "val_fraction=0", *MODELS[model]]
    train = deepscope(
        "train",
        "detect",
        "--data",
        str(SPLIT),
        "--model",
        model.split("-")[0],
        "--max-minutes",
        f"{minutes:g}",
        "--out",
        str(out),
        *(arg for s in sets for arg in ("--set", s)),
    )
    predict = deepscope(
        "predict",
        str(out / "best.pt"),
        str(SPLIT / "test" / "images"),
        "--out",
        str(out / "test_pred.json"),
        "--score-threshold",
        "0.001",
    )
    return {"train": train, "predict": predict, "evaluate": evaluate_command(out)}


def evaluate_command(out: Path) -> list[str]:
    """deepscope's COCO scores of the run's detections (also the JSON on the last line of stdout)."""
    return deepscope(
        "evaluate",
        "detect",
        "--pred",
        str(out / "test_pred.json"),
        "--truth",
        str(SPLIT / "test"),
        "--out",
        str(out / "test_scores.json"),
    )


def yolo_commands(minutes: float, imgsz: int, out: Path, threads: int) -> dict[str, list[str]]:
    env = [f"{k}={v}" for k, v in {**YOLO_ENV, "OMP_NUM_THREADS": threads}.items()]
    worker = [
        "env",
        *env,
        str(venv_python()),
        str(Path(__file__).resolve()),
        "--yolo-worker",
        str(out),
        "--minutes",
        f"{minutes:g}",
        "--imgsz",
        str(imgsz),
        "--threads",
        str(threads),
    ]
    return {"train + predict": worker, "evaluate": evaluate_command(out)}


def score(out: Path) -> dict[str, Any]:
    run(evaluate_command(out), out / "evaluate.log")
    return json.loads((out / "test_scores.json").read_text())


def run_yolo(minutes: float, imgsz: int, out: Path, threads: int) -> dict[str, Any]:
    ensure_venv()
    run(yolo_commands(minutes, imgsz, out, threads)["train + predict"], out.parent / f"{out.name}.log")
    summary = json.loads((out / "yolo_summary.json").read_text())
    with open(out / "results.csv") as handle:
        epochs = list(csv.DictReader(handle))  # one row per epoch; "time": seconds since training began, at its end
    return {
        "tool": ULTRALYTICS.replace("==", " "),
        "model": "yolov8n",
        "imgsz": imgsz,
        "precision": "float32",
        "threads": threads,
        "train_min": float(epochs[-1]["time"]) / 60,
        "epochs": len(epochs),
        "command": yolo_cli(minutes, imgsz),
        **summary,
    }


def run_deepscope(model: str, minutes: float, imgsz: int, out: Path, threads: int) -> dict[str, Any]:
    commands = deepscope_commands(model, minutes, imgsz, out)
    run(commands["train"], out.parent / f"{out.name}.log")
    run(commands["predict"], out / "predict.log")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "tool": "deepscope",
        "model": model,
        "imgsz": imgsz,
        "precision": metrics["precision"]["dtype"],
        "threads": threads,
        "train_min": metrics["train_time_s"] / 60,
        "epochs": metrics["epochs_completed"],
        "command": shlex.join(["deepscope", *commands["train"][3:]]).replace(str(CACHE) + "/", ".cache/"),
    }


# ---- table ----------------------------------------------------------------------------------------------------------


def row(bench: dict[str, Any]) -> str:
    s = bench["scores"]
    return (
        f"| {bench['tool']} | {bench['model']} | {bench['imgsz']} | {bench['precision']} | {bench['threads']} | "
        f"{bench['train_min']:.1f} | {bench['epochs']} | {s['map']:.3f} | {s['map_50']:.3f} | {s['map_75']:.3f} | "
        f"`{bench['command']}` |"
    )


def kept_rows(benches: list[dict[str, Any]]) -> list[str]:
    """The section's rows of runs not in ``.cache`` (measured on other machines or days): a rerun replaces only the
    row of its own command, so measuring one model does not delete the others' figures."""
    commands = {f"`{b['command']}` |" for b in benches}
    return [r for r in section_rows("pennfudan_detect") if not any(r.endswith(c) for c in commands)]


def render(splits: dict[str, list[str]]) -> str:
    benches = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*/bench.json"))]
    yolo_checks = [
        f"{b['scores']['map']:.3f} vs Ultralytics' own {b['ultralytics_map']:.3f} ({b['train_min']:.0f} min run)"
        for b in benches
        if "ultralytics_map" in b
    ]
    blocked = sorted({a for b in benches for a in b.get("network_attempts", [])})
    lines = [
        header(command_line()),
        (
            f"Split: the {sum(map(len, splits.values()))} shared Penn-Fudan images (of the original 170) sorted by name, "
            f"permuted with numpy `default_rng(0)`; the first {len(splits['train'])} train, the other {len(splits['test'])} "
            "test. Both tools train from random weights on the CPU for the same wall time and are scored on the test images "
            "by the same metric, `deepscope evaluate detect` (COCO box mAP, 100 detections per image). Both train on all of "
            "train without validation (deepscope `val_fraction=0`) and their last weights are scored, predicted at score "
            "0.001 with at most 100 detections. Size: both scale the longer side to the size given (deepscope "
            "`image_size` = `max_size`, YOLO's letterbox `imgsz`). Both run with "
            "the same number of torch threads (Ultralytics alone would take cores - 1)."
        ),
        "",
        "| tool | model | size | precision | threads | train min | epochs | box mAP@[.5:.95] | mAP@0.5 | mAP@0.75 | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *kept_rows(benches),
        *(row(b) for b in benches),
        "",
        (
            "Published, not comparable (COCO-pretrained, another split: 120 train / 50 test of the 170): torchvision's detection "
            "tutorial fine-tunes Mask R-CNN and reaches box AP 0.799 after 10 epochs (AP50 0.969)."
        ),
    ]
    if yolo_checks:
        lines.append(
            f"Metric check, YOLO's mAP@[.5:.95] by deepscope vs by Ultralytics' validator: {'; '.join(yolo_checks)}."
        )
    kept = kept_rows(benches)
    if kept:
        lines.append(
            f"{len(kept)} rows kept from earlier measurements whose runs are not in .cache (other days or machines): "
            "the Measured line above is that of the rows run now."
        )
    if blocked:
        lines.append(f"Network access Ultralytics attempted and the benchmark blocked: {', '.join(blocked)}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--shared",
        default=str(SHARED / "pennfudan"),
        help="the Penn-Fudan folder (PNGImages/, Annotations_voc_xml/, annotations_coco.json)",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time per model")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--only", choices=["yolo", "deepscope"])
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--yolo-worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.yolo_worker:
        yolo_worker(Path(args.yolo_worker), args.minutes, args.imgsz, args.threads)
        return
    import torch

    threads = torch.get_num_threads()
    runs: dict[str, Path] = {}
    if args.only != "deepscope":
        runs["yolov8n"] = RUNS / f"yolov8n-{args.imgsz}px-{args.minutes:g}min"
    if args.only != "yolo":
        runs.update({model: RUNS / f"{model}-{args.imgsz}px-{args.minutes:g}min" for model in args.models})
    if args.dry_run:
        if "yolov8n" in runs and not venv_python().exists():
            print("# Ultralytics environment\n" + "\n".join(shlex.join(cmd) for cmd in venv_commands()))
        for name, out in runs.items():
            commands = (
                yolo_commands(args.minutes, args.imgsz, out, threads)
                if name == "yolov8n"
                else deepscope_commands(name, args.minutes, args.imgsz, out)
            )
            for step, cmd in commands.items():
                print(f"# {name} {step}\n{shlex.join(cmd)}")
        print(f"# yolov8n equivalent: {yolo_cli(args.minutes, args.imgsz)}")
        return
    splits = make_split(Path(args.shared))
    for name, out in runs.items():
        if (out / "bench.json").exists():
            print(f"{out} is done, kept (delete it to redo)")
            continue
        bench = (
            run_yolo(args.minutes, args.imgsz, out, threads)
            if name == "yolov8n"
            else run_deepscope(name, args.minutes, args.imgsz, out, threads)
        )
        bench["scores"] = score(out)
        bench["where"] = where()  # a later script that reuses this kept run can say where it ran
        (out / "bench.json").write_text(json.dumps(bench, indent=1))
    text = render(splits)
    write_section("pennfudan_detect", "Penn-Fudan detection from scratch (CPU)", text)
    print(text)


if __name__ == "__main__":
    main()
