"""A trained detector applied from the command line: scores on a labelled split, detections of new images as files."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepscope.config import from_dict
from deepscope.data.detection.annotations import load_detection_data
from deepscope.data.io.images import read_image
from deepscope.engine.checkpoint import load_checkpoint, load_weights
from deepscope.errors import CheckpointError, DeepscopeError
from deepscope.export.runtime import exported_format
from deepscope.inference.loading import load_exported_model
from deepscope.models.detection import build_detector
from deepscope.models.detection.backbones import detection_transform
from deepscope.models.detection.candidates import CandidateDetector, Finish
from deepscope.tasks.detect.config import DetectConfig
from deepscope.tasks.detect.draw import detection_gallery
from deepscope.tasks.detect.predict import Detector, write_coco, write_voc_xml, write_yolo_txt
from deepscope.tasks.detect.task import as_channels, detector_args, load_split, score_items

FORMATS = ("coco", "voc", "yolo")


def load_detector(
    path: str | Path, device: torch.device, overrides: dict[str, Any] | None = None
) -> tuple[Detector, DetectConfig, dict[str, Any]]:
    """The detector of a checkpoint or of its ONNX / TorchScript export, with inference settings
    (``score_threshold``, ``tile``, ...) overridden."""
    exported = exported_format(path) is not None
    module, state = (
        load_exported_model(path, "detect", device) if exported else (None, load_checkpoint(path, task="detect"))
    )
    values = state["config"]
    values["inference"] = {
        **values.get("inference", {}),
        **{k: v for k, v in (overrides or {}).items() if v is not None},
    }
    config = from_dict(DetectConfig, values, f"{path}: config")
    info = state["task_state"]
    if module is not None:
        model = exported_detector(module, config, info, path)
    else:
        model = build_detector(config.model, len(info["class_names"]), info["channels"], **detector_args(config))
        load_weights(model, state["model"], path)
    model.to(device)
    return (
        Detector(model, config.inference, device, masks=info["masks"], batch_size=config.eval_batch_size),
        config,
        info,
    )


def exported_detector(module: nn.Module, config: DetectConfig, info: dict[str, Any], path: str | Path) -> nn.Module:
    """The exported candidates of a detector behind the detectors' interface, resized and finished as the
    checkpoint's detector resizes and finishes (the settings stored in the file)."""
    if not isinstance(info.get("finish"), dict):
        raise CheckpointError(f"{path}: its deepscope metadata lacks the detector's finishing settings")
    args = detector_args(config)
    transform = detection_transform(info["channels"], args["min_size"], args["max_size"]).eval()
    return CandidateDetector(module, Finish(**info["finish"]), transform, int(info.get("min_side", 1))).eval()


def evaluate_checkpoint(
    path: str | Path, data: str | Path, split: str, device: torch.device, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """COCO (and VOC-style) scores of a detection checkpoint on one split of a data set (all of it without splits)."""
    detector, config, info = load_detector(path, device, overrides)
    dataset = load_detection_data(data, class_names=info["class_names"])
    items = load_split(dataset, split)
    with torch.no_grad():
        metrics, _ = score_items(
            detector, items, info["channels"], info["class_names"], config.detection_limit(), info["masks"]
        )
    return {"checkpoint": str(path), "data": str(data), "split": split, "images": len(items), **metrics}


def predict_files(
    path: str | Path,
    files: Sequence[Path],
    out: str | Path,
    device: torch.device,
    fmt: str = "coco",
    draw: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Detections of every file: a COCO JSON file (``out`` ending in .json, or ``out/detections.json``), or VOC XML /
    YOLO txt files in the folder ``out``; ``draw`` adds pictures with the boxes to ``out/pictures``."""
    if fmt not in FORMATS:
        raise DeepscopeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt != "coco" and out.suffix.lower() == ".json":
        raise DeepscopeError(f"--format {fmt} writes one file per image into a folder, not {out.name}")
    detector, config, info = load_detector(path, device, overrides)
    records = []
    pictures: list[tuple[str, np.ndarray, None, dict[str, np.ndarray], str]] = []
    with torch.no_grad():
        for index, file in enumerate(files, 1):
            image = as_channels(read_image(file), info["channels"], str(file))
            pred = detector(image)
            records.append(
                {
                    "id": index,
                    "file_name": file.name,
                    "width": image.shape[1],
                    "height": image.shape[0],
                    "detections": pred,
                }
            )
            if draw and len(pictures) < 16:
                pictures.append(
                    (file.name, image, None, pred, f"{file.name}: {int((pred['scores'] >= 0.5).sum())} above 0.5")
                )
    folder = out.parent if out.suffix.lower() == ".json" else out
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "coco":
        target = out if out.suffix.lower() == ".json" else out / "detections.json"
        write_coco(target, records, info["class_names"])
    elif fmt == "voc":
        target = write_voc_xml(out, records, info["class_names"])
    else:
        target = write_yolo_txt(out, records)
    if pictures:
        (folder / "pictures").mkdir(exist_ok=True)
        detection_gallery(pictures, folder / "pictures" / "detections.png", info["class_names"])
    summary = {
        "images": len(records),
        "detections": int(sum(len(r["detections"]["scores"]) for r in records)),
        "format": fmt,
        "out": str(target),
        "settings": dataclasses.asdict(config.inference),
    }
    return summary


def score_saved_detections(pred: str | Path, truth: str | Path, max_detections: int = 100) -> dict[str, Any]:
    """COCO mAP of any tool's COCO-JSON detections against a COCO JSON file, or against a data folder in any annotation
    format this package reads (one split: point at ``DATA/test`` rather than ``DATA``)."""
    from deepscope.metrics.coco_files import score_coco_files

    truth = Path(truth)
    if not truth.is_dir():
        return score_coco_files(pred, truth, max_detections)
    data = load_detection_data(truth)
    if len(data.splits) != 1:
        raise DeepscopeError(
            f"{truth}: holds the splits {', '.join(sorted(data.splits))}; point --truth at one of them"
        )
    return score_coco_files(pred, data, max_detections)
