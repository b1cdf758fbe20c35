"""Command line: ``deepscope train | plan | evaluate | predict | pixel | serve | demo``.

This module only assembles what each task declares in ``tasks/<task>/commands.py`` (and serve and the demos in
theirs): ``train TASK`` gets that task's flags alone, and ``evaluate`` / ``predict`` read the checkpoint's task from its
header and run that task's command, refusing flags another task declared. Building the parser imports no torch, so
``deepscope --help`` answers at once; a command imports what it needs when it runs. Errors caused by the input are
printed as one line (``error: ...``) with exit status 2; the result is JSON on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepscope import __version__
from deepscope.errors import DeepscopeError
from deepscope.tasks import TASKS, get_task, task_commands
from deepscope.tasks.options import TRAIN_OPTIONS, Option, Result, TaskCommands, resolve_config, setting


def train_options(commands: TaskCommands) -> tuple[Option, ...]:
    return (
        setting("--data", help=commands.data_help),
        setting("--model", help=commands.model_help),
        *commands.train_options,
        *TRAIN_OPTIONS,
    )


def resolve_train_config(args: argparse.Namespace) -> Any:
    config_cls, _ = get_task(args.task)
    return resolve_config(config_cls, args, train_options(task_commands(args.task)), args.task)


def cmd_train(args: argparse.Namespace) -> Result:
    from deepscope.engine.trainer import Trainer

    config = resolve_train_config(args)
    _, task_cls = get_task(args.task)
    if args.plan_only:
        if args.resume:
            raise DeepscopeError("--plan-only plans a new run; a resumed run keeps the plan it started with")
        plan = Trainer(task_cls(config)).plan().as_dict()
        if not args.json:
            print(f"plan for train {args.task} (nothing trained):")
            for line in plan["reasons"]:
                print(f"  {line}")
        return {"task": args.task, **plan}
    if args.json:
        raise DeepscopeError("--json prints a plan: give it with --plan-only, or use deepscope plan TASK")
    metrics = Trainer(task_cls(config), resume=args.resume).fit()
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


PLAN_FLAGS = (
    ("--plan-only", "print what the data and the budget plan (settings, epochs, steps timed) and train nothing"),
    ("--json", "print the plan as one JSON object on stdout, nothing else (train: with --plan-only)"),
)


def listed(names: Sequence[str]) -> str:
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]


def refuse_foreign_flags(args: argparse.Namespace, owners: dict[str, list[str]], task: str, given: str) -> None:
    """A flag that only other tasks take is an error, not silently ignored; ``given`` says what this command was given."""
    for dest, tasks in owners.items():
        if task not in tasks and getattr(args, dest, None) not in (None, False):
            flag = "--" + dest.replace("_", "-")
            raise DeepscopeError(f"{flag} applies to {listed(tasks) if tasks else 'checkpoints'} only; {given}")


def cmd_evaluate(args: argparse.Namespace) -> Result:
    if args.checkpoint in args.saved_tasks:
        return evaluate_saved_results(args)
    if args.data is None:
        raise DeepscopeError("evaluate CHECKPOINT needs --data PATH")
    if args.pred or args.truth:
        raise DeepscopeError(
            f"--pred and --truth score saved results: deepscope evaluate {'|'.join(args.saved_tasks)} --pred P --truth T"
        )
    from deepscope.engine.distributed import pick_device
    from deepscope.inference.loading import saved_task

    device = pick_device(args.device)
    task = saved_task(args.checkpoint)
    refuse_foreign_flags(args, args.owners, task, f"{args.checkpoint} is a {task} checkpoint (see evaluate --help)")
    result = task_commands(task).evaluate(args, device)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval_{args.split}.json")
    write_json(out, result)
    return {k: v for k, v in result.items() if k != "per_image"}


def evaluate_saved_results(args: argparse.Namespace) -> Result:
    """``evaluate TASK --pred --truth``: scores of saved results (``score_saved`` of the task), no model needed."""
    if not args.pred or not args.truth:
        raise DeepscopeError(f"evaluate {args.checkpoint} needs --pred and --truth (images matched by file name)")
    refuse_foreign_flags(args, args.saved_owners, args.checkpoint, f"these are saved {args.checkpoint} results")
    commands = task_commands(args.checkpoint)
    assert commands.score_saved is not None
    result = commands.score_saved(args)
    write_json(Path(args.out or f"eval_{args.checkpoint}.json"), result)
    return result


def write_json(path: Path, result: Result) -> None:
    from deepscope.atomic import write_text

    write_text(path, json.dumps(result, indent=2), "evaluation")


def is_foreign_package(path: str) -> bool:
    """Whether ``path`` is a bioimage.io package that another tool wrote (no deepscope settings inside)."""
    from deepscope.export.runtime import exported_format, exported_metadata

    return exported_format(path) == "bioimageio" and exported_metadata(path) is None


def predict_foreign_package(args: argparse.Namespace) -> Result:
    """``deepscope predict PACKAGE IMAGES``: the package's own pre- and postprocessing, its ONNX or TorchScript weights."""
    from deepscope.export.packages import predict_package
    from deepscope.tasks.options import collect_inputs, predictions

    refuse_foreign_flags(args, args.owners, "bioimageio", f"{args.checkpoint} is a bioimage.io package")
    records = predict_package(Path(args.checkpoint), collect_inputs(args.inputs, volumes=True), Path(args.out))
    return predictions(records, args.out)


def cmd_predict(args: argparse.Namespace) -> Result:
    from deepscope.engine.distributed import pick_device
    from deepscope.inference.loading import saved_task

    device = pick_device(args.device)
    if is_foreign_package(args.checkpoint):
        return predict_foreign_package(args)
    task = saved_task(args.checkpoint)
    refuse_foreign_flags(args, args.owners, task, f"{args.checkpoint} is a {task} checkpoint (see predict --help)")
    commands = task_commands(task)
    if commands.predict is None:
        raise DeepscopeError(
            f"{args.checkpoint}: the {task} checkpoint has nothing to predict; evaluate it, or train a "
            "task from it with --init-from"
        )
    return commands.predict(args, device)


def cmd_export(args: argparse.Namespace) -> Result:
    from deepscope.engine.checkpoint import checkpoint_task
    from deepscope.export.formats import SUFFIXES, export

    task = checkpoint_task(args.checkpoint)
    commands = task_commands(task)
    assert commands.export is not None, f"{task} declares no export"  # every task exports
    package = args.format == "bioimageio"
    if package and task == "detect":
        raise DeepscopeError(
            f"{args.checkpoint}: the BioImage Model Zoo's format has no convention for detections; export this "
            "detect checkpoint as onnx or torchscript"
        )
    out = (
        Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".zip" if package else SUFFIXES[args.format])
    )
    exportable = commands.export(args)
    if not package:
        return export(exportable, args.format, out)
    from deepscope.export.bioimageio import PackageInfo, write_package

    saved = exportable.state["config"].get("package") or {}
    info = PackageInfo(
        args.name or saved.get("name"),
        args.author or saved.get("authors") or [],
        args.license or saved.get("license"),
        args.description or saved.get("description"),
        args.cover,
    )
    return write_package(exportable, info, out)


def add_task_options(parser: argparse.ArgumentParser, declared: dict[str, tuple[Option, ...]]) -> dict[str, list[str]]:
    """Each task's flags of one command, grouped by the tasks that take them; a flag several tasks declare is added once,
    its help saying what it means for each. Returns flag dest -> tasks that take it."""
    first: dict[str, Option] = {}
    helps: dict[str, dict[str, list[str]]] = {}  # dest -> help text -> tasks
    owners: dict[str, list[str]] = {}
    for task, options in declared.items():
        for opt in options:
            same = {k: v for k, v in opt.settings.items() if k != "help"}
            if opt.dest in first:
                assert same == {k: v for k, v in first[opt.dest].settings.items() if k != "help"}, (
                    f"{task} declares {opt.flags} unlike {owners[opt.dest]}"
                )
            first.setdefault(opt.dest, opt)
            helps.setdefault(opt.dest, {}).setdefault(opt.settings.get("help", ""), []).append(task)
            owners.setdefault(opt.dest, []).append(task)
    groups: dict[tuple[str, ...], Any] = {}
    for dest, opt in first.items():
        key = tuple(owners[dest])
        if key not in groups:
            groups[key] = parser.add_argument_group(f"{listed(key)} checkpoints")
        texts = helps[dest]
        help = (
            next(iter(texts))
            if len(texts) == 1
            else "; ".join(f"{', '.join(ts)}: {text}" for text, ts in texts.items())
        )
        opt.add_to(groups[key], help=help)
    return owners


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepscope", description="Train, evaluate and apply deep learning models for images."
    )
    parser.add_argument("--version", action="version", version=f"deepscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: task_commands(name) for name in sorted(TASKS)}

    train = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model; deepscope train TASK --help lists the flags of one task.",
    )
    tasks = train.add_subparsers(dest="task", required=True, metavar="TASK")
    planner = sub.add_parser(
        "plan",
        help="show what train would plan from the data and the budget, training nothing",
        description="Print the data's fingerprint and the plan with its reasons (steps are timed), train nothing; "
        "deepscope plan TASK --help lists the flags of one task (those of train TASK).",
    )
    plans = planner.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, declared in commands.items():
        for parent, verb, plan_only in ((tasks, "Train", False), (plans, "Plan", True)):
            task = parent.add_parser(name, help=declared.summary, description=f"{verb}: {declared.summary}.")
            for opt in train_options(declared):
                opt.add_to(task)
            for flag, text in PLAN_FLAGS[plan_only:]:
                task.add_argument(flag, action="store_true", help=text)
            task.set_defaults(func=cmd_train, plan_only=plan_only)

    evaluate = sub.add_parser("evaluate", help="score a checkpoint, or saved results; JSON on the last line of stdout")
    evaluate.add_argument(
        "checkpoint",
        help="checkpoint file, or a task (segment, denoise, detect) to score its saved results (--pred, --truth)",
    )
    evaluate.add_argument("--data", help="data set to score the checkpoint on")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument(
        "--out", help="JSON file (default: eval_<split>.json beside the checkpoint; eval_<segment|denoise|detect>.json)"
    )
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument(
        "--pred", help="with 'segment' / 'denoise': folder of predicted label / denoised images; 'detect': COCO JSON"
    )
    evaluate.add_argument(
        "--truth",
        help="with 'segment' / 'denoise': folder of true label / clean images, matched to --pred by file name; "
        "'detect': COCO JSON, or a data folder (any annotation format), images matched by file name",
    )
    owners = add_task_options(evaluate, {name: c.evaluate_options for name, c in commands.items()})
    # evaluate TASK --pred --truth: the tasks that score saved results, and which of their flags that takes
    saved = {name: c.score_options for name, c in commands.items() if c.score_saved}
    saved_owners = {dest: [name for name, dests in saved.items() if dest in dests] for dest in owners}
    evaluate.set_defaults(func=cmd_evaluate, owners=owners, saved_tasks=tuple(saved), saved_owners=saved_owners)

    predict = sub.add_parser(
        "predict",
        help="apply a trained model: classes into a CSV file, segmentations, denoised images or detections into files",
    )
    predict.add_argument("checkpoint")
    predict.add_argument(
        "inputs", nargs="+", help="image files or folders (segmentation, denoising: also TIFF/HDF5/zarr volumes)"
    )
    predict.add_argument(
        "--out",
        required=True,
        help="CSV file (classify); folder, .tif, .h5 or .zarr (segment, denoise); COCO JSON file or folder (detect)",
    )
    predict.add_argument("--device", default="auto")
    owners = add_task_options(predict, {name: c.predict_options for name, c in commands.items() if c.predict})
    predict.set_defaults(func=cmd_predict, owners=owners)

    exporter = sub.add_parser(
        "export",
        help="write a trained network as ONNX or TorchScript, checked against the checkpoint",
        description="Write the network of a checkpoint as ONNX (onnxruntime) or TorchScript, with the settings deepscope "
        "predicts with stored inside; the file is run once on a real image and compared with the checkpoint before "
        "it is kept. deepscope predict takes the file as it takes the checkpoint.",
    )
    exporter.add_argument("checkpoint")
    exporter.add_argument("--format", required=True, choices=["onnx", "torchscript", "bioimageio"])
    exporter.add_argument(
        "--out", help="file to write (default: the checkpoint's name with .onnx, .torchscript or .zip)"
    )
    exporter.add_argument(
        "--sample", help="image to check the export on (default: the first image of the run's data, test split first)"
    )
    exporter.add_argument("--key", help="dataset of --sample in an HDF5/zarr/NPZ container")
    zoo = exporter.add_argument_group("bioimageio packages")
    zoo.add_argument("--name", help="the model's name (default: deepscope TASK RUN-FOLDER)")
    zoo.add_argument("--author", action="append", help="an author's full name (required; once per author)")
    zoo.add_argument("--license", help="SPDX licence id of the package, e.g. MIT or CC-BY-4.0 (required)")
    zoo.add_argument("--description", help="one or two sentences on the model (default: what deepscope trained)")
    zoo.add_argument("--cover", help="PNG or JPEG cover picture (default: the test input beside the test output)")
    exporter.set_defaults(func=cmd_export)

    from deepscope.demo import add_command as add_demo
    from deepscope.serve.command import add_command as add_serve
    from deepscope.tasks.pixel.commands import add_commands as add_pixel

    add_pixel(sub)
    add_serve(sub)
    add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    finished = False
    try:
        result = args.func(args)
        finished = True
    except DeepscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # only a command that trained can have started a process group
            from deepscope.engine.distributed import shutdown

            shutdown(finished)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
