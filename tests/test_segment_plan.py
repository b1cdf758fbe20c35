"""Self-configuring defaults (tasks/segment/plan.py), threshold tuning and instances merged across blocks."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from deepscope.data.segmentation.augment import SegAugmentConfig
from deepscope.metrics.instance import image_scores
from deepscope.postprocess.tiled import tiled_instances
from deepscope.postprocess.watershed import watershed_from_seeds
from deepscope.tasks.segment.config import SegmentConfig
from deepscope.tasks.segment.plan import (
    Fingerprint,
    Hardware,
    make_plan,
    object_diameters,
    receptive_field,
    semantic_plan,
)


def fp(diameters=(10.0, 20.0, 30.0), smallest=(256, 256), groups=None, images=600) -> Fingerprint:
    return Fingerprint(images, 2, 3, smallest, diameters, 40.0, groups or {"grey-dark": images})


def timer(calls: list | None = None, step_s: float = 2.0, pixel_s: float = 1e-5):
    def measure(patch, args, batch):
        if calls is not None:
            calls.append((patch, dict(args), batch))
        return step_s, pixel_s

    return measure


def test_object_diameters_are_equivalent_disc_diameters():
    labels = np.zeros((64, 64), np.int32)
    labels[disk((20, 20), 10)] = 1
    labels[disk((45, 45), 5)] = 3  # id 2 unused
    d = object_diameters(labels)
    assert len(d) == 2
    assert d == pytest.approx([20, 10], rel=0.1)  # digital discs are a little smaller


def test_architecture_follows_object_size_and_image_size():
    cfg = SegmentConfig(data="x", max_minutes=20)
    plan = make_plan(cfg, fp(diameters=(10, 20, 30)), Hardware("cpu", "float32"), 0.0, timer(), 1e7)
    depth = plan.settings["model_args.depth"]
    assert receptive_field(depth) >= 90 and receptive_field(depth - 1) < 90  # smallest depth seeing 3x the p90 diameter
    assert plan.settings["patch_shape"] == [256, 256]
    assert plan.settings["model_args.features"] == 16 and plan.settings["batch_size"] == 8
    small = make_plan(
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
    plan = make_plan(cfg, fp(), Hardware("cpu", "float32"), 30.0, timer(calls, step_s=2.0, pixel_s=1e-5), 4e7)
    assert len(calls) == 1 and calls[0][1]["depth"] == plan.settings["model_args.depth"]
    epochs, patches, batch = plan.settings["epochs"], plan.settings["patches_per_epoch"], plan.settings["batch_size"]
    val_s = plan.settings["val_fraction"] * (4e7 * 1e-5 + 600 * 0.5)
    used = epochs * (patches / batch * 2.0 + val_s)
    budget = 20 * 60 - 30.0
    assert 0.8 * budget < used <= budget
    assert epochs * val_s <= 0.15 * budget + 1e-6
    doubled = make_plan(
        SegmentConfig(data="x", max_minutes=40), fp(), Hardware("cpu", "float32"), 30.0, timer(step_s=2.0), 4e7
    )
    assert doubled.settings["epochs"] * doubled.settings["patches_per_epoch"] > 1.8 * epochs * patches


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
    plan = make_plan(cfg, fp(), Hardware("cpu", "float32"), 0.0, timer(calls), 1e7)
    assert plan.settings == {} and calls == []
    assert any(r.startswith("data:") for r in plan.reasons)


def test_appearance_mix_plans_inversion_balance_and_stain_augmentation():
    mixed = fp(groups={"grey-dark": 540, "colour-bright": 100, "grey-bright": 16}, images=656)
    plan = make_plan(SegmentConfig(data="x", max_minutes=20), mixed, Hardware("cpu", "float32"), 0.0, timer(), 1e7)
    assert plan.settings["invert"] == "auto" and plan.settings["balance"] == "auto"
    augment = plan.settings["augment"]
    assert augment.colour_jitter > 0 and augment.hed_jitter == 0  # inverted H&E is not transmitted light
    kept = make_plan(
        SegmentConfig(data="x", max_minutes=20, invert="never"), mixed, Hardware("cpu", "float32"), 0.0, timer(), 1e7
    )
    assert "invert" not in kept.settings and kept.settings["augment"].hed_jitter > 0
    uniform = make_plan(
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
    plan = make_plan(SegmentConfig(data="x", epochs=2), fp(), Hardware("cpu", "float32"), 0.0, timer(calls), 1e7)
    assert "patches_per_epoch" not in plan.settings and "epochs" not in plan.settings and calls == []
    budgeted = make_plan(
        SegmentConfig(data="x", epochs=2, max_minutes=5), fp(), Hardware("cpu", "float32"), 0.0, timer(calls), 1e7
    )
    assert "patches_per_epoch" in budgeted.settings and len(calls) == 1


def test_semantic_targets_get_fixed_defaults():
    plan = semantic_plan(SegmentConfig(data="x", target="semantic", epochs=4))
    assert "epochs" not in plan.settings and plan.settings["batch_size"] == 8 and plan.settings["invert"] == "never"


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
