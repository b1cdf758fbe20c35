"""Helpers shared by the benchmark scripts: machine description and RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
CACHE = HERE / ".cache"
SHARED = HERE.parent.parent / "shared" / "data"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def header(command: str) -> str:
    return f"Measured {datetime.date.today().isoformat()} on {machine()}.\nCommand: `{command}`\n"


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], HERE.parent), *sys.argv[1:]])


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers in RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is rewritten by the script named in it.\n"
    block = f"<!-- {name} -->\n## {title}\n\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def run(cmd: list[str], log: Path) -> float:
    """Run a command, sending its output to ``log``; returns wall seconds; raises on failure."""
    import time

    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"command failed ({result.returncode}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - start


def train_segment(recipe: Path, data: Path, out: Path, *extra: str) -> dict:
    """Train through the CLI with ``recipe`` (fresh run folder) and return the run's metrics.json."""
    import json
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepscope", "train", "segment", "--config", str(recipe), "--data", str(data), "--out", str(out), *extra]
    run(cmd, out.with_suffix(".log"))
    return json.loads((out / "metrics.json").read_text())
