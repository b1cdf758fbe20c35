"""The engine: training works, resumes exactly after a kill, stops on time, schedules, DDP equivalence."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fast_args, needs_native_bf16, pattern_images, two_process_launcher
from deepscope.cli import main
from deepscope.config import OptimConfig
from deepscope.engine import logging as run_logging
from deepscope.engine import precision
from deepscope.engine.checkpoint import load_checkpoint
from deepscope.engine.logging import PROGRESS_FILE
from deepscope.engine.optim import build_scheduler
from deepscope.engine.precision import resolve_precision
from deepscope.errors import DeepscopeError
from deepscope.models import build_model


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_training_learns_and_writes_run_folder(class_tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(fast_args(class_tree, out, "--epochs", "4")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test_accuracy"] >= 0.9
    for name in [
        "config.yaml",
        "metrics.json",
        "last.pt",
        "best.pt",
        "report.html",
        "train.log",
        "curves.png",
        "confusion.png",
    ]:
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0] * 0.5
    assert "confusion.png" in (out / "report.html").read_text()

    progress = json.loads((out / PROGRESS_FILE).read_text())  # what deepscope serve's training jobs follow
    assert progress["state"] == "done" and progress["stopped"] == "completed"
    assert (progress["epoch"], progress["epochs"], progress["step"], progress["steps"]) == (4, 4, 0, 108 // 16)
    assert progress["history"] == metrics["history"] and progress["elapsed_s"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert "train/samples" in events.Tags()["images"]
    assert {"epoch/train_loss", "epoch/val_accuracy", "train/loss_step"} <= set(events.Tags()["scalars"])
    assert main(fast_args(class_tree, out, "--epochs", "4")) == 2  # refused, the folder holds a run ...
    assert json.loads((out / PROGRESS_FILE).read_text()) == progress  # ... whose progress file stays as it was


def test_gradient_clipping_bounds_each_update(class_tree, tmp_path):
    common = [
        "--model",
        "logreg",
        "--epochs",
        "1",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--schedule",
        "none",
        "--set",
        "optim.momentum=0",
        "--set",
        "optim.weight_decay=0",
        "--set",
        "model_args={}",
    ]
    assert main(fast_args(class_tree, tmp_path / "free", *common)) == 0
    assert main(fast_args(class_tree, tmp_path / "clipped", *common, "--grad-clip", "1e-6")) == 0
    torch.manual_seed(0)  # the trainer seeds with --seed 0 before building the model
    init = build_model("logreg", (3, 12, 12), 3).state_dict()
    steps = 108 // 16  # training images (90% of 120) // batch size
    for run, bound in [("clipped", 0.5 * 1e-6 * steps * 1.001), ("free", None)]:
        moved = max((weights(tmp_path / run / "last.pt")[k] - init[k]).abs().max().item() for k in init)
        if bound is None:
            assert moved > 1e-3
        else:
            assert moved <= bound


def big_npz(tmp_path: Path) -> Path:
    x, y = pattern_images(400, size=16, seed=0)
    path = tmp_path / "big.npz"
    np.savez(path, x_train=x, y_train=y)
    return path


def resume_args(data: Path, out: Path, amp: str = "off") -> list[str]:
    return [
        "train",
        "classify",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "cnn",
        "--epochs",
        "4",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--amp",
        amp,
        "--set",
        "model_args.widths=[16,32]",
        "--set",
        "augment.cutout=4",
    ]


def test_max_minutes_stops_cleanly_and_resume_finishes(tmp_path):
    data = big_npz(tmp_path)
    out = tmp_path / "timed"
    # epochs and steps given: nothing is planned, the clock stops the run
    timed = resume_args(data, out)[:-4] + ["--max-minutes", "0.0001", "--set", "steps_per_epoch=37"]
    assert main(timed) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped"] == "max_minutes"
    assert metrics["epochs_completed"] == 1
    assert (out / "report.html").exists() and (out / "best.pt").exists()
    state = load_checkpoint(out / "last.pt")
    assert not state["epoch_complete"] and state["step"] < 37
    assert main(["train", "classify", "--out", str(out), "--resume", "--max-minutes", "10"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped"] == "completed" and [h["epoch"] for h in metrics["history"]] == [1, 1, 2, 3, 4]


def test_early_stopping_without_improvement(class_tree, tmp_path):
    out = tmp_path / "early"
    assert (
        main(fast_args(class_tree, out, "--epochs", "10", "--lr", "0", "--early-stopping", "2", "--schedule", "none"))
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped"] == "early_stopping"
    assert metrics["epochs_completed"] == 3 and metrics["best_epoch"] == 1


def test_keep_last_puts_the_last_epoch_in_best_pt_whatever_the_monitor_says(class_tree, tmp_path, capsys):
    """With the learning rate at 0 no epoch improves the monitor, so ``keep: best`` holds epoch 1 (above); ``keep:
    last`` holds the last, and an unknown choice is refused in one line."""
    out = tmp_path / "last"
    args = fast_args(class_tree, out, "--epochs", "3", "--lr", "0", "--schedule", "none", "--set", "keep=last")
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 3
    assert load_checkpoint(out / "best.pt")["epoch"] == load_checkpoint(out / "last.pt")["epoch"] == 2
    bad = fast_args(class_tree, tmp_path / "bad", "--epochs", "1", "--set", "keep=newest")
    assert main(bad) != 0
    assert "keep must be best or last, got 'newest'" in capsys.readouterr().err


def lrs(schedule: str, steps: int = 100) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler, when = build_scheduler(opt, OptimConfig(schedule=schedule, lr=1.0, warmup_fraction=0.2), steps)
    assert when == "step"
    values = []
    for _ in range(steps):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return values


def test_schedules_warm_up_peak_and_decay():
    for schedule in ("onecycle", "cosine"):
        values = lrs(schedule)
        assert values[0] == pytest.approx(0.1)
        assert max(values) == pytest.approx(1.0) and int(np.argmax(values)) == 20
        assert values[-1] < 0.05 and min(values) >= 0
    assert lrs("onecycle")[60] == pytest.approx(0.5)


def test_plateau_schedule_cuts_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler, when = build_scheduler(opt, OptimConfig(schedule="plateau", plateau_patience=1, plateau_factor=0.1), 10)
    assert when == "epoch"
    for _ in range(3):
        scheduler.step(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_auto_precision_follows_the_processor(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
    auto = resolve_precision("auto", cpu)
    assert auto.dtype is None and auto.name == "float32" and "emulate" in auto.reason and auto.warning is None
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    auto = resolve_precision("auto", cpu)
    assert auto.dtype is torch.bfloat16 and "natively" in auto.reason and auto.warning is None
    assert resolve_precision("bf16", cpu).warning is None
    assert resolve_precision("off", cpu).dtype is None
    with pytest.raises(DeepscopeError, match="unknown amp mode 'bf32'"):
        resolve_precision("bf32", cpu)


def test_cpu_probe_agrees_with_the_instruction_set():
    """Native bf16 on x86 means AVX-512 BF16 (or AMX), which only processors with AVX-512 have."""
    if precision._is_x86() and precision.cpu_native_bf16():
        assert torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert precision.cpu_description().startswith(torch.backends.cpu.get_cpu_capability())


def test_avx2_dispatch_means_no_native_bf16(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on an AVX-512 BF16 machine: PyTorch runs its AVX2 kernels, bf16 is emulated."""
    if not precision._is_x86():
        pytest.skip("x86 only: the capability names are x86 instruction sets")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    precision.cpu_native_bf16.cache_clear()
    try:
        assert not precision.cpu_native_bf16()
        assert resolve_precision("auto", torch.device("cpu")).name == "float32"
    finally:
        precision.cpu_native_bf16.cache_clear()


def test_emulated_bf16_runs_and_warns_once_in_one_line(class_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
    out = tmp_path / "emulated"
    assert (
        main(
            fast_args(class_tree, out, "--amp", "bf16", "--model", "logreg", "--set", "model_args={}", "--epochs", "1")
        )
        == 0
    )
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --amp bf16") and "no native bf16" in warnings[0]
    assert warnings[0].endswith("use --amp auto")
    assert sum("warning: --amp bf16" in line for line in (out / "train.log").read_text().splitlines()) == 1
    recorded = json.loads((out / "metrics.json").read_text())["precision"]
    assert recorded["mode"] == "bf16" and recorded["dtype"] == "bf16" and "emulated" in recorded["reason"]


@pytest.mark.parametrize("amp", ["off", pytest.param("bf16", marks=needs_native_bf16)])
def test_training_in_each_precision_learns(class_tree, tmp_path, amp):
    out = tmp_path / amp
    assert main(fast_args(class_tree, out, "--amp", amp, "--epochs", "4")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9
    assert metrics["history"][-1]["train_loss"] < 0.5 * metrics["history"][0]["train_loss"]
    assert metrics["precision"]["dtype"] == resolve_precision(amp, torch.device("cpu")).name
    assert f"precision: {metrics['precision']['dtype']}" in (out / "train.log").read_text()


def test_two_gloo_processes_match_one_process(tmp_path):
    x, y = pattern_images(64, size=8, seed=0)
    data = tmp_path / "ddp.npz"
    np.savez(data, x_train=x, y_train=y)
    args = [
        "train",
        "classify",
        "--data",
        str(data),
        "--model",
        "mlp",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--amp",
        "off",
        "--val-fraction",
        "0.25",
        "--set",
        "model_args={hidden: [32], dropout: 0.0, batchnorm: false}",
        "--set",
        "augment.color_jitter=0.3",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes below
    try:
        assert main(args + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = two_process_launcher(29517)
    double = subprocess.run(
        launcher + args + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["processes"] == 2
    assert m1["val"]["confusion_matrix"] == m2["val"]["confusion_matrix"]


def test_progress_file_is_written_at_most_once_a_second_and_says_failed(tmp_path, monkeypatch):
    clock = [1000.0]
    writes: list[dict] = []
    monkeypatch.setattr(run_logging.time, "time", lambda: clock[0])
    real_write = run_logging.atomic_write

    def counting(path, write, what):
        real_write(path, write, what)
        writes.append(json.loads(path.read_text()))

    monkeypatch.setattr(run_logging, "atomic_write", counting)
    log = run_logging.RunLogger(tmp_path / "run")
    log.start_epoch(0, 3, 500)
    for step in range(1, 501):  # every step within one second: no further write
        log.advance(step)
    assert [w["step"] for w in writes] == [0]
    clock[0] += 1.0
    log.update(7, float("nan"), 10.0, "")
    assert writes[-1]["step"] == 7 and writes[-1]["loss"] is None  # a diverged loss is JSON null, not NaN
    log.epoch_done(1, [{"epoch": 1, "train_loss": 0.5}])  # forced, though no time passed
    log.fail("non-finite loss at epoch 2")
    log.close()
    assert len(writes) == 4
    assert writes[2]["history"] == [{"epoch": 1, "train_loss": 0.5}] and writes[2]["epoch"] == 1
    assert writes[3]["state"] == "failed" and writes[3]["error"] == "non-finite loss at epoch 2"
    assert writes[3]["elapsed_s"] == 1.0


def test_rates_show_the_digits_they_need():
    assert [run_logging.per_second(v) for v in (0.48, 0.0123, 3.52, 12.3, 4086.2, 0.0)] == [
        "0.48",
        "0.012",
        "3.5",
        "12",
        "4,086",
        "0",
    ]


def test_log_lines_are_not_wrapped_when_not_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    log = run_logging.RunLogger(tmp_path / "run")
    message = (
        "run written to " + "/".join(["a_long_folder_name"] * 12) + " (report.html, metrics.json, last.pt, best.pt)"
    )
    log.info(message)
    log.start_epoch(0, 1, 10)
    log.update(5, 0.25, 0.48, "val_accuracy 0.5000")  # the progress bar is for terminals only
    log.end_epoch()
    log.close()
    assert capsys.readouterr().err.splitlines() == [message]
    assert (tmp_path / "run" / "train.log").read_text().splitlines()[0].endswith(message)
