"""Faults at any moment: a training run killed with SIGKILL anywhere, and resumed each time, ends with the weights,
best checkpoint and history of a run never interrupted, for every task that trains; and a write that fails (a full
disk) leaves the previous file as it was and says so in one line."""

from __future__ import annotations

import errno
import json
import random
import signal
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from conftest import TINY_CENTERNET, needs_native_bf16, pattern_images
from deepscope.atomic import WriteError, leftovers
from deepscope.cli import main
from deepscope.demo.data import write_digits_npz, write_nuclei, write_shapes
from deepscope.engine.checkpoint import load_checkpoint
from deepscope.inference import blockio
from deepscope.inference.blockio import Output, open_input
from faults import run
from test_denoise_task import dn_args, write_clean
from test_segment_task import seg_args
from test_ssl_task import TINY as SSL_TINY

KILLS = 3  # per task, each in the run resumed after the one before
TIMING = ("time_s", "images_per_s")  # history fields that differ between any two runs


def classify_run(root: Path) -> list[str]:
    x, y = pattern_images(60, size=16, seed=0)
    np.savez(root / "data.npz", x_train=x, y_train=y, x_test=x[:30], y_test=y[:30])
    return [
        "train",
        "classify",
        "--data",
        str(root / "data.npz"),
        "--model",
        "cnn",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--amp",
        "off",
        "--set",
        "model_args.widths=[8,16]",
        "--set",
        "augment.cutout=4",
    ]


def segment_run(root: Path) -> list[str]:
    data = write_nuclei(root / "nuclei", train=8, test=2, size=96)
    return seg_args(data, None, "--set", "patches_per_epoch=32", "--set", "augment.affine_degrees=10", epochs=3)


def detect_run(root: Path) -> list[str]:
    data = write_shapes(root / "shapes", train=12, test=3, size=64)
    return ["train", "detect", "--data", str(data), "--epochs", "3", "--device", "cpu", *TINY_CENTERNET]


def denoise_run(root: Path) -> list[str]:
    data = write_clean(root / "clean", n_train=4, n_test=1)
    return dn_args(
        data, None, "n2v", "--set", "noise={kind: gaussian, sigma: 25}", "--set", "patches_per_epoch=96", epochs=3
    )


def ssl_run(root: Path) -> list[str]:
    digits = np.load(write_digits_npz(root / "digits.npz"))
    np.savez(root / "small.npz", x_train=digits["x_train"][:128], y_train=digits["y_train"][:128])
    return [
        "train",
        "ssl",
        "--data",
        str(root / "small.npz"),
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--val-fraction",
        "0",
        *SSL_TINY,
    ]


def classify_bf16_run(root: Path) -> list[str]:
    return [*classify_run(root), "--amp", "bf16"]


RUNS: dict[str, Callable[[Path], list[str]]] = {
    "classify": classify_run,
    "classify-bf16": classify_bf16_run,
    "segment": segment_run,
    "detect": detect_run,
    "denoise": denoise_run,
    "ssl": ssl_run,
}
TASKS = [pytest.param(task, marks=needs_native_bf16) if task.endswith("bf16") else task for task in RUNS]


def history(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in record.items() if k not in TIMING}
        for record in json.loads((run_dir / "metrics.json").read_text())["history"]
    ]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{b}: {key} differs from {a}"


def remaining(run_dir: Path, total_steps: int, epochs: int) -> float:
    """The share of the run's steps still to do, by its last checkpoint (1 when it has none)."""
    if not (run_dir / "last.pt").exists():
        return 1.0
    state = load_checkpoint(run_dir / "last.pt")
    per_epoch = total_steps // epochs
    done = (state["epoch"] + 1) * per_epoch if state["epoch_complete"] else state["epoch"] * per_epoch + state["step"]
    return max(0.0, 1 - done / total_steps)


def kill_and_resume(task: str, root: Path) -> tuple[list[tuple[tuple[str, float], int]], Path, Path]:
    """Run ``task`` once uninterrupted (``root/reference``), then again (``root/killed``) killed at up to ``KILLS``
    seeded moments, each time resumed by the same command with ``--resume``, and finished: the moments and each
    process's exit code (-9: killed), and the two run folders."""
    argv = RUNS[task](root)
    reference, killed = root / "reference", root / "killed"
    assert run([*argv, "--out", str(reference)], root / "reference.log", counts_file=root / "counts.json") == 0
    counts, epochs = json.loads((root / "counts.json").read_text()), int(argv[argv.index("--epochs") + 1])

    rng = random.Random(f"kill -9 {task}")  # seeded: the same moments on every machine (a timed one lands by the clock)
    outcomes: list[tuple[tuple[str, float], int]] = []
    while len(outcomes) < KILLS and not (killed / "metrics.json").exists():
        # a moment within what the resumed run has left to do: a step, a checkpoint write, or a time (the first kill
        # lands for certain; once every step is done, only a time can fall in what is left: testing, the report)
        left = remaining(killed, counts["step"], epochs)
        kind = rng.choice(
            ["step", "checkpoint"] if not outcomes else ["step", "checkpoint", "time"] if left else ["time"]
        )
        if kind == "time":
            moment = (kind, round(rng.uniform(0.1, 0.9) * max(left, 0.1) * counts["seconds"], 3))
        else:  # every epoch left writes at least one checkpoint (last.pt)
            moment = (kind, rng.randint(1, max(1, round(left * (counts["step"] if kind == "step" else epochs)))))
        # the newcomer's way: the same command again with --resume (it also starts a run killed before its first checkpoint)
        outcomes.append(
            (moment, run([*argv, "--out", str(killed), "--resume"], root / f"killed-{len(outcomes)}.log", moment))
        )
    assert run([*argv, "--out", str(killed), "--resume"], root / "finish.log") == 0, (root / "finish.log").read_text()
    return outcomes, reference, killed


def assert_same_run(reference: Path, killed: Path) -> None:
    """The same final and best weights, the same history (but for times), and no half-written file left."""
    assert_same_weights(reference / "last.pt", killed / "last.pt")
    assert_same_weights(reference / "best.pt", killed / "best.pt")
    assert history(killed) == history(reference)
    assert not leftovers(killed), "half-written files were left behind"


@pytest.mark.parametrize("task", TASKS)
def test_killed_anywhere_then_resumed_equals_the_uninterrupted_run(task: str, tmp_path: Path) -> None:
    outcomes, reference, killed = kill_and_resume(task, tmp_path)
    assert outcomes[0][1] == -signal.SIGKILL, outcomes
    assert all(code == -signal.SIGKILL for (kind, _), code in outcomes if kind != "time"), outcomes
    assert_same_run(reference, killed)


# ---- writes that fail: the previous file stays, the error is one line -----------------------------------------------


@pytest.mark.parametrize("name", ["out.tif", "out.h5", "out.zarr"])
def test_a_prediction_that_fails_half_way_leaves_the_previous_one(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    key = "" if name.endswith(".tif") else "probabilities"
    with Output(path, key, (8, 8), np.float32, (8, 8)) as first:
        first.array[...] = 1.0
    with (
        pytest.raises(
            WriteError, match=r"could not write output \(No space left on device\); the previous one is intact"
        ),
        Output(path, key, (8, 8), np.float32, (8, 8)) as second,
    ):
        second.array[:4] = 2.0
        raise OSError(errno.ENOSPC, "No space left on device")
    assert np.array_equal(np.asarray(open_input(path, key or None)[...]), np.ones((8, 8), np.float32))
    with Output(path, key, (8, 8), np.float32, (8, 8)) as third:  # space is back: the new prediction replaces it
        third.array[...] = 3.0
    assert np.array_equal(np.asarray(open_input(path, key or None)[...]), np.full((8, 8), 3, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file or array left
    if name.endswith(".h5"):
        with h5py.File(path) as file:
            assert list(file) == ["probabilities"]


def test_full_disk_while_predicting_is_one_line_and_keeps_the_previous_files(
    tmp_path: Path, monkeypatch, capsys, full_disk
) -> None:
    images, labels, run = tmp_path / "images", tmp_path / "labels", tmp_path / "run"
    images.mkdir()
    labels.mkdir()
    image = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    tifffile.imwrite(images / "a.tif", image)
    scribbles = np.zeros((32, 32), np.uint8)
    scribbles[2:6, 2:20], scribbles[20:24, 4:28] = 1, 2
    tifffile.imwrite(labels / "a.tif", scribbles)
    assert (
        main(
            [
                "pixel",
                "train",
                "--images",
                str(images),
                "--labels",
                str(labels),
                "--out",
                str(run),
                "--no-predict",
                "--filters",
                "gaussian",
                "--scales",
                "1",
                "--trees",
                "4",
            ]
        )
        == 0
    )
    out = tmp_path / "pred"
    predict = ["pixel", "predict", str(run / "classifier.safetensors"), str(images / "a.tif"), "--out", str(out)]
    assert main(predict) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blockio.os, "posix_fallocate", no_space)  # a memory-mapped TIFF reserves its space first
    assert main(predict) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "a_probabilities.tif: cannot write output (No space left on device); the previous one is intact" in err[0]
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()

    maps, scores = tmp_path / "maps", tmp_path / "scores.json"
    maps.mkdir()
    (maps / "a.tif").write_bytes(before["a_classes.tif"])
    scores.write_text("{}")
    full_disk("*.json")
    assert main(["evaluate", "segment", "--pred", str(maps), "--truth", str(maps), "--out", str(scores)]) == 2
    assert (
        "scores.json: could not write evaluation (No space left on device); the previous evaluation is intact"
        in capsys.readouterr().err
    )
    assert scores.read_text() == "{}"
