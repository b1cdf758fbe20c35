"""What was tried against deepscope's files, processes and readers, with counts: the "Reliability" section of RESULTS.md.

Two parts, both driven by the test suite's own code so the table says what the suite checks on every run:

- kill -9: every task that trains is killed at seeded moments (before a step, half way through a checkpoint write, at
  a time), resumed with the same command each time, and its final and best weights and history compared with an
  uninterrupted run (``tests/test_faults.py``);
- the hostile-input and untrusted-file tests (property-based and explicit), run by pytest with hypothesis' statistics:
  per test, how many generated examples ran and whether every one ended as it must.

Usage: ``python benchmarks/bench_reliability.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from common import HERE, command_line, header, write_section

TESTS = HERE.parent / "tests"
sys.path.insert(0, str(TESTS))

# whole files of hostile-input tests, and the tests of others that inject faults
HOSTILE = [
    "test_untrusted_files.py",
    "test_fuzz_files.py",
    "test_fuzz_readers.py",
    "test_fuzz_annotations.py",
    "test_fuzz_config.py",
    "test_serve_fuzz.py",
    "test_serve_process.py",
    "test_faults.py",
    "test_bad_input.py::test_full_disk_keeps_previous_checkpoint",
    "test_bad_input.py::test_full_disk_during_training_is_a_clear_error",
    "test_serve_labels.py::test_a_full_disk_keeps_the_old_label_file_and_every_stroke",
    "test_serve_labels.py::test_a_change_that_cannot_be_journalled_is_refused_and_changes_nothing",
    "test_serve_labels.py::test_kill_9_loses_no_acknowledged_stroke",
    "test_serve_app.py::test_a_label_file_that_cannot_be_written_is_reported_and_written_later",
    "test_serve_app.py::test_a_stroke_that_cannot_be_journalled_is_a_507",
    "test_serve_app.py::test_changes_under_a_token_need_the_page_origin_and_any_token_is_compared_safely",
]


def kills() -> list[str]:
    """One table row per task: the moments, what became of each process, and whether the runs came out equal."""
    from conftest import cpu_native_bf16
    from test_faults import RUNS, assert_same_run, kill_and_resume

    rows = []
    for task in RUNS:
        if task.endswith("bf16") and not cpu_native_bf16():
            rows.append(f"| {task} | not run: this processor only emulates bf16 | | |")
            continue
        with tempfile.TemporaryDirectory() as root:
            outcomes, reference, killed = kill_and_resume(task, Path(root))
            try:
                assert_same_run(reference, killed)
                equal = "yes"
            except AssertionError as exc:
                equal = f"**no**: {str(exc).splitlines()[0]}"
        moments = ", ".join(
            f"{kind} {at:g}: {'killed' if code == -9 else 'finished first'}" for (kind, at), code in outcomes
        )
        rows.append(f"| {task} | {moments} | {sum(code == -9 for _, code in outcomes)} | {equal} |")
    return rows


def hostile_tests(report: Path) -> tuple[list[str], str]:
    """One row per hostile-input test: its examples (hypothesis) and outcome; and pytest's summary line."""
    files = [f"tests/{name}" for name in HOSTILE]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--hypothesis-show-statistics",
            f"--junitxml={report}",
            *files,
        ],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
    )
    examples: dict[str, int] = {}
    for block in re.split(r"\n(?=\S+::\S+:\n)", done.stdout):
        name = re.match(r"(\S+::\S+):\n", block)
        count = re.search(r"- (\d+) passing examples", block)
        if name and count:
            examples[name.group(1).split("::", 1)[1]] = int(count.group(1))
    rows = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        if case.find("skipped") is not None:
            continue
        outcome = "fail" if case.find("failure") is not None or case.find("error") is not None else "pass"
        module = case.get("classname", "").rsplit(".", 1)[-1]
        shown = examples.get(
            name, examples.get(name.split("[")[0], "inside the test (see above)" if module == "test_serve_fuzz" else 1)
        )
        rows.append(f"| `{module}` | `{name}` | {shown} | {outcome} |")
    summary = next((line for line in reversed(done.stdout.splitlines()) if " passed" in line or " failed" in line), "")
    return rows, summary


def main() -> None:
    kill_rows = kills()
    with tempfile.TemporaryDirectory() as scratch:
        test_rows, summary = hostile_tests(Path(scratch) / "report.xml")
    body = f"""{header(command_line())}
**kill -9 at any moment** (`tests/test_faults.py`): each task trains once uninterrupted, then again killed with SIGKILL
at seeded moments (before optimizer step n, half way through writing its n-th checkpoint, or t seconds in), resumed
each time by the same command with `--resume`; equal means the same `last.pt` and `best.pt` weights, bit for bit, the
same history but for times, and no temporary file left.

| task | moments (in each resumed process) | kills | equal to the uninterrupted run |
| --- | --- | --- | --- |
{chr(10).join(kill_rows)}

**Hostile input, untrusted files, failing writes** (each row a test; examples: generated cases per run, derandomized,
1 for an explicit case; pass: every case ended in a one-line error naming the file or setting, a clean 4xx answer, or
a correct result, with no code run, no traceback, no hang and nothing written where it must not be). Planted files
carry a payload whose unpickling would create a file; files tried: a PyTorch zip checkpoint, a plain pickle checkpoint
and a pickled classifier, against `evaluate`, `predict`, `--init-from`, `--resume`, `pixel predict` and serve's
listing and open. Full disk is simulated (ENOSPC half way through a write, or when space is reserved). The serve
fuzz tests run hypothesis inside each test (one test client per test): 150 query-parameter cases over 10 routes, 120
label bodies, 80 project bodies, 120 proofreading bodies, 60 job and model bodies, 100 guard-header cases, and 15
hostile raw bodies on each of 16 routes.

| file | test | examples | outcome |
| --- | --- | --- | --- |
{chr(10).join(test_rows)}

pytest: {summary}
"""
    write_section("reliability", "Reliability: kills, hostile input, untrusted files, full disks", body)
    print(body)


if __name__ == "__main__":
    main()
