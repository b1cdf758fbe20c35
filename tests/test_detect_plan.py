"""The detect task's plan (tasks/detect/plan.py): fingerprint of boxes and image sizes, and the settings chosen from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deepscope.cli import main
from deepscope.data.detection.annotations import load_detection_data
from deepscope.data.detection.augment import DetAugmentConfig
from deepscope.data.detection.types import DetItem
from deepscope.demo.data import write_shapes
from deepscope.engine import trainer
from deepscope.engine.plan import Budget, Plan
from deepscope.tasks.detect.config import DetectConfig
from deepscope.tasks.detect.plan import (
    FEW_IMAGES_WITH_TEST,
    LIGHT_HEAD,
    MIN_PASSES,
    DetFingerprint,
    candidate_args,
    fingerprint,
    plan_backbone,
    plan_budget_size,
    plan_data,
)
from deepscope.tasks.detect.predict import DetInferenceConfig


def square_boxes(sides: list[float]) -> np.ndarray:
    """Square boxes of the given sides at the image's corner (overlap is no matter to the fingerprint)."""
    return np.array([[0.0, 0.0, side, side] for side in sides], np.float32).reshape(-1, 4)


def items(sizes: list[tuple[int, int]], sides: list[list[float]]) -> list[DetItem]:
    """In-memory items (no files: the fingerprint reads only sizes and boxes) of ``(width, height)`` with square
    objects of the given sides."""
    out = []
    for i, ((width, height), objects) in enumerate(zip(sizes, sides)):
        boxes = square_boxes(objects)
        out.append(
            DetItem(
                f"{i}.png",
                Path(f"{i}.png"),
                width,
                height,
                boxes,
                np.ones(len(boxes), np.int64),
                np.zeros(len(boxes), bool),
            )
        )
    return out


def planned(fp: DetFingerprint, device: str = "cpu", **settings) -> Plan:
    plan = Plan()
    plan_data(DetectConfig(data="x", **settings), fp, device, plan, given_val=0, test=0)
    return plan


def test_fingerprint_of_a_coco_set_gives_known_percentiles_and_counts(tmp_path: Path) -> None:
    """Three 200x160 images holding 1, 4 and 6 square objects of sides 10, 20, ..., 110 px: the sides' p10/p50/p90
    are 20/60/100 px (linear interpolation over the 11), 10%/30%/50% of the longer side; 11/3 objects per image on
    average, 6 at most. Read from a COCO file by the loader, as training reads it."""
    (tmp_path / "images").mkdir()
    per_image = [[10.0], [20.0, 30.0, 40.0, 50.0], [60.0, 70.0, 80.0, 90.0, 100.0, 110.0]]
    images, annotations = [], []
    for i, sides in enumerate(per_image):
        Image.fromarray(np.zeros((160, 200, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 200, "height": 160})
        for x1, y1, x2, y2 in square_boxes(sides).tolist():
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    data = load_detection_data(tmp_path)
    fp = fingerprint(data.splits["all"], len(data.class_names))
    assert fp.images == 3 and fp.classes == 1
    assert fp.sides == pytest.approx((20, 60, 100))
    assert fp.relative == pytest.approx((0.1, 0.3, 0.5))
    assert fp.short == pytest.approx((160, 160, 160)) and fp.long == pytest.approx((200, 200, 200))
    assert fp.objects_max == 6 and fp.objects_mean == pytest.approx(11 / 3) and fp.objects[1] == 4
    values = fp.values()
    assert json.loads(json.dumps(values)) == values  # JSON-able, for metrics.json
    assert values["objects_per_image_max"] == 6 and values["object_side_px"] == [20, 60, 100]


def test_crowds_of_small_objects_plan_centernet_at_native_scale() -> None:
    """DSB2018-like: 256 px tiles with 200 nuclei of 8-14 px each."""
    rng = np.random.default_rng(0)
    fp = fingerprint(items([(256, 256)] * 30, [list(rng.uniform(8, 14, 200)) for _ in range(30)]), 1)
    plan = planned(fp)
    assert plan.settings["image_size"] == 0 and plan.settings["model"] == "centernet"
    assert "model_args.dfl_bins" not in plan.settings  # FCOS's alone
    assert plan.settings["inference.max_detections"] > 200
    assert plan.settings["augment.mosaic"] == 0 and "augment.close_mosaic" not in plan.settings  # native scale
    # 4096 px microscopy images with 300 cells of 20-30 px: a resize keeping them at 16 px would still be over 3000 px,
    # beyond a CPU's planned sizes, so native scale again
    large = fingerprint(items([(4096, 4096)] * 30, [list(rng.uniform(20, 30, 300)) for _ in range(30)]), 1)
    plan = planned(large)
    assert plan.settings["image_size"] == 0 and plan.settings["model"] == "centernet"
    assert any("small objects in large images" in r for r in plan.reasons)


def test_few_large_objects_plan_fcos_at_a_resized_size() -> None:
    """Penn-Fudan-like: 640x480 photographs with one to three objects of 100-200 px."""
    rng = np.random.default_rng(0)
    fp = fingerprint(items([(640, 480)] * 40, [list(rng.uniform(100, 200, 1 + i % 3)) for i in range(40)]), 1)
    plan = planned(fp)
    assert plan.settings["model"] == "fcos" and plan.settings["model_args.dfl_bins"] == 16  # box sides as distributions
    assert plan.settings["image_size"] == plan.settings["max_size"] == 320  # the longer side at 320 px on a CPU
    assert plan.settings["inference.max_detections"] == 100  # COCO's, above the 3 objects at most
    assert (plan.settings["augment.mosaic"], plan.settings["augment.close_mosaic"]) == (0.5, 0.2)
    assert planned(fp, device="cuda").settings["image_size"] == 512  # larger on a GPU


def test_max_detections_exceeds_the_most_objects_in_a_training_image() -> None:
    for most in (7, 99, 150, 400):
        counts = [1] * 20 + [most]
        fp = fingerprint(items([(1000, 1000)] * 21, [[20.0] * n for n in counts]), 1)
        limit = planned(fp).settings["inference.max_detections"]
        assert limit >= 100 and limit > most and limit >= 1.5 * most


def test_values_the_user_gives_are_kept() -> None:
    fp = fingerprint(items([(640, 480)] * 40, [[150.0]] * 40), 1)
    cfg = DetectConfig(
        data="x",
        model="retinanet",
        image_size=256,
        max_size=400,
        val_fraction=0.25,
        model_args={"backbone": "resnet18"},
        inference=DetInferenceConfig(max_detections=150),
        augment=DetAugmentConfig(mosaic=0.0),
    )
    plan = Plan()
    plan_data(cfg, fp, "cpu", plan, given_val=0, test=0)
    assert plan.settings == {}  # nothing left open: only the fingerprint is recorded
    assert len(plan.reasons) == 1 and plan.reasons[0].startswith("data: 40 training images")
    timed: list[str] = []
    budget = Budget(10, True)
    assert plan_backbone(cfg, plan, budget, lambda: 0.0, 10, True, lambda n: timed.append(n) or 0.1, "cpu") is None
    assert timed == []  # a given backbone is not timed
    plan.apply(cfg)
    assert (cfg.model, cfg.image_size, cfg.max_size, cfg.val_fraction) == ("retinanet", 256, 400, 0.25)
    assert cfg.model_args == {"backbone": "resnet18"} and cfg.inference.max_detections == 150
    direct = DetectConfig(data="x", model="fcos", model_args={"dfl_bins": 0}, image_size=256, max_size=400)
    plan = Plan()
    plan_data(direct, fp, "cpu", plan, given_val=0, test=0)
    assert "model_args.dfl_bins" not in plan.settings  # FCOS's own box regression, as given
    # a shorter side alone: the longer-side cap follows from the images' aspect ratio (4:3)
    alone = planned(fp, image_size=480).settings
    assert "image_size" not in alone and alone["max_size"] == 640


def test_backbone_is_the_largest_the_budget_trains_enough_passes() -> None:
    """Fake step times: the cheapest 0.1 s, resnet18 0.3 s, resnet34 0.6 s; 30 steps a pass."""
    steps = {"tiny": 0.1, "csp": 0.1, "resnet18": 0.3, "resnet34": 0.6}

    def choose(minutes: float, scale: float = 1.0, model: str = "") -> tuple[str | None, list[str], Plan, DetectConfig]:
        timed: list[str] = []
        plan = Plan()

        def timer(name: str) -> float:
            timed.append(name)
            return steps[name] * scale

        cfg = DetectConfig(data="x", model=model)
        name = plan_backbone(cfg, plan, Budget(minutes, True), lambda: 0.0, 30, True, timer, "cpu")
        plan.apply(cfg)
        return name, timed, plan, cfg

    name, timed, plan, _ = choose(60)  # passes: tiny ~949, resnet18 ~316, resnet34 ~158
    assert name == "resnet18" and timed == ["tiny", "resnet18", "resnet34"]
    assert "0.300 s/step" in plan.reasons[0]
    name, timed, _, _ = choose(10)  # tiny ~158 passes: under MIN_PASSES, the cheapest is kept
    assert name == "tiny" and timed == ["tiny"]  # the larger ones are not timed once one falls short
    assert 158 < MIN_PASSES < 316
    # FCOS: the cheapest candidate is the CSP trunk, planned with the light head the user left open
    name, timed, plan, cfg = choose(10, model="fcos")
    assert name == "csp" and timed == ["csp"]
    assert cfg.model_args == {"backbone": "csp", **LIGHT_HEAD}
    assert candidate_args(DetectConfig(data="x", model="fcos", model_args={"head_convs": 4}), "csp") == {
        "backbone": "csp",
        "fpn_channels": 64,
        "extra_p6p7": False,
    }
    assert candidate_args(DetectConfig(data="x", model="fcos"), "resnet18") == {"backbone": "resnet18"}
    name, timed, _, cfg = choose(60, model="fcos")
    assert name == "resnet18" and timed == ["csp", "resnet18", "resnet34"]
    assert cfg.model_args == {"backbone": "resnet18"}  # FCOS's own head with a ResNet


def test_a_budget_with_passes_to_spare_buys_a_larger_size() -> None:
    """Penn-Fudan-like 640x480 photographs (planned at 320 px); fake steps cost in proportion to the pixels, 0.2 s at
    320 px; 26 steps a pass. Larger sizes are 416, 512, 608 (the median image is 640 px long)."""
    fp = fingerprint(items([(640, 480)] * 40, [[150.0]] * 40), 1)

    def choose(minutes: float, **settings) -> tuple[Plan, DetectConfig, list[int]]:
        plan, timed = Plan(), []
        cfg = DetectConfig(data="x", **settings)
        plan_data(cfg, fp, "cpu", plan, given_val=0, test=0)
        plan.apply(cfg)

        def timer(size: int) -> float:
            timed.append(size)
            return 0.2 * (size / 320) ** 2

        plan_budget_size(cfg, plan, fp, "cpu", Budget(minutes, True), lambda: 0.0, 26, False, timer)
        plan.apply(cfg)
        return plan, cfg, timed

    plan, cfg, timed = choose(10)  # ~100 passes at 320 px: nothing larger is timed
    assert (cfg.image_size, cfg.max_size, timed) == (320, 320, [320])
    plan, cfg, timed = choose(30)  # passes: 320 px ~321, 416 px ~190: short of MIN_PASSES, 320 stays
    assert (cfg.image_size, timed) == (320, [320, 416])
    plan, cfg, timed = choose(60)  # 416 px ~380, 512 px ~251, 608 px ~178
    assert (cfg.image_size, cfg.max_size, timed) == (512, 512, [320, 416, 512, 608])
    assert sum(r.startswith("image_size = ") for r in plan.reasons) == 1  # the reason revised, not added
    assert any(r.startswith("image_size = 512: ") and "416 px" in r for r in plan.reasons)
    assert 178 < MIN_PASSES < 251
    _, cfg, timed = choose(60, image_size=320)  # a given size stays, untimed
    assert (cfg.image_size, timed) == (320, [])


def test_validation_share_follows_the_set_size() -> None:
    def share(n: int, given_val: int = 0, test: int = 0) -> tuple[float, str]:
        fp = fingerprint(items([(640, 480)] * n, [[150.0]] * n), 1)
        plan = Plan()
        plan_data(DetectConfig(data="x"), fp, "cpu", plan, given_val=given_val, test=test)
        return plan.settings["val_fraction"], next(r for r in plan.reasons if r.startswith("val_fraction"))

    assert round(share(130)[0] * 130) == 13
    assert round(share(40)[0] * 40) == 4
    assert round(share(25)[0] * 25) == 3  # at least 3
    assert round(share(1000)[0] * 1000) == 20  # at most 20
    fraction, reason = share(12)
    assert fraction == 0 and "without validation" in reason and "last epoch" in reason
    fraction, reason = share(200, given_val=30)
    assert fraction == 0 and "own val split (30 images)" in reason
    # a small set with its own test split trains on every image; the test split scores the last epoch
    fraction, reason = share(100, test=30)
    assert fraction == 0 and "own test split (30 images)" in reason and "last epoch" in reason
    assert round(share(FEW_IMAGES_WITH_TEST, test=30)[0] * FEW_IMAGES_WITH_TEST) == 20  # enough images: validated


def test_train_with_only_data_and_a_budget_plans_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 training images of 48 px: every open setting is planned, the backbone from timed steps, the epochs by the
    engine; config.yaml starts with the reasons and holds whole numbers of epochs."""
    # the engine's steps timed at 0.5 s, so its schedule is some 50 steps and the run ends in seconds, not the budget
    monkeypatch.setattr(trainer, "seconds_per_step", lambda *args: 0.5)
    data = write_shapes(tmp_path / "shapes", train=12, test=3, size=48)
    out = tmp_path / "run"
    # float32 (--amp off) as the other detect tests: FCOS's losses give NaN gradients under bf16 autocast
    args = ["train", "detect", "--data", str(data), "--max-minutes", "0.5", "--out", str(out), "--amp", "off"]
    assert main(args) == 0
    text = (out / "config.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(line.startswith("# data: 12 training images") for line in header)
    for key in ("val_fraction", "image_size", "model", "inference.max_detections", "model_args.backbone", "epochs"):
        assert any(line.startswith(f"# {key} = ") for line in header), key
    assert any("without validation" in line for line in header)  # too few images to carve a validation
    config = yaml.safe_load(text)
    assert isinstance(config["epochs"], int) and config["epochs"] >= 1
    assert config["model"] in ("fcos", "centernet") and config["image_size"] == 0  # 48 px images stay as they are
    assert config["model_args"]["backbone"] in ("tiny", "csp", "resnet18", "resnet34") and config["val_fraction"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["plan"]["settings"]["model"] == config["model"] and "test_map" in metrics
