"""``deepscope demo [TASK]``: a full run of a task on data bundled with a dependency or generated, so it needs no
download (see :mod:`deepscope.demo.runs`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEMOS = ("classify", "segment", "denoise", "pixel", "detect", "ssl")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from deepscope.demo.runs import run_demo

    out = Path(args.out) if args.out else Path("runs") / f"demo-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_demo(args.task, out)


def add_command(sub: Any) -> None:
    demo = sub.add_parser("demo", help="train and evaluate on bundled data (no download)")
    demo.add_argument("task", nargs="?", default="classify", choices=DEMOS)
    demo.add_argument("--out", help="run folder (default: runs/demo-<task>-<date-time>)")
    demo.set_defaults(func=run)
