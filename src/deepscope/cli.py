"""Command line: ``deepscope train | evaluate | predict | demo``.

Settings resolve as defaults < ``--config FILE.yaml`` < ``--set key=value`` < explicit flags;
the resolved config is written beside the checkpoints. Errors caused by the input are printed
as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from deepscope.config import from_dict, load_yaml
from deepscope.data.readers import is_image_file
from deepscope.data.segmentation import is_volume
from deepscope.engine.checkpoint import checkpoint_task
from deepscope.engine.distributed import pick_device, shutdown
from deepscope.errors import DataError, DeepscopeError
from deepscope.tasks import TASKS, get_task

# flag name -> dotted config key
TRAIN_FLAGS = {
    "data": "data", "model": "model", "epochs": "epochs", "out": "out", "batch_size": "batch_size",
    "lr": "optim.lr", "optimizer": "optim.name", "schedule": "optim.schedule", "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip", "device": "device", "amp": "amp", "seed": "seed", "max_minutes": "max_minutes",
    "early_stopping": "early_stopping", "resize": "resize", "loader": "loader", "val_fraction": "val_fraction",
    "method": "method",
}


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            raise DeepscopeError(f"setting {key!r}: {part!r} is a single value, not a group of settings")
    values[leaf] = value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested update: a config file that sets optim.lr keeps the other optim settings of ``base``."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def parse_assignment(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise DeepscopeError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def resolve_train_config(args: argparse.Namespace) -> Any:
    config_cls, _ = get_task(args.task)
    values: dict[str, Any] = {}
    if args.resume:
        if not args.out:
            raise DeepscopeError("--resume needs --out DIR, the folder of the run to continue")
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise DeepscopeError(f"{saved}: nothing to resume, no config.yaml in {args.out}")
        values = load_yaml(saved)
    if args.config:
        merge(values, load_yaml(args.config))
    for assignment in args.set or []:
        set_dotted(values, *parse_assignment(assignment))
    for flag, key in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_dotted(values, key, value)
    values["task"] = args.task
    config = from_dict(config_cls, values, args.config or "command line")
    if not config.data:
        raise DeepscopeError("no data given: pass --data PATH (or data: in the --config file)")
    return config


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from deepscope.engine.trainer import Trainer

    config = resolve_train_config(args)
    _, task_cls = get_task(args.task)
    metrics = Trainer(task_cls(config), resume=args.resume).fit()
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.checkpoint in ("segment", "denoise"):
        return evaluate_saved_results(args)
    if args.data is None:
        raise DeepscopeError("evaluate CHECKPOINT needs --data PATH")
    device = pick_device(args.device)
    task = checkpoint_task(args.checkpoint)
    if task != "denoise" and (args.tta or args.data_range is not None):
        raise DeepscopeError("--tta and --data-range apply to denoising checkpoints only")
    if task == "segment":
        from deepscope.tasks.segment_predict import (
            evaluate_checkpoint as evaluate_segmenter,
        )

        result = evaluate_segmenter(args.checkpoint, args.data, args.split, device, args.save_pred)
    elif task == "denoise":
        from deepscope.tasks.denoise_predict import (
            evaluate_checkpoint as evaluate_denoiser,
        )

        result = evaluate_denoiser(args.checkpoint, args.data, args.split, device, args.save_pred, args.tta or None, args.data_range)
    else:
        from deepscope.tasks.classify import evaluate_checkpoint

        result = evaluate_checkpoint(args.checkpoint, args.data, args.split, device)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval_{args.split}.json")
    out.write_text(json.dumps(result, indent=2))
    return {k: v for k, v in result.items() if k != "per_image"}


def evaluate_saved_results(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate segment|denoise --pred DIR --truth DIR``: scores of saved results, no model needed (instance scores
    of label images, or PSNR/SSIM of denoised images against clean ones)."""
    if not args.pred or not args.truth:
        raise DeepscopeError(f"evaluate {args.checkpoint} needs --pred DIR and --truth DIR (images matched by file name)")
    if args.checkpoint == "segment":
        from deepscope.metrics.instance import evaluate_label_folders

        if args.data_range is not None:
            raise DeepscopeError("--data-range applies to evaluate denoise only")
        result = evaluate_label_folders(args.pred, args.truth)
    else:
        from deepscope.metrics.denoise import evaluate_image_folders

        result = evaluate_image_folders(args.pred, args.truth, args.data_range)
    Path(args.out or f"eval_{args.checkpoint}.json").write_text(json.dumps(result, indent=2))
    return result


def collect_inputs(inputs: list[str], volumes: bool = False) -> list[Path]:
    """Files named, and the images in folders named; ``volumes`` also takes TIFF/HDF5/zarr/NPZ volumes."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if volumes and path.suffix.lower() == ".zarr":
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p) or (volumes and p.is_file() and is_volume(p)))
            if not found:
                raise DataError(f"{path}: folder holds no images")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: file not found")
    return files


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    task = checkpoint_task(args.checkpoint)
    if task == "denoise":
        from deepscope.tasks.denoise_predict import predict_files as denoise_files

        if args.instances:
            raise DeepscopeError("--instances applies to segmentation models only")
        files = collect_inputs(args.inputs, volumes=True)
        records = denoise_files(args.checkpoint, files, args.out, device, key=args.key, tile=args.tile, halo=args.halo,
                                blend=args.blend, tta=args.tta or None, batch_size=args.batch_size)
        return {"predictions": len(records), "out": str(args.out), "outputs": records}
    if task == "segment":
        from deepscope.tasks.segment_predict import (
            predict_files as predict_segmentation,
        )

        files = collect_inputs(args.inputs, volumes=True)
        records = predict_segmentation(args.checkpoint, files, args.out, device, key=args.key, instances=args.instances,
                                       tile=args.tile, halo=args.halo, blend=args.blend, flip_tta=args.tta or None,
                                       batch_size=args.batch_size)
        return {"predictions": len(records), "out": str(args.out), "outputs": records}
    for flag in ("tile", "halo", "key", "blend", "batch_size"):
        if getattr(args, flag) is not None:
            raise DeepscopeError(f"--{flag.replace('_', '-')} applies to segmentation and denoising models only")
    if args.instances or args.tta:
        raise DeepscopeError("--instances and --tta apply to segmentation (and --tta to denoising) models only")
    from deepscope.tasks.classify import predict_files

    files = collect_inputs(args.inputs)
    names, probs = predict_files(args.checkpoint, files, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "predicted", *[f"prob_{n}" for n in names]])
        for f, p in zip(files, probs):
            writer.writerow([str(f), names[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    return {"predictions": len(files), "out": str(out)}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from deepscope.demo import run_demo

    out = Path(args.out) if args.out else Path("runs") / f"demo-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_demo(args.task, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepscope", description="Train, evaluate and apply deep learning models for images.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model")
    train.add_argument("task", choices=sorted(TASKS))
    train.add_argument("--data", help="classify: class-folder tree or .npz; segment: images/ + masks/ folders or NPZ/HDF5/zarr; "
                       "denoise: noisy/ [+ noisy2/ | clean/] folders, or clean images with --set noise.kind=gaussian")
    train.add_argument("--model", help="classify: logreg, mlp, cnn, resnet18, fastnet; segment, denoise: unet")
    train.add_argument("--method", choices=["n2v", "n2n", "supervised"], help="denoise: Noise2Void, Noise2Noise or noisy-to-clean")
    train.add_argument("--epochs", type=int)
    train.add_argument("--out", help="run folder for checkpoints, logs and report")
    train.add_argument("--config", help="YAML file of settings")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--optimizer", choices=["sgd", "adamw"])
    train.add_argument("--schedule", choices=["onecycle", "cosine", "plateau", "none"])
    train.add_argument("--weight-decay", dest="weight_decay", type=float)
    train.add_argument("--grad-clip", dest="grad_clip", type=float)
    train.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    train.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], help="mixed precision (auto: on for CUDA)")
    train.add_argument("--seed", type=int)
    train.add_argument("--max-minutes", dest="max_minutes", type=float, help="stop cleanly after this wall time")
    train.add_argument("--early-stopping", dest="early_stopping", type=int, metavar="EPOCHS")
    train.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"))
    train.add_argument("--loader", choices=["auto", "memory", "dataloader"])
    train.add_argument("--val-fraction", dest="val_fraction", type=float)
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="any setting, e.g. augment.cutout=8")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="score a checkpoint, or saved results; JSON on the last line of stdout")
    evaluate.add_argument("checkpoint", help="checkpoint file, or 'segment' / 'denoise' to score saved results (--pred, --truth)")
    evaluate.add_argument("--data", help="data set to score the checkpoint on")
    evaluate.add_argument("--pred", help="with 'segment' / 'denoise': folder of predicted label / denoised images")
    evaluate.add_argument("--truth", help="with 'segment' / 'denoise': folder of true label / clean images, matched to --pred by file name")
    evaluate.add_argument("--data-range", dest="data_range", type=float,
                          help="denoise: PSNR/SSIM data range (default: the clean images' integer dtype range, e.g. 255)")
    evaluate.add_argument("--tta", action="store_true", help="denoise: average over flips and rotations")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--out", help="JSON file (default: eval_<split>.json beside the checkpoint; eval_<segment|denoise>.json)")
    evaluate.add_argument("--save-pred", dest="save_pred", help="segmentation, denoising: folder for the predicted images")
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="apply a trained model: classes into a CSV file, segmentations or denoised images into files")
    predict.add_argument("checkpoint")
    predict.add_argument("inputs", nargs="+", help="image files or folders (segmentation: also TIFF/HDF5/zarr volumes)")
    predict.add_argument("--out", required=True, help="CSV file (classification); folder, .tif, .h5 or .zarr (segmentation, denoising)")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--tile", type=int, nargs="+", help="segmentation, denoising: tile size, one value or one per axis")
    predict.add_argument("--halo", type=int, nargs="+", help="segmentation, denoising: context added around each tile")
    predict.add_argument("--blend", choices=["gaussian", "linear", "none"], help="segmentation, denoising: how overlapping tiles are merged")
    predict.add_argument("--tta", action="store_true", help="segmentation: average over flips; denoising: over flips and rotations")
    predict.add_argument("--instances", action="store_true", help="segmentation: also write instance labels")
    predict.add_argument("--key", help="segmentation, denoising: dataset/array inside HDF5, zarr or NPZ inputs")
    predict.add_argument("--batch-size", dest="batch_size", type=int, help="segmentation, denoising: tiles per forward pass")
    predict.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="train and evaluate on bundled data (no download)")
    demo.add_argument("task", nargs="?", default="classify", choices=["classify", "segment", "denoise"])
    demo.add_argument("--out", help="run folder (default: runs/demo-<task>-<date-time>)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except DeepscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
