"""The ssl plan: the encoder's width by measured step times, the temperature and batch by the passes the run will
train, the monitor's size and the epoch kept; what the user gave stays."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepscope.demo.data import write_digits_npz
from deepscope.engine.distributed import DistInfo
from deepscope.engine.plan import Budget, Plan
from deepscope.tasks.ssl import plan as ssl_plan
from deepscope.tasks.ssl.config import SSLConfig
from deepscope.tasks.ssl.plan import (
    LONG_BATCH,
    LONG_TEMPERATURE,
    MIN_PASSES,
    SHORT_BATCH,
    SHORT_TEMPERATURE,
    SHORT_VIEW_SCALE,
    Fingerprint,
    Monitor,
    make_plan,
    pass_seconds,
)
from deepscope.tasks.ssl.task import SSLTask

CIFAR = Fingerprint(45000, 5000, 10000, 3, 32, 32, "natural", True)


def planned(cfg: SSLConfig, timer=None, fp: Fingerprint = CIFAR, views=None) -> tuple[Plan, list]:
    """The plan of ``cfg`` for a 10-minute budget, and the model_args the timer was asked to measure at the images'
    own size (with the memory format, where ``cfg`` leaves it open). Smaller views cost ``views(scale)`` times the
    step at the images' size (default: their share of the pixels)."""
    asked: list = []

    def timing(args, channels_last, scale):
        if not timer:
            pytest.fail("nothing should be timed")
        if scale != 1.0:
            return timer(args, channels_last) * (views(scale) if views else scale**2)
        asked.append(dict(args) if cfg.channels_last is not None else (dict(args), channels_last))
        return timer(args, channels_last)

    plan = Plan()
    make_plan(cfg, fp, Budget(10.0, True), 5.0, timing, plan)
    return plan, asked


MONITORING = {"monitor_images", "knn_bank", "keep"}


def training(plan: Plan) -> dict:
    """The planned settings of the training itself, without the monitor's."""
    return {k: v for k, v in plan.settings.items() if k not in MONITORING}


def test_the_widest_width_with_enough_passes_is_chosen() -> None:
    # 175 steps of 256 a pass and a validation: 0.2 s a step gives 15.2 passes in 9.2 minutes, 1 s 3.0
    cost = {8: 0.1, 16: 0.2, 32: 1.0, 64: 4.0}
    plan, asked = planned(SSLConfig(data="d", max_minutes=10, channels_last=True), lambda a, _: cost[a["width"]])
    assert asked == [{"width": 8}, {"width": 16}, {"width": 32}]  # narrowest first, stopping at the first too slow
    assert plan.settings["model_args.width"] == 16
    assert any(r.startswith("width timing: width 8") for r in plan.reasons)
    assert plan.settings["temperature"] == SHORT_TEMPERATURE  # 15.2 passes: the short-budget temperature ...
    assert plan.settings["batch_size"] == SHORT_BATCH  # ... and batch
    assert plan.settings["view_scale"] == SHORT_VIEW_SCALE  # ... and views
    assert set(plan.settings) == {"model_args.width", "temperature", "batch_size", "view_scale"} | MONITORING
    plan, asked = planned(SSLConfig(data="d", channels_last=True), lambda a, _: 0.001 * a["width"])
    assert len(asked) == 4 and plan.settings["model_args.width"] == 64
    plan, _ = planned(SSLConfig(data="d", channels_last=True), lambda a, _: 10.0)
    assert plan.settings["model_args.width"] == 8
    assert any("only 0.3 passes" in r for r in plan.reasons) and MIN_PASSES > 0.3


def test_each_width_is_timed_in_both_memory_formats_and_trains_in_the_faster() -> None:
    """Width 8 is faster channels-first, width 16 channels-last but too slow for enough passes in either: width 8
    channels-first, the format planned with the width; a given format is timed alone and kept."""
    cost = {(8, True): 0.19, (8, False): 0.12, (16, True): 0.35, (16, False): 0.45}
    plan, asked = planned(SSLConfig(data="d", max_minutes=10), lambda a, last: cost[a["width"], last])
    assert asked == [({"width": 8}, True), ({"width": 8}, False), ({"width": 16}, True), ({"width": 16}, False)]
    assert plan.settings["model_args.width"] == 8 and plan.settings["channels_last"] is False
    assert any(r.startswith("channels_last = False: channels-first measured faster") for r in plan.reasons)
    assert any("width 8 0.120 s/step (channels-last 0.190 s, channels-first 0.120 s)" in r for r in plan.reasons)
    given = SSLConfig(data="d", max_minutes=10, channels_last=True)
    plan, asked = planned(given, lambda a, last: cost[a["width"], last])
    assert asked == [{"width": 8}, {"width": 16}] and "channels_last" not in plan.settings
    # a given width: the format is still planned, from that encoder's two timings
    cfg = SSLConfig(data="d", max_minutes=10, model_args={"width": 16})
    plan, asked = planned(cfg, lambda a, last: cost[16, last])
    assert asked == [({}, True), ({}, False)] and plan.settings["channels_last"] is True
    plan.apply(cfg)
    assert cfg.channels_last is True and cfg.model_args == {"width": 16}


def test_a_given_width_is_kept_and_timed_for_the_passes_alone() -> None:
    cfg = SSLConfig(data="d", model_args={"width": 8}, channels_last=False)
    plan, asked = planned(cfg, lambda a, _: 0.01)
    assert asked == [{}] and "model_args.width" not in plan.settings
    long = {"temperature": LONG_TEMPERATURE, "batch_size": LONG_BATCH, "view_scale": 1.0}
    assert training(plan) == long  # 289 passes: a long run
    plan.apply(cfg)
    assert cfg.model_args == {"width": 8} and cfg.temperature == LONG_TEMPERATURE


def test_given_epochs_decide_the_temperature_without_timing_and_given_settings_stay() -> None:
    short, asked = planned(SSLConfig(data="d", model_args={"width": 4}, channels_last=True, epochs=6))
    own = {"view_scale": 1.0}  # given epochs: smaller views would buy no passes
    assert asked == [] and training(short) == {"temperature": SHORT_TEMPERATURE, "batch_size": SHORT_BATCH, **own}
    long, _ = planned(SSLConfig(data="d", model_args={"width": 4}, channels_last=True, epochs=100))
    assert training(long) == {"temperature": LONG_TEMPERATURE, "batch_size": LONG_BATCH, **own}
    given = SSLConfig(
        data="d", model_args={"width": 4}, channels_last=True, epochs=6, temperature=0.3, batch_size=64, view_scale=0.5
    )
    plan, _ = planned(given)
    assert training(plan) == {}
    plan.apply(given)
    assert given.temperature == 0.3 and given.batch_size == 64 and given.view_scale == 0.5
    vicreg, asked = planned(
        SSLConfig(data="d", method="vicreg", model_args={"width": 4}, channels_last=True, max_minutes=3)
    )
    # no temperature to plan, views measured for SimCLR only: nothing timed
    assert training(vicreg) == {"batch_size": LONG_BATCH, "view_scale": 1.0} and asked == []
    unet, _ = planned(SSLConfig(data="d", model="unet", epochs=6, channels_last=True))
    assert "model_args.width" not in unet.settings


def test_a_short_run_trains_smaller_views_and_a_long_one_the_images_own() -> None:
    """Fewer than SHORT_PASSES passes at the images' own size: views of 3/4 the side; a long run, a U-Net encoder or
    images too small to shrink keep the images' size; a given scale is kept and the width is timed at it."""
    cfg = SSLConfig(data="d", model_args={"width": 8}, channels_last=True, max_minutes=10)
    plan, asked = planned(cfg, lambda a, _: 0.3)  # 10.1 passes in the budget at 32x32
    assert asked == [{}] and plan.settings["view_scale"] == SHORT_VIEW_SCALE == 0.75
    reason = next(r for r in plan.reasons if r.startswith("view_scale"))
    assert "views of 24x24 px, 0.75 of the images' 32x32: 10.1 passes planned at the images' own size" in reason
    plan.apply(cfg)
    assert cfg.view_scale == 0.75
    # a given temperature leaves only the views needing the passes: the step is still timed once, at the images' size
    cfg = SSLConfig(data="d", model_args={"width": 8}, channels_last=True, max_minutes=10, temperature=0.3)
    plan, asked = planned(cfg, lambda a, _: 0.3)
    assert asked == [{}] and plan.settings["view_scale"] == SHORT_VIEW_SCALE and "temperature" not in plan.settings
    plan, _ = planned(
        SSLConfig(data="d", model_args={"width": 8}, channels_last=True, max_minutes=10), lambda a, _: 0.1
    )
    assert plan.settings["view_scale"] == 1.0  # 30 passes: a long run
    tiny = Fingerprint(45000, 5000, 10000, 3, 20, 20, "natural", True)  # 15x15 views would be under 16 px
    plan, _ = planned(SSLConfig(data="d", model_args={"width": 8}, channels_last=True), lambda a, _: 0.3, tiny)
    assert plan.settings["view_scale"] == 1.0 and any("under 16 px" in r for r in plan.reasons)
    unet, _ = planned(SSLConfig(data="d", model="unet", channels_last=True), lambda a, _: 0.3)
    assert unet.settings["view_scale"] == 1.0
    timed_at: list[float] = []

    def timer(args, last, scale):
        timed_at.append(scale)
        return 0.01

    given = SSLConfig(data="d", max_minutes=10, channels_last=True, view_scale=0.5)
    plan = Plan()
    make_plan(given, CIFAR, Budget(10.0, True), 5.0, timer, plan)
    assert "view_scale" not in plan.settings and set(timed_at) == {0.5}


def test_the_batch_follows_the_passes_and_the_number_of_images() -> None:
    """Few passes: batches of 128 (twice the updates); given steps per epoch keep 256 (they count its batches); a
    set of 150 images is cut into batches of 64, so that it makes at least two."""
    cost = {8: 0.15, 16: 0.3, 32: 1.0, 64: 4.0}
    fixed, _ = planned(SSLConfig(data="d", epochs=6, steps_per_epoch=10, model_args={"width": 4}, channels_last=True))
    assert fixed.settings["batch_size"] == LONG_BATCH
    small = Fingerprint(150, 20, 150, 1, 64, 64, "microscopy", False)
    plan, _ = planned(SSLConfig(data="d", max_minutes=10), lambda a, _: cost[a["width"]] / 100, small)
    assert plan.settings["batch_size"] == 64
    assert any(r.startswith("batch_size = 64:") and "at least two batches" in r for r in plan.reasons)


def test_the_monitor_is_a_sample_and_its_time_is_planned_for() -> None:
    """5000 validation images and 10,000 bank images are sampled down to 2000 and 5000, and the passes are planned
    with that validation's cost; given sizes (0: all) stay, and a small set is monitored whole."""
    plan, _ = planned(
        SSLConfig(data="d", model_args={"width": 4}, channels_last=True, max_minutes=10), lambda a, _: 0.3
    )
    assert plan.settings["monitor_images"] == 2000 and plan.settings["knn_bank"] == 5000
    assert any(r.startswith("monitor_images = 2000: a seeded sample of 2000 of the 5000") for r in plan.reasons)
    whole = Monitor(5000, 10000)
    assert pass_seconds(0.3, CIFAR, 256, Monitor(2000, 5000)) < pass_seconds(0.3, CIFAR, 256, whole)
    given, _ = planned(
        SSLConfig(data="d", model_args={"width": 4}, channels_last=True, epochs=6, monitor_images=0, knn_bank=300)
    )
    assert "monitor_images" not in given.settings and "knn_bank" not in given.settings
    small = Fingerprint(150, 20, 150, 1, 64, 64, "microscopy", False)
    plan, _ = planned(SSLConfig(data="d", model_args={"width": 4}, channels_last=True, epochs=6), fp=small)
    assert plan.settings["monitor_images"] == 20 and "knn_bank" not in plan.settings  # unlabelled: no bank
    assert any(r.startswith("monitor_images = 20: all 20") for r in plan.reasons)


def test_the_last_epoch_is_kept_where_the_schedule_ends_at_zero() -> None:
    plan, _ = planned(SSLConfig(data="d", model_args={"width": 4}, channels_last=True, epochs=6))
    assert plan.settings["keep"] == "last"  # SimCLR's cosine schedule
    plateau = SSLConfig(data="d", model_args={"width": 4}, channels_last=True, epochs=6)
    plateau.optim.schedule = "plateau"
    plan, _ = planned(plateau)
    assert plan.settings["keep"] == "best"
    plan, _ = planned(SSLConfig(data="d", model_args={"width": 4}, channels_last=True, epochs=6, keep="best"))
    assert "keep" not in plan.settings


def test_setup_plans_from_real_steps_and_leaves_the_random_state(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ssl_plan, "WIDTHS", (2, 4))  # quick to time
    data = write_digits_npz(tmp_path / "digits.npz")
    cfg = SSLConfig(data=str(data), batch_size=64, amp="off", max_minutes=5, knn_bank=200)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    task = SSLTask(cfg)
    task.setup(torch.device("cpu"), DistInfo())
    assert torch.equal(torch.rand(3), expected)
    assert cfg.model_args["width"] in (2, 4) and cfg.temperature in (SHORT_TEMPERATURE, LONG_TEMPERATURE)
    assert any(r.startswith("width timing: width 2") for r in task.plan.reasons)
    assert task.plan.fingerprint["images"] == len(task.data.splits["train"])
    val = task.data.splits["val"]
    assert cfg.monitor_images == len(val) == len(task.monitored)  # fewer than 2000: all of them
    assert len(task.bank) == 200 and cfg.keep == "last"


def test_a_set_smaller_than_two_batches_is_timed_and_trained_at_a_batch_that_fits(tmp_path: Path, monkeypatch) -> None:
    """150 images and no batch given: the steps are timed and trained in batches of 64, not refused as fewer than
    one batch of 256."""
    monkeypatch.setattr(ssl_plan, "WIDTHS", (2,))
    data = write_digits_npz(tmp_path / "digits.npz")
    cfg = SSLConfig(data=str(data), amp="off", max_minutes=5, knn_bank=100, max_patches=150)
    task = SSLTask(cfg)
    task.setup(torch.device("cpu"), DistInfo())
    assert len(task.data.splits["train"]) == 150 and cfg.batch_size == 64
    assert any(r.startswith("width timing: width 2") and "(batch 64," in r for r in task.plan.reasons)
    assert len(task.train_batches()) == 2


def test_views_are_made_at_the_planned_scale_and_the_monitor_sees_whole_images(tmp_path: Path) -> None:
    data = write_digits_npz(tmp_path / "digits.npz")  # 8x8 images
    cfg = SSLConfig(
        data=str(data), batch_size=32, amp="off", epochs=1, model_args={"width": 2}, channels_last=False, view_scale=0.5
    )
    task = SSLTask(cfg)
    task.setup(torch.device("cpu"), DistInfo())
    v1, v2, _ = next(iter(task.train_batches()))
    assert v1.shape == v2.shape == (32, 1, 4, 4)
    x, _ = next(iter(task.val_batches()))
    assert x.shape[2:] == (8, 8)
    model = task.build_model()
    assert task.loss(model, (v1, v2, None)).isfinite()  # the pooled encoder takes the smaller views
    assert "knn_accuracy" in task.evaluate(model, task.val_batches())
