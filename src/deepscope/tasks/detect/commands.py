"""``deepscope train detect``, ``evaluate`` / ``predict`` with a detection checkpoint, and ``evaluate detect`` of saved
COCO detections."""

from __future__ import annotations

import argparse
from typing import Any

from deepscope.errors import DeepscopeError
from deepscope.tasks.options import Result, TaskCommands, collect_inputs, option, setting

MAX_DETECTIONS = option(
    "--max-detections",
    type=int,
    help="detections per image the metric counts (default 100, COCO's; raise it for crowded images)",
)
NMS_IOU = option(
    "--nms-iou",
    type=float,
    help="IoU above which boxes of one class are duplicates (default: the run's, 0.7 for new runs)",
)


def evaluate(args: argparse.Namespace, device: Any) -> Result:
    from deepscope.tasks.detect.apply import evaluate_checkpoint

    overrides = {"max_detections": args.max_detections, "nms_iou": args.nms_iou}
    return evaluate_checkpoint(args.checkpoint, args.data, args.split, device, overrides)


def predict(args: argparse.Namespace, device: Any) -> Result:
    """A COCO JSON file (or VOC XML / YOLO txt files) of the detections, optionally pictures of them."""
    from deepscope.tasks.detect.apply import predict_files

    if args.tile is not None and len(args.tile) not in (1, 2):
        raise DeepscopeError("--tile takes one size or two (height width) for detection")
    overrides = {
        "tile": (args.tile * 2 if len(args.tile) == 1 else args.tile) if args.tile else None,
        "overlap": args.overlap,
        "score_threshold": args.score_threshold,
        "max_detections": args.max_detections,
        "nms_iou": args.nms_iou,
    }
    files = collect_inputs(args.inputs)
    return predict_files(args.checkpoint, files, args.out, device, args.format or "coco", args.draw, overrides)


def export(args: argparse.Namespace) -> Any:
    from deepscope.tasks.detect.export import exportable

    return exportable(args.checkpoint, args.sample)


def score_saved(args: argparse.Namespace) -> Result:
    """COCO mAP of a COCO-JSON detection file against the true boxes."""
    from deepscope.tasks.detect.apply import score_saved_detections

    return score_saved_detections(args.pred, args.truth, args.max_detections or 100)


COMMANDS = TaskCommands(
    name="detect",
    summary="object detection (and instance masks): FCOS, RetinaNet, Faster/Mask R-CNN, CenterNet, DETR",
    data_help="images/ + Annotations/ (VOC XML), a COCO .json, labels/ (YOLO txt) or masks/",
    model_help="fcos, retinanet, fasterrcnn, maskrcnn, centernet, detr",
    train_options=(
        setting("--images", help="image folder of any layout, with --annotations"),
        setting("--annotations", help="COCO JSON file, or folder of VOC XML, YOLO txt or instance-label images"),
    ),
    evaluate_options=(MAX_DETECTIONS, NMS_IOU),
    evaluate=evaluate,
    predict_options=(
        option("--tile", type=int, nargs="+", help="tile size, one value or two (height width), for large images"),
        option("--overlap", type=int, help="pixels shared by neighbouring tiles (more than the largest object)"),
        option("--score-threshold", type=float, help="drop detections scoring lower"),
        option("--max-detections", type=int, help="most detections kept per image"),
        NMS_IOU,
        option("--format", choices=["coco", "voc", "yolo"], help="COCO JSON (default), VOC XML or YOLO txt files"),
        option("--draw", action="store_true", help="also draw the boxes on the images (pictures/)"),
    ),
    predict=predict,
    export=export,
    score_saved=score_saved,
    score_options=("max_detections",),
)
