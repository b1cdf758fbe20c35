"""``deepscope train denoise``, ``evaluate`` / ``predict`` with a denoising checkpoint, and ``evaluate denoise`` of saved
images."""

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

DATA_RANGE = option(
    "--data-range", type=float, help="PSNR/SSIM data range (default: the clean images' integer dtype range, e.g. 255)"
)


def evaluate(args: argparse.Namespace, device: Any) -> Result:
    from deepscope.tasks.denoise.predict import evaluate_checkpoint

    return evaluate_checkpoint(
        args.checkpoint, args.data, args.split, device, args.save_pred, args.tta or None, args.data_range
    )


def export(args: argparse.Namespace) -> Any:
    from deepscope.tasks.denoise.export import exportable

    return exportable(args.checkpoint, args.sample, args.key)


def predict(args: argparse.Namespace, device: Any) -> Result:
    from deepscope.tasks.denoise.predict import predict_files

    files = collect_inputs(args.inputs, volumes=True)
    records = predict_files(args.checkpoint, files, args.out, device, tta=args.tta or None, **tiled_settings(args))
    return predictions(records, args.out)


def score_saved(args: argparse.Namespace) -> Result:
    """PSNR/SSIM of denoised images against clean ones, matched by file name."""
    from deepscope.metrics.denoise import evaluate_image_folders

    return evaluate_image_folders(args.pred, args.truth, args.data_range)


COMMANDS = TaskCommands(
    name="denoise",
    summary="denoising: Noise2Void, Noise2Noise or noisy-to-clean U-Nets",
    data_help="noisy/ [+ noisy2/ | clean/] folders, or clean images with --set noise.kind=gaussian",
    model_help="unet",
    train_options=(
        setting(
            "--method",
            choices=["n2v", "n2n", "supervised"],
            help="Noise2Void (noisy images alone), Noise2Noise (pairs of noisy images) or noisy-to-clean",
        ),
    ),
    evaluate_options=(
        DATA_RANGE,
        option("--tta", action="store_true", help="average over flips and rotations"),
        option("--save-pred", help="folder for the predicted images"),
    ),
    evaluate=evaluate,
    export=export,
    predict_options=(
        *TILED_PREDICT_OPTIONS,
        option("--tta", action="store_true", help="average over flips and rotations"),
    ),
    predict=predict,
    score_saved=score_saved,
    score_options=("data_range",),
)
