"""Command line: ``deepscope train | evaluate | predict | pixel | serve | demo``.

Settings resolve as defaults < ``--config FILE.yaml`` < ``--set key=value`` < explicit flags;
the resolved config is written beside the checkpoints. Errors caused by the input are printed
as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from deepscope.atomic import write_text
from deepscope.config import check_expansion, from_dict, load_yaml, yaml_problem
from deepscope.data.readers import is_image_file
from deepscope.data.segmentation import is_volume
from deepscope.engine.checkpoint import checkpoint_task
from deepscope.engine.distributed import pick_device, shutdown
from deepscope.engine.precision import MODES
from deepscope.errors import DataError, DeepscopeError, shown
from deepscope.tasks import TASKS, get_task

# flag name -> dotted config key
TRAIN_FLAGS = {
    "data": "data", "model": "model", "epochs": "epochs", "out": "out", "batch_size": "batch_size",
    "lr": "optim.lr", "optimizer": "optim.name", "schedule": "optim.schedule", "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip", "device": "device", "amp": "amp", "seed": "seed", "max_minutes": "max_minutes",
    "early_stopping": "early_stopping", "resize": "resize", "loader": "loader", "val_fraction": "val_fraction",
    "method": "method", "images": "images", "annotations": "annotations", "init_from": "init_from",
    "freeze_encoder": "freeze_encoder", "labels": "labels",
}


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            raise DeepscopeError(f"setting {shown(key)}: {shown(part)} is a single value, not a group of settings")
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
    """``--set KEY=VALUE``, VALUE read as YAML (``safe_load``: a tag that would build a Python object is refused)."""
    if "=" not in text:
        raise DeepscopeError(f"--set {shown(text)}: expected KEY=VALUE, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as exc:
        raise DeepscopeError(f"--set {shown(text)}: the value is not valid YAML ({yaml_problem(exc)})") from None
    return key.strip(), check_expansion(value, f"--set {shown(text)}")


def resolve_train_config(args: argparse.Namespace) -> Any:
    config_cls, _ = get_task(args.task)
    values: dict[str, Any] = {}
    if args.resume:
        if not args.out:
            raise DeepscopeError("--resume needs --out DIR, the folder of the run to continue")
        saved = Path(args.out) / "config.yaml"
        if saved.is_file():
            values = load_yaml(saved)
        elif not (args.data or args.config or getattr(args, "images", None)):  # killed before it saved its settings
            raise DeepscopeError(f"{saved}: nothing to resume, no config.yaml in {args.out}; give the run's settings "
                                 "(--data ...) to start it again")
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
    if not config.data and not getattr(config, "images", None):
        raise DeepscopeError("no data given: pass --data PATH (or data: in the --config file)")
    return config


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from deepscope.engine.trainer import Trainer

    config = resolve_train_config(args)
    _, task_cls = get_task(args.task)
    metrics = Trainer(task_cls(config), resume=args.resume).fit()
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.checkpoint in ("segment", "denoise", "detect"):
        return evaluate_saved_results(args)
    if args.data is None:
        raise DeepscopeError("evaluate CHECKPOINT needs --data PATH")
    device = pick_device(args.device)
    task = checkpoint_task(args.checkpoint)
    if task != "denoise" and (args.tta or args.data_range is not None):
        raise DeepscopeError("--tta and --data-range apply to denoising checkpoints only")
    if task != "detect" and args.max_detections is not None:
        raise DeepscopeError("--max-detections applies to detection only")
    if task != "segment" and args.labels is not None:
        raise DeepscopeError("--labels applies to segmentation only")
    if (task == "ssl") != bool(args.probe) or (args.fractions and task != "ssl"):
        raise DeepscopeError("ssl checkpoints are evaluated with --probe knn|linear [--fractions ...]; --probe and --fractions apply to them only")
    if task == "ssl":
        from deepscope.tasks.ssl.task import evaluate_checkpoint as evaluate_encoder

        result = evaluate_encoder(args.checkpoint, args.data, args.probe, args.fractions, device)
    elif task == "detect":
        from deepscope.tasks.detect.apply import evaluate_checkpoint as evaluate_detector

        result = evaluate_detector(args.checkpoint, args.data, args.split, device, {"max_detections": args.max_detections})
    elif task == "segment":
        from deepscope.tasks.segment.predict import (
            evaluate_checkpoint as evaluate_segmenter,
        )

        result = evaluate_segmenter(args.checkpoint, args.data, args.split, device, args.save_pred, args.labels)
    elif task == "denoise":
        from deepscope.tasks.denoise_predict import (
            evaluate_checkpoint as evaluate_denoiser,
        )

        result = evaluate_denoiser(args.checkpoint, args.data, args.split, device, args.save_pred, args.tta or None, args.data_range)
    else:
        from deepscope.tasks.classify import evaluate_checkpoint

        result = evaluate_checkpoint(args.checkpoint, args.data, args.split, device)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval_{args.split}.json")
    write_text(out, json.dumps(result, indent=2), "evaluation")
    return {k: v for k, v in result.items() if k != "per_image"}


def evaluate_saved_results(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate segment|denoise|detect --pred --truth``: scores of saved results, no model needed (instance scores
    of label images, PSNR/SSIM of denoised images against clean ones, or COCO mAP of a COCO-JSON detection file)."""
    if not args.pred or not args.truth:
        raise DeepscopeError(f"evaluate {args.checkpoint} needs --pred and --truth (images matched by file name)")
    if args.checkpoint == "detect":
        from deepscope.tasks.detect.apply import score_saved_detections

        result = score_saved_detections(args.pred, args.truth, args.max_detections or 100)
    elif args.checkpoint == "segment":
        from deepscope.metrics.instance import evaluate_label_folders

        if args.data_range is not None:
            raise DeepscopeError("--data-range applies to evaluate denoise only")
        result = evaluate_label_folders(args.pred, args.truth)
    else:
        from deepscope.metrics.denoise import evaluate_image_folders

        result = evaluate_image_folders(args.pred, args.truth, args.data_range)
    write_text(Path(args.out or f"eval_{args.checkpoint}.json"), json.dumps(result, indent=2), "evaluation")
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


DETECT_FLAGS = ("overlap", "score_threshold", "max_detections", "format", "draw")


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    task = checkpoint_task(args.checkpoint)
    if task == "detect":
        return predict_detections(args, device)
    for flag in DETECT_FLAGS:
        if getattr(args, flag) not in (None, False):
            raise DeepscopeError(f"--{flag.replace('_', '-')} applies to detection models only")
    if task == "denoise":
        from deepscope.tasks.denoise_predict import predict_files as denoise_files

        if args.instances:
            raise DeepscopeError("--instances applies to segmentation models only")
        files = collect_inputs(args.inputs, volumes=True)
        records = denoise_files(args.checkpoint, files, args.out, device, key=args.key, tile=args.tile, halo=args.halo,
                                blend=args.blend, tta=args.tta or None, batch_size=args.batch_size)
        return {"predictions": len(records), "out": str(args.out), "outputs": records}
    if task == "segment":
        from deepscope.tasks.segment.predict import (
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
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["file", "predicted", *[f"prob_{n}" for n in names]])
    for f, p in zip(files, probs):
        writer.writerow([str(f), names[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    write_text(Path(args.out), table.getvalue(), "prediction")
    return {"predictions": len(files), "out": str(args.out)}


def predict_detections(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """``predict`` with a detection checkpoint: a COCO JSON file (or VOC XML / YOLO txt files), optionally pictures."""
    from deepscope.tasks.detect.apply import predict_files as detect_files

    for flag in ("halo", "blend", "key"):
        if getattr(args, flag) is not None:
            raise DeepscopeError(f"--{flag} applies to segmentation and denoising models only")
    if args.instances or args.tta:
        raise DeepscopeError("--instances and --tta apply to segmentation and denoising models only")
    if args.tile is not None and len(args.tile) not in (1, 2):
        raise DeepscopeError("--tile takes one size or two (height width) for detection")
    overrides = {"tile": (args.tile * 2 if len(args.tile) == 1 else args.tile) if args.tile else None, "overlap": args.overlap,
                 "score_threshold": args.score_threshold, "max_detections": args.max_detections}
    files = collect_inputs(args.inputs)
    return detect_files(args.checkpoint, files, args.out, device, args.format or "coco", args.draw, overrides)


def resolve_pixel_config(args: argparse.Namespace) -> Any:
    """Pixel settings: defaults < --config < --set < flags, as for train."""
    from deepscope.tasks.pixel_config import PixelConfig

    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for assignment in args.set or []:
        set_dotted(values, *parse_assignment(assignment))
    for flag in ("images", "labels", "out", "device", "cache"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.trees is not None:
        set_dotted(values, "forest.trees", args.trees)
    if args.filters or args.scales:
        from deepscope.features import FILTERS, SCALES

        values["features"] = {name: list(args.scales or SCALES) for name in (args.filters or FILTERS)}
    if args.no_predict:
        values["predict"] = False
    return from_dict(PixelConfig, values, args.config or "command line")


def cmd_pixel(args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "train":
        from deepscope.tasks.pixel import train_pixel

        metrics = train_pixel(resolve_pixel_config(args))
        return {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    if args.action == "scribbles":
        return sample_scribble_files(args)
    device = pick_device(args.device)
    files = collect_inputs(args.inputs, volumes=True)
    args.classifier = classifier_file(args.classifier)
    if args.action == "deep":
        from deepscope.tasks.shallow2deep import train_unet_from_forest

        settings: dict[str, Any] = load_yaml(args.config) if args.config else {}
        for assignment in args.set or []:
            set_dotted(settings, *parse_assignment(assignment))
        if args.epochs is not None:
            settings["epochs"] = args.epochs
        settings.setdefault("device", args.device)
        return train_unet_from_forest(args.classifier, files, args.out, device, settings, args.key, args.min_confidence)
    from deepscope.tasks.pixel import InstanceSettings
    from deepscope.tasks.pixel import predict_files as predict_pixels

    settings = InstanceSettings(args.foreground, args.boundary, args.threshold, args.seeds, args.min_distance, args.min_size)
    records = predict_pixels(args.classifier, files, args.out, device, key=args.key, tile=args.tile,
                             instances=settings if args.instances else None)
    return {"predictions": len(records), "out": str(args.out), "outputs": records}


def classifier_file(given: str) -> Path:
    """The classifier file named on the command line: a ``classifier.safetensors``, or a ``deepscope serve`` project (its
    folder or its project file), whose saved classifier is used."""
    from deepscope.serve.folder import ServedFolder
    from deepscope.serve.project import PROJECT_FILE, Project

    path = Path(given)
    if path.is_dir() or path.name == PROJECT_FILE:
        folder = path if path.is_dir() else path.parent
        if not (folder / PROJECT_FILE).is_file():
            raise DataError(f"{folder}: no {PROJECT_FILE} here; give a classifier.safetensors or a folder served by deepscope serve")
        project = Project.load(ServedFolder(folder))
        if project.classifier is None:
            raise DataError(f"{folder / PROJECT_FILE}: no classifier saved yet; save one in the page (Classifier: save)")
        return folder / project.classifier
    return path


def sample_scribble_files(args: argparse.Namespace) -> dict[str, Any]:
    """Sparse labels sampled from dense ground truth files, written as ``<out>/<stem>.tif``."""
    import numpy as np
    import tifffile

    from deepscope.data.scribbles import dense_classes, sample_scribbles
    from deepscope.data.segmentation import read_volume

    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labelled = total = 0
    files = collect_inputs(args.truth, volumes=True)
    for path in files:
        classes = dense_classes(read_volume(path, args.key), args.class_values, args.foreground)
        sparse = sample_scribbles(classes, args.fraction, args.length, rng)
        tifffile.imwrite(out / f"{path.stem}.tif", sparse, compression="zlib")
        labelled += int(np.count_nonzero(sparse))
        total += sparse.size
    return {"files": len(files), "labelled_pixels": labelled, "fraction": round(labelled / total, 6), "out": str(out)}


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from deepscope.serve.app import serve

    serve(args.folder, host=args.host, port=args.port)
    return {"served": str(args.folder)}


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
                       "denoise: noisy/ [+ noisy2/ | clean/] folders, or clean images with --set noise.kind=gaussian; "
                       "detect: images/ + Annotations/ (VOC XML), a COCO .json, labels/ (YOLO txt) or masks/; "
                       "ssl: class folders or .npz (labels only judge the features), a plain folder of images, or images/ (+ masks/)")
    train.add_argument("--images", help="detect: image folder of any layout, with --annotations")
    train.add_argument("--annotations", help="detect: COCO JSON file, or folder of VOC XML, YOLO txt or instance-label images")
    train.add_argument("--labels", metavar="NAME", help="segment: the label folder beside images/ (masks, labels, ...), "
                       "needed when both masks/ and labels/ are there")
    train.add_argument("--init-from", dest="init_from", help="start the model, or its encoder/backbone, from a local weights file "
                       "(a deepscope checkpoint, e.g. of train ssl, or a torchvision state dict); the log says which tensors were taken")
    train.add_argument("--freeze-encoder", dest="freeze_encoder", action="store_true", default=None,
                       help="with --init-from: keep the loaded weights fixed and train only the rest (a linear probe on a classifier)")
    train.add_argument("--model", help="classify: logreg, mlp, cnn, resnet18, fastnet; segment, denoise: unet; "
                       "detect: fcos, retinanet, fasterrcnn, maskrcnn, centernet, detr; ssl (the encoder): resnet18, unet")
    train.add_argument("--method", choices=["n2v", "n2n", "supervised", "simclr", "vicreg"],
                       help="denoise: Noise2Void, Noise2Noise or noisy-to-clean; ssl: SimCLR or VICReg")
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
    train.add_argument("--amp", choices=MODES,
                       help="mixed precision (auto: bf16/fp16 on CUDA, bf16 on CPUs that compute it natively, else float32)")
    train.add_argument("--seed", type=int)
    train.add_argument("--max-minutes", dest="max_minutes", type=float, help="stop cleanly after this wall time")
    train.add_argument("--early-stopping", dest="early_stopping", type=int, metavar="EPOCHS")
    train.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"))
    train.add_argument("--loader", choices=["auto", "memory", "dataloader"])
    train.add_argument("--val-fraction", dest="val_fraction", type=float)
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="any setting, e.g. augment.cutout=8")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="score a checkpoint, or saved results; JSON on the last line of stdout")
    evaluate.add_argument("checkpoint", help="checkpoint file, or 'segment' / 'denoise' / 'detect' to score saved results (--pred, --truth)")
    evaluate.add_argument("--data", help="data set to score the checkpoint on")
    evaluate.add_argument("--pred", help="with 'segment' / 'denoise': folder of predicted label / denoised images; 'detect': COCO JSON")
    evaluate.add_argument("--truth", help="with 'segment' / 'denoise': folder of true label / clean images, matched to --pred by file name; "
                          "'detect': COCO JSON, or a data folder (any annotation format), images matched by file name")
    evaluate.add_argument("--data-range", dest="data_range", type=float,
                          help="denoise: PSNR/SSIM data range (default: the clean images' integer dtype range, e.g. 255)")
    evaluate.add_argument("--tta", action="store_true", help="denoise: average over flips and rotations")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--out", help="JSON file (default: eval_<split>.json beside the checkpoint; eval_<segment|denoise>.json)")
    evaluate.add_argument("--save-pred", dest="save_pred", help="segmentation, denoising: folder for the predicted images")
    evaluate.add_argument("--labels", metavar="NAME", help="segmentation: the label folder beside images/ (default: the "
                          "checkpoint's choice, else the one of masks/ and labels/ there)")
    evaluate.add_argument("--max-detections", dest="max_detections", type=int,
                          help="detection: detections per image the metric counts (default 100, COCO's; raise it for crowded images)")
    evaluate.add_argument("--probe", nargs="+", choices=["knn", "linear"],
                          help="ssl: judge the encoder's frozen features by a kNN classifier and/or linear probes (needs labels)")
    evaluate.add_argument("--fractions", type=float, nargs="+", help="ssl: label fractions of the linear probes (default 0.01 0.1 1)")
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
    predict.add_argument("--overlap", type=int, help="detection: pixels shared by neighbouring tiles (more than the largest object)")
    predict.add_argument("--score-threshold", dest="score_threshold", type=float, help="detection: drop detections scoring lower")
    predict.add_argument("--max-detections", dest="max_detections", type=int, help="detection: most detections kept per image")
    predict.add_argument("--format", choices=["coco", "voc", "yolo"], help="detection: COCO JSON (default), VOC XML or YOLO txt files")
    predict.add_argument("--draw", action="store_true", help="detection: also draw the boxes on the images (pictures/)")
    predict.set_defaults(func=cmd_predict)

    add_pixel_parser(sub)

    serve = sub.add_parser("serve", help="label images in the browser: paint classes, see a live pixel classifier's predictions")
    serve.add_argument("folder", nargs="?", default=".", help="folder of images (or with images/); labels are saved in FOLDER/labels")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; any but the loopback requires the token printed at start")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="train and evaluate on bundled data (no download)")
    demo.add_argument("task", nargs="?", default="classify", choices=["classify", "segment", "denoise", "pixel", "detect", "ssl"])
    demo.add_argument("--out", help="run folder (default: runs/demo-<task>-<date-time>)")
    demo.set_defaults(func=cmd_demo)
    return parser


def add_pixel_parser(sub: Any) -> None:
    pixel = sub.add_parser("pixel", help="shallow pixel classification: filter features + random forest from sparse labels")
    actions = pixel.add_subparsers(dest="action", required=True)

    train = actions.add_parser("train", help="fit a forest on the labelled pixels; save classifier, predictions and report")
    train.add_argument("--images", help="image file or folder (PNG/TIFF/HDF5/zarr/NPZ, 2D or 3D)")
    train.add_argument("--labels", help="sparse label file or folder (0 unlabelled, 1..K classes), matched by file name")
    train.add_argument("--out", help="run folder (default runs/pixel-<date-time>); rerun with the same folder to reuse cached features")
    train.add_argument("--filters", nargs="+", help="features: gaussian log ggm dog structure hessian (default: all)")
    train.add_argument("--scales", type=float, nargs="+", help="feature scales (default 0.3 0.7 1 1.6 3.5 5 10)")
    train.add_argument("--trees", type=int, help="random forest size (default 100)")
    train.add_argument("--cache", help="feature cache folder (default <out>/feature_cache)")
    train.add_argument("--no-predict", dest="no_predict", action="store_true", help="do not write predictions of the labelled images")
    train.add_argument("--config", help="YAML file of pixel settings")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="any setting, e.g. forest.class_weight=balanced")
    train.add_argument("--device", help="where features are computed: auto (default), cpu, cuda")

    predict = actions.add_parser("predict", help="probabilities, class maps (and instances) of new images, tile by tile")
    predict.add_argument("classifier", help="classifier.safetensors of a pixel train run, or a deepscope serve project (folder or its yaml)")
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("--out", required=True, help="folder, .tif, .h5 or .zarr")
    predict.add_argument("--tile", type=int, nargs="+", help="tile size per axis (default: whole image when it fits in memory)")
    predict.add_argument("--instances", action="store_true", help="also write instance labels (seeded watershed)")
    predict.add_argument("--foreground", type=int, nargs="+", help="classes that make objects (default: all but class 1)")
    predict.add_argument("--boundary", type=int, help="class of object boundaries that separates touching objects")
    predict.add_argument("--threshold", type=float, default=0.5, help="foreground probability threshold for instances")
    predict.add_argument("--seeds", choices=["components", "maxima"], default="components",
                         help="instance seeds: components of the foreground, or distance maxima (splits touching round objects)")
    predict.add_argument("--min-distance", dest="min_distance", type=int, default=3, help="between maxima seeds (pixels)")
    predict.add_argument("--min-size", dest="min_size", type=int, default=0, help="drop smaller objects (pixels)")
    predict.add_argument("--key", help="dataset/array inside HDF5, zarr or NPZ inputs")
    predict.add_argument("--device", default="auto")

    scribbles = actions.add_parser("scribbles", help="sample brush-stroke sparse labels from dense ground truth")
    scribbles.add_argument("truth", nargs="+", help="dense label files or folders")
    scribbles.add_argument("--out", required=True, help="folder for the sparse label TIFFs")
    scribbles.add_argument("--fraction", type=float, default=0.001, help="share of pixels to label (default 0.001)")
    scribbles.add_argument("--length", type=int, default=16, help="stroke length in pixels")
    scribbles.add_argument("--foreground", action="store_true", help="instance labels: classes 1 background, 2 objects")
    scribbles.add_argument("--class-values", dest="class_values", type=int, nargs="+", help="label values of classes 1..K (default: the values present)")
    scribbles.add_argument("--key", help="dataset/array inside HDF5, zarr or NPZ files")
    scribbles.add_argument("--seed", type=int, default=0)

    deep = actions.add_parser("deep", help="label images with a forest, then train a semantic U-Net on those labels")
    deep.add_argument("classifier", help="classifier.safetensors of a pixel train run, or a deepscope serve project (folder or its yaml)")
    deep.add_argument("inputs", nargs="+", help="unlabelled image files or folders")
    deep.add_argument("--out", required=True, help="run folder: pseudo/ (images, masks) and unet/ (checkpoints, report)")
    deep.add_argument("--epochs", type=int)
    deep.add_argument("--min-confidence", dest="min_confidence", type=float, default=0.0,
                      help="pixels whose top forest probability is lower are ignored in the loss")
    deep.add_argument("--config", help="YAML file of segment settings for the U-Net")
    deep.add_argument("--set", action="append", metavar="KEY=VALUE", help="any segment setting, e.g. patch_shape=[128,128]")
    deep.add_argument("--key", help="dataset/array inside HDF5, zarr or NPZ inputs")
    deep.add_argument("--device", default="auto")
    pixel.set_defaults(func=cmd_pixel)


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
