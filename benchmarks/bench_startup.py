"""How long each command takes before its work starts: the "Start-up" section of RESULTS.md.

Every command is run on input that does not exist, so it stops with a one-line error right where its work would
begin (reading the data or the images): its wall time is the interpreter, the imports and the parsing it pays before
any work. Each is set against ``python -c "import torch"`` (and detection against torch with torchvision, which its
models are built from) on the same machine; the target is at most 0.5 s more. Times are the best of several runs, so
that a busy moment does not count.

Usage: ``python benchmarks/bench_startup.py [--runs 7]`` (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, header, write_section
from deepscope.engine.checkpoint import save_checkpoint

LIMIT_S = 0.5  # what a command may add to the import of the framework it runs on


def wall(cmd: list[str], cwd: Path, runs: int) -> tuple[float, float]:
    """Best and median wall seconds of ``cmd`` over ``runs`` runs."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def commands(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(label, command, baseline) for every command; each stops on missing input where its work would start."""
    missing = str(tmp / "missing")
    out = ["--out", str(tmp / "out")]
    rows: list[tuple[str, list[str], str]] = [("deepscope --help", ["deepscope", "--help"], "none")]
    for task in ("classify", "segment", "denoise", "ssl", "detect"):
        base = "torchvision" if task == "detect" else "torch"
        rows.append((f"deepscope train {task}", ["deepscope", "train", task, "--data", missing, *out], base))
    for task in ("classify", "segment", "denoise", "detect"):
        checkpoint = tmp / f"{task}.pt"
        save_checkpoint({"model": {}, "config": {"task": task}}, checkpoint)
        base = "torchvision" if task == "detect" else "torch"
        rows.append((f"deepscope predict ({task})", ["deepscope", "predict", str(checkpoint), missing, *out], base))
    rows += [
        (
            "deepscope pixel train",
            ["deepscope", "pixel", "train", "--images", missing, "--labels", missing, *out],
            "torch",
        ),
        (
            "deepscope evaluate segment",
            ["deepscope", "evaluate", "segment", "--pred", missing, "--truth", missing],
            "torch",
        ),
        ("deepscope serve", ["deepscope", "serve", missing], "torch"),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        baselines = {
            "none": 0.0,
            "torch": wall([sys.executable, "-c", "import torch"], tmp, args.runs)[0],
            "torchvision": wall([sys.executable, "-c", "import torch, torchvision"], tmp, args.runs)[0],
        }
        lines = [
            "| command | best s | median s | framework import s | added s | within 0.5 s |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for label, cmd, base in commands(tmp):
            best, median = wall(cmd, tmp, args.runs)
            framework = baselines[base]
            added = best - framework
            ok = "yes" if (best < 1.0 if base == "none" else added <= LIMIT_S) else "**no**"
            lines.append(f"| `{label}` | {best:.2f} | {median:.2f} | {framework:.2f} ({base}) | {added:+.2f} | {ok} |")
            print(lines[-1], flush=True)
    body = header(command_line()) + (
        "\nWall time of each command stopped where its work starts (input that does not exist), best of "
        f'{args.runs} runs, against importing the framework it runs on (`python -c "import torch"`; detection: '
        "torch and torchvision). `deepscope --help` imports no torch and must answer in under 1 s.\n\n"
        + "\n".join(lines)
    )
    write_section("startup", "Start-up: time before a command's work starts (CPU)", body)


if __name__ == "__main__":
    main()
