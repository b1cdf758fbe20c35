"""Helpers shared by the benchmark scripts: machine description and RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from deepscope.engine.precision import cpu_description, resolve_precision

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
CACHE = HERE / ".cache"
# the real data sets: ../shared/data beside the checkout, or DEEPSCOPE_SHARED_DATA (a copy carried to a GPU machine)
SHARED = Path(os.environ.get("DEEPSCOPE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def cpu_name() -> str:
    """The processor's model name from /proc/cpuinfo (or what the platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine() -> str:
    """Processor, its vector capability and what ``--amp auto`` runs in on it, cores, GPU and versions."""
    auto = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu_name()} ({cpu_description()}), {os.cpu_count()} cores{gpu}, `--amp auto` runs {auto.name}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0))


def where() -> dict[str, Any]:
    """When and on what a figure was measured (the short processor name for the table, machine() in full)."""
    return {
        "date": datetime.date.today().isoformat(),
        "processor": f"{cpu_name()} ({cpu_description()})",
        "machine": machine(),
        "cores": cores(),
        "threads": torch.get_num_threads(),
    }


def header(command: str) -> str:
    return f"Measured {datetime.date.today().isoformat()} on {machine()}.\nCommand: `{command}`\n"


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], HERE.parent), *sys.argv[1:]])


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers in RESULTS.md."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nEach section is rewritten by the script named in it.\n"
    )
    block = f"<!-- {name} -->\n## {title}\n\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def section_body(name: str) -> str:
    """The text between the markers of section ``name`` in RESULTS.md; empty when there is none."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    match = re.search(rf"<!-- {re.escape(name)} -->(.*?)<!-- /{re.escape(name)} -->", text, re.DOTALL)
    return match.group(1) if match else ""


def section_rows(name: str) -> list[str]:
    """The table rows (below the header and rule) of section ``name`` in RESULTS.md, to keep rows of other machines."""
    return [line for line in section_body(name).splitlines() if line.startswith("|")][2:]


def kept_lines(name: str, pattern: str) -> dict[str, str]:
    """Lines of section ``name`` in RESULTS.md that match ``pattern`` (its first group is the line's key), by key.

    Scripts that render a section from records stored in the ignored cache call this so that a fresh checkout, which
    has none of those records, rewrites the section without dropping the rows measured before: a row with no record
    keeps its line as RESULTS.md holds it (its own date and processor included)."""
    found = (re.match(pattern, line) for line in section_body(name).splitlines())
    return {m.group(1): m.group(0) for m in found if m}


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
    cmd = [
        sys.executable,
        "-m",
        "deepscope",
        "train",
        "segment",
        "--config",
        str(recipe),
        "--data",
        str(data),
        "--out",
        str(out),
        *extra,
    ]
    run(cmd, out.with_suffix(".log"))
    return json.loads((out / "metrics.json").read_text())
