"""The engine's budget planner: schedules that end with the budget, epochs of any length, plans written down."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import pattern_images
from deepscope.cli import main
from deepscope.config import TrainConfig
from deepscope.engine import trainer
from deepscope.engine.checkpoint import load_checkpoint
from deepscope.engine.ema import WeightAverage
from deepscope.engine.plan import Budget, Plan, budget_of, fit_schedule, refit_epochs
from deepscope.engine.stream import EpochBatches
from deepscope.errors import DeepscopeError


def schedule(**given):
    settings = {
        "budget": Budget(10, True),
        "spent_s": 0.0,
        "step_s": 0.1,
        "val_s": 5.0,
        "pass_steps": 100,
        "epochs": None,
        "steps_per_epoch": None,
    }
    plan = Plan()
    return fit_schedule(plan, **{**settings, **given}), plan


def test_open_epochs_are_as_many_passes_as_the_budget_holds():
    result, plan = schedule(val_s=1.0, step_s=0.2)
    # 600 s * 0.93 = 558 s; a pass and its validation take 100 * 0.2 + 1 = 21 s: 27 epochs of ~20.7 s
    assert result.epochs == 27
    assert result.steps_per_epoch == 100  # within 5% of a pass: exactly a pass
    assert plan.settings == {"epochs": 27} and "one pass of 100 steps" in plan.reasons[0]
    total = result.epochs * (result.steps_per_epoch * 0.2 + 1.0)
    assert 0.9 * 558 <= total <= 1.05 * 558  # a whole pass may take up to 5% of the reserve (7%)


def test_an_epoch_is_shortened_or_lengthened_rather_than_the_schedule_cut():
    short, _ = schedule(step_s=1.0, pass_steps=1000, val_s=10.0)  # a pass (1000 s) is more than the budget
    assert short.epochs == 1 and short.steps_per_epoch == (558 - 10)
    costly, plan = schedule(val_s=40.0, pass_steps=100)  # validating after every 1-s pass would take most of it
    assert costly.epochs == int(0.15 * 558 / 40)
    assert costly.steps_per_epoch > 100 and "within 15%" in plan.reasons[0]
    assert costly.epochs * (costly.steps_per_epoch * 0.1 + 40) <= 558


def test_sampled_epochs_validate_about_every_150_seconds():
    result, plan = schedule(pass_steps=None)  # patches drawn at random: no pass to count
    assert result.epochs == round(558 / 150) and result.steps_per_epoch == int((558 / 4 - 5) / 0.1)
    assert list(plan.settings) == ["epochs", "steps_per_epoch"]


def test_epochs_are_not_shorter_than_a_checkpoint_is_worth():
    result, plan = schedule(val_s=0.1, step_s=0.01)  # 1.1-s passes: 507 epochs would spend more on checkpoints
    assert result.epochs == int(558 / 15) and "at least 15 s" in plan.reasons[0]


def test_given_settings_are_kept():
    both, plan = schedule(epochs=3, steps_per_epoch=7)
    assert (both.epochs, both.steps_per_epoch) == (3, 7) and plan.settings == {}
    epochs_given, plan = schedule(epochs=3, step_s=3.0)  # 3 passes of 300 s do not fit: shortened
    assert epochs_given.epochs == 3 and epochs_given.steps_per_epoch == int((558 / 3 - 5) / 3.0)
    assert list(plan.settings) == ["steps_per_epoch"]
    roomy, plan = schedule(epochs=3)  # they fit: whole passes, the run ends before the budget
    assert (roomy.epochs, roomy.steps_per_epoch, plan.settings) == (3, 100, {})


def test_a_budget_too_short_names_the_minimum():
    with pytest.raises(DeepscopeError, match=r"0.5 min is too short.*needs about 1.6 min.*--max-minutes 1.6"):
        schedule(budget=Budget(0.5, True), spent_s=20.0, step_s=3.0, val_s=10.0)


def test_budget_of_defaults_and_rejects_nonsense():
    assert budget_of(TrainConfig(), 30.0) == Budget(30.0, False)
    assert budget_of(TrainConfig(max_minutes=5), 30.0) == Budget(5.0, True)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(DeepscopeError, match="positive number of minutes"):
            budget_of(TrainConfig(max_minutes=bad), 30.0)


def test_plan_applies_dotted_settings():
    config = TrainConfig()
    plan = Plan()
    plan.choose("batch_size", 64, "why")
    plan.choose("model_args.width", 8, "why")
    plan.choose("optim.lr", 0.2, "why")
    plan.apply(config)
    assert (config.batch_size, config.model_args, config.optim.lr) == (64, {"width": 8}, 0.2)
    assert plan.as_dict()["reasons"] == ["batch_size = 64: why", "model_args.width = 8: why", "optim.lr = 0.2: why"]


class Counting:
    """Batches 0..n-1 of pass p as (p, i); counts the passes started."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.started = n, 0, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.started += 1
        return iter([(self.epoch, i) for i in range(self.n)])


@pytest.mark.parametrize("steps", [3, 7, 10, 25])
def test_epochs_cut_one_stream_of_passes(steps):
    inner = Counting(7)
    stream = EpochBatches(inner, steps)
    seen = []
    for epoch in range(6):
        stream.set_epoch(epoch)
        batches = list(stream)
        assert len(batches) == len(stream) == steps
        seen += batches
    assert seen == [divmod(i, 7) for i in range(6 * steps)]  # every pass whole and in order, none repeated
    assert inner.started == -(-6 * steps // 7)  # each pass started once: consecutive epochs continue it
    fresh = EpochBatches(Counting(7), steps)  # a resumed run starts at epoch 4 and sees what the first saw
    fresh.set_epoch(4)
    assert list(fresh) == seen[4 * steps : 5 * steps]


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    x, y = pattern_images(400, size=16, seed=0)
    path = tmp_path_factory.mktemp("plan") / "patterns.npz"
    np.savez(path, x_train=x, y_train=y)
    return path


def classify(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "classify",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "cnn",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--amp",
        "off",
        "--set",
        "model_args.widths=[8,16]",
        *extra,
    ]


def test_a_budget_alone_plans_the_schedule_and_says_why(npz, tmp_path, monkeypatch):
    # steps timed at 0.2 s whatever else the machine runs: a plan of some 70 steps (its wiring into the schedule:
    # the test below, which needs no clock)
    monkeypatch.setattr(trainer, "seconds_per_step", lambda *args: 0.2)
    out = tmp_path / "planned"
    assert main(classify(npz, out, "--max-minutes", "0.3")) == 0
    text = (out / "config.yaml").read_text()
    config = yaml.safe_load(text)
    assert isinstance(config["epochs"], int) and config["epochs"] >= 1
    assert "# budget: 0.3 min" in text and "# timing:" in text and "# epochs = " in text
    assert isinstance(config["steps_per_epoch"], int)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["plan"]["fingerprint"]["step_s"] == 0.2
    assert any(r.startswith("epochs = ") for r in metrics["plan"]["reasons"])
    assert "plan: epochs = " in (out / "train.log").read_text()
    assert "Plan: what was measured and chosen" in (out / "report.html").read_text()


def test_refit_epochs_fill_the_time_left_within_bounds():
    assert refit_epochs(planned=10, epochs=10, done=2, epoch_s=10.0, left_s=80.0) == 10  # as planned: 8 more fit
    assert refit_epochs(planned=10, epochs=10, done=2, epoch_s=10.0, left_s=92.0) == 10  # 9.2 fit: kept (jitter)
    assert refit_epochs(planned=10, epochs=10, done=2, epoch_s=10.0, left_s=76.0) == 10  # 7.6 fit: kept
    assert refit_epochs(planned=10, epochs=10, done=2, epoch_s=8.0, left_s=100.0) == 14  # 12.5 fit -> 12 more
    assert refit_epochs(planned=10, epochs=10, done=2, epoch_s=20.0, left_s=100.0) == 7  # slower: shortened
    assert refit_epochs(planned=10, epochs=10, done=9, epoch_s=20.0, left_s=1.0) == 10  # one more, the clock stops
    assert refit_epochs(planned=10, epochs=10, done=2, epoch_s=1.0, left_s=100.0) == 15  # at most 1.5x the first plan
    # a long schedule is kept within a share of what fits: 100 fit, 95 or 102 left are kept, 94 and 103 are not
    assert refit_epochs(planned=110, epochs=110, done=10, epoch_s=10.0, left_s=1000.0) == 110
    assert refit_epochs(planned=110, epochs=105, done=10, epoch_s=10.0, left_s=1000.0) == 105
    assert refit_epochs(planned=110, epochs=112, done=10, epoch_s=10.0, left_s=1000.0) == 112
    assert refit_epochs(planned=110, epochs=104, done=10, epoch_s=10.0, left_s=1000.0) == 110
    assert refit_epochs(planned=110, epochs=113, done=10, epoch_s=10.0, left_s=1000.0) == 110


def test_revising_a_setting_replaces_its_reason():
    plan = Plan()
    plan.observe("budget: 1 min")
    plan.choose("epochs", 3, "first")
    plan.choose("lr", 0.1, "given")
    plan.revise("epochs", 5, "again")
    assert plan.settings == {"epochs": 5, "lr": 0.1}
    assert plan.reasons == ["budget: 1 min", "epochs = 5: again", "lr = 0.1: given"]


def test_planned_epochs_are_refitted_to_the_budget_as_the_run_goes(npz, tmp_path, monkeypatch):
    # steps timed at 0.2 s where they take milliseconds: the 3 epochs first planned (of at least 15 s each) leave
    # most of the minute unused, so the run re-fits them, up to 1.5x, and ends its learning-rate schedule with them
    monkeypatch.setattr(trainer, "seconds_per_step", lambda *args: 0.2)
    out = tmp_path / "refit"
    assert main(classify(npz, out, "--max-minutes", "1")) == 0
    log = (out / "train.log").read_text()
    first = int(log.split("plan: epochs = ")[1].split(":")[0])
    metrics = json.loads((out / "metrics.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert metrics["epochs_completed"] == config["epochs"] == math.ceil(1.5 * first)
    assert metrics["history"][-1]["lr"] == 0.0  # the one-cycle schedule was rebuilt for the new length
    assert any(r.startswith(f"epochs = {config['epochs']}: re-fitted after epoch") for r in metrics["plan"]["reasons"])
    header = [line for line in (out / "config.yaml").read_text().splitlines() if line.startswith("# epochs = ")]
    assert len(header) == 1 and "re-fitted" in header[0]


def test_the_schedule_spans_the_epochs_of_planned_length(npz, tmp_path):
    out = tmp_path / "spans"
    assert main(classify(npz, out, "--epochs", "2", "--set", "steps_per_epoch=25", "--lr", "0.05")) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    # one-cycle over 2 x 25 steps, 10 of warm-up: after 25 steps 15 of the 40 decaying ones are done; at 50 all
    assert [h["lr"] for h in history] == pytest.approx([0.05 * (1 - 15 / 40), 0.0])


def test_a_budget_too_short_is_refused_before_training(npz, tmp_path, capsys):
    out = tmp_path / "short"
    assert main(classify(npz, out, "--max-minutes", "0.001")) == 2
    error = capsys.readouterr().err
    assert "too short" in error and "give --max-minutes" in error
    assert not (out / "last.pt").exists()


def test_epochs_across_passes_resume_exactly(npz, tmp_path):
    # 360 training images in batches of 32: 11 steps a pass; epochs of 25 steps span passes
    given = ["--epochs", "3", "--set", "steps_per_epoch=25"]
    assert main(classify(npz, tmp_path / "whole", *given)) == 0
    cut = tmp_path / "cut"
    assert main(classify(npz, cut, *given, "--max-minutes", "0.0001")) == 0
    assert not load_checkpoint(cut / "last.pt")["epoch_complete"]
    assert main(["train", "classify", "--out", str(cut), "--resume", "--max-minutes", "10"]) == 0
    whole, resumed = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(cut / "last.pt")
    assert resumed["epoch"] == whole["epoch"] == 2
    for key, value in whole["model"].items():
        assert np.array_equal(value.numpy(), resumed["model"][key].numpy()), key


def test_plan_prints_the_plan_and_trains_nothing(npz, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "seconds_per_step", lambda *args: 0.01)
    out = tmp_path / "never"
    flags = ["--data", str(npz), "--out", str(out), "--model", "cnn", "--device", "cpu", "--max-minutes", "2"]
    assert main(["plan", "classify", *flags, "--json"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1  # the JSON alone
    plan = json.loads(printed[0])
    assert plan["task"] == "classify" and isinstance(plan["settings"]["epochs"], int)
    assert plan["fingerprint"]["step_s"] == 0.01 and plan["fingerprint"]["budget_minutes"] == 2
    assert main(["train", "classify", *flags, "--plan-only"]) == 0
    text = capsys.readouterr().out
    assert "plan for train classify (nothing trained):" in text and "  epochs = " in text
    assert not out.exists()
    assert main(["train", "classify", *flags, "--json"]) == 2
    assert "--json prints a plan" in capsys.readouterr().err


def test_weight_average_follows_its_ramp():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    average = WeightAverage(model, decay=0.5, total_steps=10)  # ramp: 10% of 10 steps -> 1 step
    expected = 0.0
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(float(step))
        average.update(model)
        weight = 1.0 - 0.5 * (1.0 - math.exp(-(step - 1) / 1.0))  # the first update copies
        expected = step if step == 1 else expected + weight * (step - expected)
        assert float(average.module.weight) == pytest.approx(expected)
    assert average.updates == 4
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(DeepscopeError, match="--ema must be a decay between 0 and 1"):
            WeightAverage(model, decay=decay, total_steps=10)


def test_ema_is_what_is_saved_and_resumes_exactly(npz, tmp_path):
    given = ["--epochs", "3", "--ema", "0.9", "--set", "steps_per_epoch=12"]
    assert main(classify(npz, tmp_path / "whole", *given)) == 0
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    assert whole["ema_updates"] == 36
    assert any(not torch.equal(whole["model"][k], whole["train_model"][k]) for k in whole["model"])
    cut = tmp_path / "cut"
    assert main(classify(npz, cut, *given, "--max-minutes", "0.0001")) == 0
    assert main(["train", "classify", "--out", str(cut), "--resume", "--max-minutes", "10"]) == 0
    resumed = load_checkpoint(cut / "last.pt")
    for part in ("model", "train_model"):
        for key, value in whole[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
