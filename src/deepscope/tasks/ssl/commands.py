"""``deepscope train ssl`` and ``evaluate`` of an encoder by probes of its frozen features."""

from __future__ import annotations

import argparse
from typing import Any

from deepscope.errors import DeepscopeError
from deepscope.tasks.options import Result, TaskCommands, option, setting


def evaluate(args: argparse.Namespace, device: Any) -> Result:
    from deepscope.tasks.ssl.task import evaluate_checkpoint

    if not args.probe:
        raise DeepscopeError("ssl checkpoints are evaluated with --probe knn|linear [--fractions ...]")
    return evaluate_checkpoint(args.checkpoint, args.data, args.probe, args.fractions, device)


def export(args: argparse.Namespace) -> Any:
    from deepscope.tasks.ssl.export import exportable

    return exportable(args.checkpoint, args.sample)


COMMANDS = TaskCommands(
    name="ssl",
    summary="self-supervised pretraining of an encoder (SimCLR, VICReg) for transfer",
    data_help="class folders or .npz (labels only judge the features), a plain folder of images, or images/ (+ masks/)",
    model_help="the encoder: resnet18, unet",
    train_options=(setting("--method", choices=["simclr", "vicreg"], help="SimCLR or VICReg"),),
    evaluate_options=(
        option(
            "--probe",
            nargs="+",
            choices=["knn", "linear"],
            help="judge the encoder's frozen features by a kNN classifier and/or linear probes (needs labels)",
        ),
        option("--fractions", type=float, nargs="+", help="label fractions of the linear probes (default 0.01 0.1 1)"),
    ),
    evaluate=evaluate,
    export=export,
)
