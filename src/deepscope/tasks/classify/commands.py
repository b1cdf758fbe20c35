"""``deepscope train classify``, and ``evaluate`` / ``predict`` with a classification checkpoint."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any

from deepscope.tasks.options import Result, TaskCommands, collect_inputs, setting


def evaluate(args: argparse.Namespace, device: Any) -> Result:
    from deepscope.tasks.classify.predict import evaluate_checkpoint

    return evaluate_checkpoint(args.checkpoint, args.data, args.split, device)


def export(args: argparse.Namespace) -> Any:
    from deepscope.tasks.classify.export import exportable

    return exportable(args.checkpoint, args.sample)


def predict(args: argparse.Namespace, device: Any) -> Result:
    """Class probabilities of every image into a CSV file: file, predicted class, one probability column per class."""
    from deepscope.atomic import write_text
    from deepscope.tasks.classify.predict import predict_files

    files = collect_inputs(args.inputs)
    names, probs = predict_files(args.checkpoint, files, device)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["file", "predicted", *[f"prob_{n}" for n in names]])
    for f, p in zip(files, probs):
        writer.writerow([str(f), names[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    write_text(Path(args.out), table.getvalue(), "prediction")
    return {"predictions": len(files), "out": str(args.out)}


COMMANDS = TaskCommands(
    name="classify",
    summary="image classification: logistic regression, MLP, CNN, ResNet",
    data_help="class-folder tree (optionally train/ val/ test/ splits) or an .npz of x_train, y_train, x_test, y_test",
    model_help="logreg, mlp, cnn, resnet18, fastnet (default: planned from the image size and the budget)",
    train_options=(
        setting("--resize", type=int, nargs=2, metavar=("H", "W")),
        setting("--loader", choices=["auto", "memory", "dataloader"]),
    ),
    evaluate=evaluate,
    export=export,
    predict=predict,
)
