"""Self-configuring defaults (tasks/segment/plan.py), threshold tuning and instances merged across blocks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage.draw import disk
from torch import nn

from deepscope.data.segmentation.augment import SegAugmentConfig
from deepscope.engine.plan import Plan, budget_of
from deepscope.errors import DeepscopeError
from deepscope.metrics.instance import image_scores, summarize
from deepscope.postprocess.tiled import tiled_instances
from deepscope.postprocess.watershed import watershed_from_seeds
from deepscope.tasks.segment import tune
from deepscope.tasks.segment.config import InferenceConfig, PostConfig, SegmentConfig
from deepscope.tasks.segment.plan import (
    Fingerprint,
    Hardware,
    make_plan,
    object_diameters,
    plan_target,
    receptive_field,
    semantic_plan,
    validation_seconds,
)
from deepscope.tasks.segment.predict import Predictor, score_output
from deepscope.tasks.segment.task import SegmentTask


def fp(diameters=(10.0, 20.0, 30.0), smallest=(256, 256), groups=None, images=600) -> Fingerprint:
    return Fingerprint(images, 2, 3, smallest, diameters, 40.0, groups or {"grey-dark": images})


def timer(calls: list | None = None, step_s: float = 2.0, pixel_s: float = 1e-5):
    def measure(patch, args, batch):
        if calls is not None:
            calls.append((patch, dict(args), batch))
        return step_s, pixel_s

    return measure


def planned(cfg: SegmentConfig, fingerprint: Fingerprint, hw: Hardware, spent_s: float, measure, pixels: float) -> Plan:
    """The plan of ``cfg`` on data of ``fingerprint`` with the segment task's default budget."""
    plan = Plan()
    budget = budget_of(cfg, SegmentTask.default_budget_minutes)
    make_plan(cfg, fingerprint, hw, budget, spent_s, measure, pixels, plan)
    return plan


def test_object_diameters_are_equivalent_disc_diameters():
    labels = np.zeros((64, 64), np.int32)
    labels[disk((20, 20), 10)] = 1
    labels[disk((45, 45), 5)] = 3  # id 2 unused
    d = object_diameters(labels)
    assert len(d) == 2
    assert d == pytest.approx([20, 10], rel=0.1)  # digital discs are a little smaller


def test_architecture_follows_object_size_and_image_size():
    cfg = SegmentConfig(data="x", max_minutes=20)
    plan = planned(cfg, fp(diameters=(10, 20, 30)), Hardware("cpu", "float32"), 0.0, timer(), 1e7)
    depth = plan.settings["model_args.depth"]
    assert receptive_field(depth) >= 90 and receptive_field(depth - 1) < 90  # smallest depth seeing 3x the p90 diameter
    assert plan.settings["patch_shape"] == [256, 256]
    assert plan.settings["model_args.features"] == 16 and plan.settings["batch_size"] == 8
    small = planned(
        SegmentConfig(data="x", max_minutes=20),
        fp(diameters=(3, 5, 8), smallest=(52, 300)),
        Hardware("cuda", "bf16"),
        0.0,
        timer(),
        1e7,
    )
    assert small.settings["patch_shape"] == [48, 64]  # 8 diameters is 64; capped by the smallest image, divisible by 8
    assert small.settings["model_args.depth"] == 3 and small.settings["model_args.features"] == 32
    assert small.settings["batch_size"] == 16


def test_schedule_fills_the_budget_with_measured_times():
    calls: list = []
    cfg = SegmentConfig(data="x", max_minutes=20)
    plan = planned(cfg, fp(), Hardware("cpu", "float32"), 30.0, timer(calls, step_s=2.0, pixel_s=1e-5), 4e7)
    assert len(calls) == 1 and calls[0][1]["depth"] == plan.settings["model_args.depth"]
    epochs, steps = plan.settings["epochs"], plan.settings["steps_per_epoch"]
    val_s = validation_seconds(cfg, fp(), plan.settings["val_fraction"], 4e7, 1e-5)
    assert val_s > plan.settings["val_fraction"] * 4e7 * 1e-5  # prediction, post-processing and threshold tuning
    assert plan.fingerprint["step_s"] == 2.0 and plan.fingerprint["validation_s"] == pytest.approx(val_s)
    used = epochs * (steps * 2.0 + val_s)
    budget = 20 * 60 - 30.0
    assert 0.8 * budget < used <= budget
    assert epochs * val_s <= 0.15 * budget + 1e-6
    doubled = planned(
        SegmentConfig(data="x", max_minutes=40), fp(), Hardware("cpu", "float32"), 30.0, timer(step_s=2.0), 4e7
    )
    assert doubled.settings["epochs"] * doubled.settings["steps_per_epoch"] > 1.8 * epochs * steps


def test_a_budget_too_short_is_refused_naming_the_minimum():
    """The segment plan's schedule goes through the engine's fit_schedule, which names the budget needed."""
    cfg = SegmentConfig(data="x", max_minutes=0.5)
    with pytest.raises(DeepscopeError, match=r"a budget of 0.5 min is too short.*--max-minutes"):
        planned(cfg, fp(), Hardware("cpu", "float32"), 10.0, timer(step_s=2.0), 4e7)
    given = SegmentConfig(data="x", max_minutes=0.5, epochs=2)  # also when only the steps are open
    with pytest.raises(DeepscopeError, match="too short"):
        planned(given, fp(), Hardware("cpu", "float32"), 10.0, timer(step_s=2.0), 4e7)


def test_the_target_is_planned_flows_for_instance_labels_and_a_given_target_is_kept():
    cfg = SegmentConfig(data="x")
    assert cfg.target is None and cfg.loss == "auto" and cfg.monitor == "mean_score"
    plan = Plan()
    plan_target(SegmentConfig(data="x"), plan, 3)
    assert plan.settings == {"target": "foreground_boundaries"} and "3D" in plan.reasons[0]
    plan = Plan()
    plan_target(cfg, plan, 2)
    assert plan.settings == {"target": "flows"} and "DSB2018" in plan.reasons[0]
    plan.apply(cfg)
    cfg.check_target()
    assert (cfg.target, cfg.loss) == ("flows", "flows")
    for target in ("foreground_boundaries", "stardist", "semantic"):
        given, plan = SegmentConfig(data="x", target=target), Plan()
        plan_target(given, plan, 2)
        assert plan.settings == {} and given.target == target
    # a setting given that flows cannot take plans a target that can
    for setting, target in (({"loss": "dice"}, "foreground_boundaries"), ({"loss": "stardist"}, "stardist")):
        plan = Plan()
        plan_target(SegmentConfig(data="x", **setting), plan, 2)
        assert plan.settings == {"target": target}
    plan = Plan()
    plan_target(SegmentConfig(data="x", inference=InferenceConfig(flip_tta=True)), plan, 2)
    assert plan.settings == {"target": "foreground_boundaries"}
    with pytest.raises(DeepscopeError, match="unknown target"):
        SegmentConfig(data="x", target="nonsense")


def test_explicit_settings_are_kept_and_not_timed():
    calls: list = []
    augment = SegAugmentConfig(flip=False)
    cfg = SegmentConfig(
        data="x",
        epochs=3,
        patches_per_epoch=64,
        batch_size=2,
        patch_shape=[64, 64],
        val_fraction=0.3,
        model_args={"features": 8, "depth": 2, "norm": "instance"},
        invert="never",
        balance="none",
        augment=augment,
        dist_scale=4.0,
    )
    plan = planned(cfg, fp(), Hardware("cpu", "float32"), 0.0, timer(calls), 1e7)
    assert plan.settings == {} and calls == []
    assert any(r.startswith("data:") for r in plan.reasons) and plan.fingerprint["images"] == 600


def test_appearance_mix_plans_inversion_balance_and_stain_augmentation():
    mixed = fp(groups={"grey-dark": 540, "colour-bright": 100, "grey-bright": 16}, images=656)
    plan = planned(SegmentConfig(data="x", max_minutes=20), mixed, Hardware("cpu", "float32"), 0.0, timer(), 1e7)
    assert plan.settings["invert"] == "auto" and plan.settings["balance"] == "auto"
    augment = plan.settings["augment"]
    assert augment.colour_jitter > 0 and augment.hed_jitter == 0  # inverted H&E is not transmitted light
    kept = planned(
        SegmentConfig(data="x", max_minutes=20, invert="never"), mixed, Hardware("cpu", "float32"), 0.0, timer(), 1e7
    )
    assert "invert" not in kept.settings and kept.settings["augment"].hed_jitter > 0
    uniform = planned(
        SegmentConfig(data="x", max_minutes=20),
        fp(diameters=(18, 20, 22)),
        Hardware("cpu", "float32"),
        0.0,
        timer(),
        1e7,
    )
    assert uniform.settings["invert"] == "never" and uniform.settings["balance"] == "none"
    assert uniform.settings["augment"].affine_scale == 0 and uniform.settings["augment"].colour_jitter == 0


def test_given_epochs_without_a_budget_keep_one_pass_over_the_images():
    calls: list = []
    plan = planned(SegmentConfig(data="x", epochs=2), fp(), Hardware("cpu", "float32"), 0.0, timer(calls), 1e7)
    assert "steps_per_epoch" not in plan.settings and "epochs" not in plan.settings and calls == []
    budgeted = planned(
        SegmentConfig(data="x", epochs=2, max_minutes=5), fp(), Hardware("cpu", "float32"), 0.0, timer(calls), 1e7
    )
    assert "steps_per_epoch" in budgeted.settings and "epochs" not in budgeted.settings and len(calls) == 1


def test_semantic_targets_get_fixed_defaults_and_leave_the_schedule_to_the_engine():
    for epochs in (None, 4):
        plan = Plan()
        semantic_plan(SegmentConfig(data="x", target="semantic", epochs=epochs), plan)
        assert "epochs" not in plan.settings and "steps_per_epoch" not in plan.settings
        assert plan.settings["batch_size"] == 8 and plan.settings["invert"] == "never"


class Confident(nn.Module):
    """Logits of probability ``p`` where the (single-channel) image is above 0.5, of 0.02 elsewhere."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # the tiler reads the parameters' device and type
        self.inside, self.outside = math.log(p / (1 - p)), math.log(0.02 / 0.98)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, :1] > 0.5, self.inside, self.outside) + self.weight


def disc_items(count: int, seed: int = 0) -> list[SimpleNamespace]:
    """Validation images of a few separate discs: the image is 1 on them, their labels the objects."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        labels = np.zeros((64, 64), np.int32)
        for k, centre in enumerate(((16, 16), (16, 48), (48, 16), (48, 48))):
            labels[disk(tuple(c + int(rng.integers(-3, 4)) for c in centre), 9, shape=labels.shape)] = k + 1
        image = (labels > 0).astype(np.float32)[None]
        items.append(SimpleNamespace(name=f"v{i}", labels=labels, channels_first=lambda channels, im=image: im))
    return items


def confident_predictor(p: float, threshold: float = 0.5) -> Predictor:
    return Predictor(
        Confident(p),
        "foreground",
        1,
        1,
        (64, 64),
        (8, 8),
        (1, 1),
        InferenceConfig(blend="none"),
        PostConfig(threshold=threshold),
        torch.device("cpu"),
    )


def test_validation_tunes_the_threshold_where_the_untuned_one_finds_nothing(monkeypatch):
    """A model whose probabilities have not reached 0.5 scores 0 at the untuned threshold; the validation scores it
    at the threshold tuned on (at most VAL_TUNE_IMAGES of) its images, so choosing the best epoch sees it improve."""
    predictor, items = confident_predictor(0.4), disc_items(10)
    probs = predictor.probabilities(items[0].channels_first(1))
    untuned, _ = score_output(predictor, items[0], probs, None, None)
    assert untuned["thresholds"]["0.5"]["tp"] == 0 and untuned["thresholds"]["0.5"]["fn"] == 4
    calls = {"probabilities": 0, "instances": 0}
    for name in calls:
        original = getattr(Predictor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Predictor, name, counted)
    records, tuning = tune.tuned_validation(predictor, items)
    assert tuning["post_threshold_scores"]["0.5"] == 0.0 and tuning["post_threshold"] < 0.4
    assert summarize(records)["mean_score"] == pytest.approx(1.0)
    grid = len(tune.validation_thresholds(0.5))
    # every output predicted once; post-processing repeated only on the tuning images
    assert calls["probabilities"] == 10
    assert calls["instances"] == tune.VAL_TUNE_IMAGES * grid + (10 - tune.VAL_TUNE_IMAGES)
    # a confident model keeps the given threshold, which wins every tie
    _, confident = tune.tuned_validation(confident_predictor(0.9), disc_items(3))
    assert confident["post_threshold"] == 0.5


def touching_maps(shape=(200, 260), seed=0) -> np.ndarray:
    """Foreground and boundary maps of random discs, some touching."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for i in range(1, 60):
        labels[disk(tuple(rng.integers(8, s - 8) for s in shape), rng.integers(4, 8), shape=shape)] = i
    from deepscope.data.segmentation.targets import foreground_and_boundaries

    return foreground_and_boundaries(labels)


@pytest.mark.parametrize("block", [64, 100, 37])
def test_tiled_instances_equal_untiled(block):
    maps = touching_maps()

    def segment(m):
        return watershed_from_seeds(m[0], m[1])

    whole = segment(maps)
    tiled = tiled_instances(segment, maps, block, 24)
    # the same objects, up to boundary pixels a watershed assigns by scan order: every object matched at IoU 0.8
    scores = image_scores("tiled", whole, tiled, thresholds=(0.8,))["thresholds"]["0.8"]
    assert scores["fp"] == scores["fn"] == 0 and scores["tp"] == len(np.unique(whole)) - 1
    assert abs(int((tiled > 0).sum()) - int((whole > 0).sum())) < 0.01 * (whole > 0).sum()


def test_tiled_instances_write_into_a_given_array_and_check_sizes():
    maps = touching_maps((120, 90))
    out = np.full((120, 90), -1, np.int32)
    tiled_instances(lambda m: watershed_from_seeds(m[0], m[1]), maps, 50, 20, out=out)
    assert out.min() == 0 and out.max() > 10
    with pytest.raises(Exception, match="block"):
        tiled_instances(lambda m: m[0], maps, (50,), 20)
