"""The classify plan: a fingerprint of the data, then the model, its width by measured step times, the batch size,
the recipe's optimizer and the augmentation for what the user left open; and a run planned end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import pattern_images
from deepscope.cli import main
from deepscope.config import OptimConfig, from_dict
from deepscope.data.classification.augment import AugmentConfig
from deepscope.engine import trainer
from deepscope.engine.distributed import DistInfo
from deepscope.engine.plan import Budget, Plan
from deepscope.errors import DeepscopeError
from deepscope.tasks.classify import plan as classify_plan
from deepscope.tasks.classify.config import ClassifyConfig
from deepscope.tasks.classify.plan import FASTNET_OPTIM, MIN_PASSES, Candidate, Fingerprint, fingerprint, make_plan
from deepscope.tasks.classify.task import ClassifyTask

BUDGET = Budget(10.0, True)


def cifar_like(images: int = 45000, side: int = 32, channels: int = 3) -> Fingerprint:
    return Fingerprint(images, images // 9, side, side, channels, 10, images // 10, images // 10)


def planned(cfg: ClassifyConfig, fp: Fingerprint, timer=None) -> tuple[Plan, list[tuple]]:
    """The plan of ``cfg`` for ``fp``, and the (model, model_args, batch) the timer was asked to measure."""
    asked: list[tuple] = []

    def timing(model, args, batch):
        asked.append((model, dict(args), batch))
        return timer(model, args, batch) if timer else pytest.fail("nothing should be timed")

    plan = Plan()
    make_plan(cfg, fp, BUDGET, 5.0, timing, plan, "cpu in float32")
    return plan, asked


def test_fingerprint_counts_images_sizes_channels_and_classes() -> None:
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7)
    fp = fingerprint(labels, 4, (1, 28, 30), 3)
    assert (fp.images, fp.val_images, fp.channels, fp.height, fp.width) == (15, 4, 1, 28, 30)
    assert (fp.classes, fp.per_class_min, fp.per_class_max) == (3, 3, 7)
    assert "15 training images" in fp.describe() and "28x30" in fp.describe()


def test_tiny_small_rgb_images_get_the_narrowest_fastnet_unmeasured() -> None:
    cfg = ClassifyConfig(data="d")
    plan, asked = planned(cfg, cifar_like(images=300))
    assert asked == []
    s = plan.settings
    assert s["model"] == "fastnet" and s["model_args.widths"] == [16, 32, 64]
    assert s["batch_size"] == 32  # at least 8 steps a pass over 300 images
    assert s["augment"] == AugmentConfig(crop_padding=2, flip=True, color_jitter=0.0, cutout=0)
    assert s["optim"].label_smoothing == FASTNET_OPTIM.label_smoothing
    assert s["optim"].lr == pytest.approx(FASTNET_OPTIM.lr * 32 / 512)
    assert plan.fingerprint["images"] == 300 and any(r.startswith("data: 300 training images") for r in plan.reasons)
    plan.apply(cfg)
    assert cfg.model == "fastnet" and cfg.model_args == {"widths": [16, 32, 64], "stem": 16}


def test_cifar_sized_data_gets_the_widest_fastnet_that_fits_the_budget() -> None:
    # 87 steps of 512 a pass: 1 s a step gives 6.1 passes in 9.2 minutes, 2 s 3.1
    cost = {64: 2.0, 32: 1.0, 16: 0.5}
    plan, asked = planned(ClassifyConfig(data="d"), cifar_like(), lambda m, a, b: cost[a["widths"][0]])
    assert [a["widths"][0] for _, a, _ in asked] == [16, 32, 64]  # narrowest first, up to the first too slow
    assert {b for *_, b in asked} == {512}
    assert plan.settings["model_args.widths"] == [32, 64, 128] and plan.settings["model_args.stem"] == 24
    assert plan.settings["optim"] == FASTNET_OPTIM  # the recipe as it is, at its batch of 512
    assert plan.settings["augment"].crop_padding == 2 and plan.settings["augment"].flip
    assert any("width timing" in r for r in plan.reasons)
    fast, _ = planned(ClassifyConfig(data="d"), cifar_like(), lambda m, a, b: 0.1)
    assert fast.settings["model_args.widths"] == [64, 128, 256]
    slow, asked = planned(ClassifyConfig(data="d"), cifar_like(), lambda m, a, b: 100.0)
    assert slow.settings["model_args.widths"] == [16, 32, 64] and len(asked) == 1
    assert any(f"no width gets {MIN_PASSES} passes" in r for r in slow.reasons)


def test_larger_images_get_a_resnet_with_smaller_batches() -> None:
    fp = cifar_like(images=5000, side=96)
    plan, asked = planned(ClassifyConfig(data="d"), fp, lambda m, a, b: 0.001 * a["width"])
    assert plan.settings["model"] == "resnet18" and plan.settings["model_args.width"] == 64
    assert [a["width"] for m, a, _ in asked if m == "resnet18"] == [16, 32, 64]
    assert asked[0][2] == plan.settings["batch_size"] == 16
    assert "optim" not in plan.settings  # no measured ResNet-18 recipe: the optimizer keeps its defaults
    assert plan.settings["augment"].crop_padding == 6 and plan.settings["augment"].flip
    small_grey, _ = planned(ClassifyConfig(data="d"), cifar_like(images=300, side=8, channels=1))
    assert small_grey.settings["augment"] == AugmentConfig(crop_padding=1, flip=False, color_jitter=0.0, cutout=0)


def test_user_settings_are_kept() -> None:
    cfg = ClassifyConfig(data="d", model="cnn", batch_size=64, augment=AugmentConfig(cutout=4))
    cfg.optim.lr = 0.01
    plan, asked = planned(cfg, cifar_like())
    assert asked == [] and set(plan.settings) == set()
    given = ClassifyConfig(data="d", model="fastnet", model_args={"widths": [8, 16, 32]}, batch_size=100)
    plan, asked = planned(given, cifar_like())
    assert asked == [] and "model_args.widths" not in plan.settings and "batch_size" not in plan.settings
    assert plan.settings["optim"].lr == pytest.approx(0.2 * 100 / 512, rel=1e-2)  # the recipe's, for the given batch
    plan.apply(given)
    assert given.model_args == {"widths": [8, 16, 32]} and given.batch_size == 100
    width_only, asked = planned(ClassifyConfig(data="d", model="resnet18", model_args={"width": 8}), cifar_like())
    assert asked == [] and "model_args.width" not in width_only.settings
    with pytest.raises(DeepscopeError, match="--init-from needs --model"):
        planned(ClassifyConfig(data="d", init_from="w.pt"), cifar_like())
    adamw = ClassifyConfig(data="d", optim=OptimConfig(name="adamw"))
    assert "optim" not in planned(adamw, cifar_like(images=300))[0].settings
    # optimizer settings given, as --lr 0.05 gives them, are kept even where they equal the defaults
    defaults = from_dict(ClassifyConfig, {"data": "d", "optim": {"lr": 0.05}})
    assert "optim" not in planned(defaults, cifar_like(images=300))[0].settings


def test_setup_times_real_steps_and_leaves_the_random_state(tmp_path: Path, monkeypatch) -> None:
    x, y = pattern_images(40, size=12)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    monkeypatch.setattr(classify_plan, "TINY_IMAGES", 0)  # measure the widths even of so few images
    narrow = tuple(Candidate("fastnet", {"widths": [w, 2 * w, 4 * w], "stem": w}, f"{w}") for w in (8, 4))
    monkeypatch.setitem(classify_plan.CANDIDATES, "fastnet", narrow)  # quick to time
    cfg = ClassifyConfig(data=str(tmp_path / "d.npz"), amp="off", max_minutes=5)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    task = ClassifyTask(cfg)
    task.setup(torch.device("cpu"), DistInfo())
    assert torch.equal(torch.rand(3), expected)
    timing = next(r for r in task.plan.reasons if r.startswith("width timing"))
    assert "s/step" in timing and cfg.model == "fastnet" and "widths" in cfg.model_args
    assert cfg.batch_size == 8 and cfg.augment is not None and cfg.augment.crop_padding == 1


def test_train_with_only_data_and_a_budget_plans_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine's steps timed at 0.5 s, so its schedule is some 50 steps and the run ends in seconds, not the budget
    monkeypatch.setattr(trainer, "seconds_per_step", lambda *args: 0.5)
    x, y = pattern_images(30, size=12)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[::3], y_test=y[::3])
    out = tmp_path / "run"
    assert (
        main(["train", "classify", "--data", str(tmp_path / "d.npz"), "--max-minutes", "0.5", "--out", str(out)]) == 0
    )
    text = (out / "config.yaml").read_text()
    comments = [line for line in text.splitlines() if line.startswith("# ")]
    assert any("model = fastnet" in c for c in comments) and any(c.startswith("# epochs = ") for c in comments)
    saved = yaml.safe_load(text)
    assert isinstance(saved["epochs"], int) and saved["epochs"] >= 1
    assert saved["model"] == "fastnet" and saved["batch_size"] == 8 and saved["model_args"]["widths"] == [16, 32, 64]
    metrics = json.loads((out / "metrics.json").read_text())
    reasons = metrics["plan"]["reasons"]
    assert any(r.startswith("model = fastnet") for r in reasons) and any(r.startswith("epochs = ") for r in reasons)
    assert metrics["plan"]["settings"]["augment"]["crop_padding"] == 1
