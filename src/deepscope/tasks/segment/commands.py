"""``deepscope train segment``, ``evaluate`` / ``predict`` with a segmentation checkpoint, and ``evaluate segment`` of
saved label images."""

from __future__ import annotations

import argparse
from typing import Any

from deepscope.tasks.options import (
    TILED_PREDICT_OPTIONS,
    Result,
    TaskCommands,
    collect_inputs,
    option,
    predictions,
    setting,
    tiled_settings,
)

LABELS_HELP = "the label folder beside images/ (masks, labels, ...)"


def evaluate(args: argparse.Namespace, device: Any) -> Result:
    from deepscope.tasks.segment.predict import evaluate_checkpoint

    return evaluate_checkpoint(args.checkpoint, args.data, args.split, device, args.save_pred, args.labels)


def export(args: argparse.Namespace) -> Any:
    from deepscope.tasks.segment.export import exportable

    return exportable(args.checkpoint, args.sample, args.key)


def predict(args: argparse.Namespace, device: Any) -> Result:
    from deepscope.tasks.segment.predict import predict_files

    files = collect_inputs(args.inputs, volumes=True)
    records = predict_files(
        args.checkpoint,
        files,
        args.out,
        device,
        instances=args.instances,
        flip_tta=args.tta or None,
        **tiled_settings(args),
    )
    return predictions(records, args.out)


def score_saved(args: argparse.Namespace) -> Result:
    """Instance scores of predicted label images against true ones, matched by file name."""
    from deepscope.metrics.instance import evaluate_label_folders

    return evaluate_label_folders(args.pred, args.truth)


COMMANDS = TaskCommands(
    name="segment",
    summary="semantic and instance segmentation with U-Nets, 2D or 3D",
    data_help="images/ + masks/ (or labels/) folders, optionally in train/ val/ test/, or NPZ/HDF5/zarr containers",
    model_help="unet",
    train_options=(
        setting("--labels", metavar="NAME", help=LABELS_HELP + ", needed when both masks/ and labels/ are there"),
    ),
    evaluate_options=(
        option(
            "--labels",
            metavar="NAME",
            help=LABELS_HELP + " (default: the checkpoint's choice, else the one of masks/ and labels/ there)",
        ),
        option("--save-pred", help="folder for the predicted images"),
    ),
    evaluate=evaluate,
    export=export,
    predict_options=(
        *TILED_PREDICT_OPTIONS,
        option("--tta", action="store_true", help="average over flips"),
        option("--instances", action="store_true", help="also write instance labels"),
    ),
    predict=predict,
    score_saved=score_saved,
)
