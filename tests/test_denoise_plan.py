"""The denoise plan (tasks/denoise/plan.py): the method from the data's layout, the fingerprint, the U-Net and patch
size from the budget and measured step times, the epoch length; and a run planned from --data and --max-minutes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from scipy import ndimage

from deepscope.cli import main
from deepscope.data.denoise.dataset import DenoiseItem
from deepscope.data.denoise.noise import NoiseConfig
from deepscope.engine import trainer
from deepscope.engine.distributed import DistInfo
from deepscope.engine.plan import Budget, Plan
from deepscope.errors import DataError
from deepscope.tasks.denoise.config import DenoiseConfig
from deepscope.tasks.denoise.plan import (
    LADDER,
    RECIPE,
    Candidate,
    Fingerprint,
    fingerprint,
    noise_sigma,
    plan_architecture,
    plan_epoch,
    plan_method,
)
from deepscope.tasks.denoise.task import DenoiseTask

LADDER_FEATURES = {c.features for c in LADDER[2]}


def smooth(shape: tuple[int, ...], seed: int) -> np.ndarray:
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 3)
    return (40 + 160 * (field - field.min()) / (field.max() - field.min())).astype(np.float32)


def write_layout(root: Path, roles: tuple[str, ...], n: int = 4, size: int = 32) -> Path:
    """``n`` float32 TIFF scenes per role folder: clean smooth images, noisy ones with sigma 20 noise."""
    rng = np.random.default_rng(0)
    for role in roles:
        (root / role).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        clean = smooth((size, size), i)
        for role in roles:
            image = clean if role == "clean" else clean + rng.normal(0, 20, clean.shape).astype(np.float32)
            tifffile.imwrite(root / role / f"im{i}.tif", image)
    return root


def given_network(**settings) -> dict:
    """Settings that leave nothing of the U-Net or the epoch to time: setup() reads the data and plans the method."""
    return {
        "device": "cpu",
        "amp": "off",
        "batch_size": 16,
        "patch_shape": [16, 16],
        "patches_per_epoch": 32,
        "val_fraction": 0.25,
        "model_args": {"features": 4, "depth": 1},
        **settings,
    }


def set_up(data: Path, **settings) -> DenoiseTask:
    task = DenoiseTask(DenoiseConfig(data=str(data), **settings))
    task.setup(torch.device("cpu"), DistInfo())
    return task


# ---- method ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "method"), [(("noisy",), "n2v"), (("noisy", "noisy2"), "n2n"), (("noisy", "clean"), "supervised")]
)
def test_method_follows_what_the_data_holds(tmp_path, roles, method):
    task = set_up(write_layout(tmp_path / "d", roles), **given_network())
    assert task.config.method == method and task.plan.settings["method"] == method
    assert any(line.startswith(f"method = {method}: ") for line in task.plan.reasons)
    assert "noise.fresh" not in task.plan.settings  # real noisy data: nothing to draw fresh noise from


def test_clean_images_with_synthetic_noise_train_supervised_on_fresh_noise(tmp_path):
    data = write_layout(tmp_path / "d", ("clean",))
    task = set_up(data, noise=NoiseConfig(kind="gaussian", sigma=25), **given_network())
    assert task.config.method == "supervised" and task.config.noise.fresh is True
    assert task.train_roles == ["clean"]  # noisy copies are drawn for every patch
    n2v = set_up(data, method="n2v", noise=NoiseConfig(kind="gaussian", sigma=25), **given_network())
    assert n2v.config.noise.fresh is False  # Noise2Void keeps to one noisy copy, as with real data


def test_a_given_method_is_kept(tmp_path):
    task = set_up(write_layout(tmp_path / "d", ("noisy", "clean")), method="n2v", **given_network())
    assert task.config.method == "n2v" and "method" not in task.plan.settings
    assert task.inference_state()["method"] == "n2v"


def test_a_method_needs_its_roles_in_the_validation_split_too():
    plan = Plan()
    cfg = DenoiseConfig(data="d")
    assert plan_method(cfg, {"train": {"noisy", "clean"}, "val": {"noisy"}}, plan) == "n2v"
    assert "training and validation images are single noisy images" in plan.reasons[0]
    with pytest.raises(DataError, match="no noisy/ images"):
        plan_method(DenoiseConfig(data="d"), {"train": {"clean"}}, Plan())


# ---- fingerprint ----------------------------------------------------------------------------------------------------


def test_fingerprint_measures_sizes_range_and_noise_level():
    rng = np.random.default_rng(1)
    items = []
    for i, shape in enumerate([(64, 80), (48, 96), (64, 64)]):
        clean = smooth(shape, i)
        noisy = (clean + rng.normal(0, 12, shape)).astype(np.float32)
        items.append(DenoiseItem(f"im{i}", {"noisy": noisy[None], "clean": clean[None]}, np.dtype(np.uint8)))
    fp = fingerprint(items, None)
    assert (fp.images, fp.ndim, fp.channels) == (3, 2, 1)
    assert fp.smallest == (48, 64) and fp.median == (64, 80)
    assert fp.data_range == 255 and fp.range_source == "uint8"
    assert fp.noise == pytest.approx(12, rel=0.1)
    assert "noise sigma about 12" in fp.describe() and fp.values()["smallest"] == [48, 64]
    as_float = [DenoiseItem(i.name, i.images, np.dtype(np.float32)) for i in items]
    assert fingerprint(as_float, None).range_source == "observed"
    assert fingerprint(as_float, 1000.0).data_range == 1000.0
    clean = smooth((64, 64), 9)[None]
    assert noise_sigma(clean) < 1.2  # a smooth image holds little at the finest scale: a tenth of that noise


# ---- U-Net, patch size and epoch -------------------------------------------------------------------------------------


def cost_timer(seconds_of_recipe: float, calls: list[Candidate] | None = None):
    """Step seconds proportional to features^2 x patch pixels (x4/3 for depth 3), ``seconds_of_recipe`` for the
    BSD68 recipe (32 features, depth 2, 64x64 patches, batch 64)."""

    def timer(c: Candidate) -> float:
        if calls is not None:
            calls.append(c)
        depth = 4 / 3 if c.depth == 3 else 1.0
        return seconds_of_recipe * (c.features / 32) ** 2 * float(np.prod(c.patch)) / 64**2 * depth

    return timer


def bsd_like(smallest=(180, 180)) -> Fingerprint:
    return Fingerprint(380, 2, 1, smallest, smallest, -110.0, 370.0, 255.0, "uint8", 25.0)


def test_a_ten_minute_cpu_budget_at_the_benchmarks_step_times_plans_the_bsd68_recipe():
    calls: list[Candidate] = []
    plan = Plan()
    cfg = DenoiseConfig(data="d", max_minutes=10)
    chosen, step_s = plan_architecture(cfg, bsd_like(), Budget(10, True), 10.0, cost_timer(0.36, calls), plan)
    assert chosen == RECIPE == Candidate(32, 2, (64, 64)) and step_s == pytest.approx(0.36)
    assert plan.settings["model_args.features"] == 32 and plan.settings["model_args.depth"] == 2
    assert plan.settings["patch_shape"] == [64, 64]
    assert calls == list(LADDER[2][:3])  # the climb stops at the first candidate that gets too few steps
    assert any(line.startswith("timing: ") for line in plan.reasons)


def test_the_budget_and_the_machine_move_the_choice_along_the_ladder():
    fast, slow = Plan(), Plan()
    cfg = DenoiseConfig(data="d", max_minutes=10)
    top, _ = plan_architecture(cfg, bsd_like(), Budget(10, True), 5.0, cost_timer(0.01), fast)
    assert top == LADDER[2][-1] and "largest on the ladder" in fast.reasons[-3]
    bottom, _ = plan_architecture(cfg, bsd_like(), Budget(10, True), 5.0, cost_timer(5.0), slow)
    assert bottom == LADDER[2][0] and "the smallest candidate" in slow.reasons[-3]
    longer = Plan()
    wider, _ = plan_architecture(
        DenoiseConfig(data="d", max_minutes=60), bsd_like(), Budget(60, True), 5.0, cost_timer(0.36), longer
    )
    assert wider.features >= 32 and np.prod(wider.patch) > 64 * 64  # six times the budget buys a larger model
    for p in (fast, slow, longer):
        assert p.settings["model_args.features"] in LADDER_FEATURES
        assert p.settings["patch_shape"] in [list(c.patch) for c in LADDER[2]]


def test_patches_stay_within_the_smallest_image():
    plan = Plan()
    chosen, _ = plan_architecture(
        DenoiseConfig(data="d"), bsd_like((40, 52)), Budget(10, False), 5.0, cost_timer(0.01), plan
    )
    assert all(p <= s for p, s in zip(chosen.patch, (40, 52))) and all(p % 2**chosen.depth == 0 for p in chosen.patch)


def test_given_width_depth_and_patch_are_kept():
    calls: list[Candidate] = []
    plan = Plan()
    cfg = DenoiseConfig(data="d", max_minutes=10, model_args={"features": 24})
    chosen, _ = plan_architecture(cfg, bsd_like(), Budget(10, True), 5.0, cost_timer(0.36, calls), plan)
    assert "model_args.features" not in plan.settings and all(c.features == 24 for c in calls)
    assert chosen.features == 24 and plan.settings["patch_shape"] in [list(c.patch) for c in LADDER[2]]
    calls.clear()
    plan = Plan()
    cfg = DenoiseConfig(data="d", max_minutes=10, model_args={"features": 8, "depth": 2}, patch_shape=[48, 48])
    chosen, step_s = plan_architecture(cfg, bsd_like(), Budget(10, True), 5.0, cost_timer(0.36, calls), plan)
    assert chosen == Candidate(8, 2, (48, 48)) and len(calls) == 1 and step_s is not None  # timed for the epoch
    assert not plan.settings
    calls.clear()
    cfg.patches_per_epoch = 640
    plan_architecture(cfg, bsd_like(), Budget(10, True), 5.0, cost_timer(0.36, calls), plan)
    assert not calls  # nothing left to choose or to time


def test_a_given_schedule_without_a_budget_trains_the_recipe_untimed():
    calls: list[Candidate] = []
    plan = Plan()
    cfg = DenoiseConfig(data="d", epochs=12, patches_per_epoch=6400)
    chosen, step_s = plan_architecture(cfg, bsd_like(), Budget(10, False), 5.0, cost_timer(0.36, calls), plan)
    assert chosen == RECIPE and step_s is None and not calls
    assert "the schedule is given" in plan.reasons[0]


def test_an_epoch_is_about_a_minute_of_steps_and_a_given_one_is_kept():
    plan = Plan()
    cfg = DenoiseConfig(data="d", max_minutes=10)
    plan_epoch(cfg, 0.36, Budget(10, True), 10.0, plan)
    patches = plan.settings["patches_per_epoch"]
    assert patches % cfg.batch_size == 0 and patches / cfg.batch_size * 0.36 == pytest.approx(60, abs=0.5)
    long = Plan()
    plan_epoch(cfg, 0.36, Budget(600, True), 10.0, long)
    assert long.settings["patches_per_epoch"] / 64 * 0.36 > 60 * 10  # at most 30 validations in 10 hours
    given = Plan()
    plan_epoch(DenoiseConfig(data="d", patches_per_epoch=4096), 0.36, Budget(10, True), 10.0, given)
    assert not given.settings


def test_setup_times_real_steps_and_plans_from_the_ladder(tmp_path):
    data = write_layout(tmp_path / "d", ("noisy",), n=4, size=32)
    torch.manual_seed(5)
    task = set_up(data, device="cpu", amp="off", batch_size=16, max_minutes=0.2)
    after_planned = torch.rand(1)
    cfg, settings = task.config, task.plan.settings
    assert settings["model_args.features"] in LADDER_FEATURES
    assert cfg.model_args["features"] == settings["model_args.features"]
    assert settings["patch_shape"] == [32, 32] == list(task.patch_shape)  # the ladder's patches, within 32x32
    assert cfg.patches_per_epoch == settings["patches_per_epoch"] and cfg.patches_per_epoch % 16 == 0
    assert task.plan.fingerprint["images"] == len(task.splits["train"]) and task.plan.fingerprint["candidates"]
    assert cfg.epochs is None  # the engine plans the schedule
    # timing leaves the random state as it found it: the run's weights are those of a run given the planned values
    given = {k: v for k, v in settings.items() if "." not in k}
    model_args = {k.split(".")[1]: v for k, v in settings.items() if k.startswith("model_args.")}
    torch.manual_seed(5)
    again = set_up(data, device="cpu", amp="off", batch_size=16, max_minutes=0.2, model_args=model_args, **given)
    assert not again.plan.settings and torch.equal(torch.rand(1), after_planned)


def test_train_with_only_data_and_a_budget_writes_the_plan_into_config_yaml(tmp_path, monkeypatch):
    # the engine's steps timed at 0.5 s, so its schedule is some 50 steps and the run ends in seconds, not the budget
    monkeypatch.setattr(trainer, "seconds_per_step", lambda *args: 0.5)
    data = write_layout(tmp_path / "d", ("noisy",), n=5, size=16)
    out = tmp_path / "run"
    # one thread: two OpenMP threads on 2 cores that other processes also use make a step 5-40x slower, and the
    # planned run then (rightly) refuses a half-minute budget as too short
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "denoise", "--data", str(data), "--max-minutes", "0.5", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = (out / "config.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("# ")]
    assert any(line.startswith("# method = n2v: ") for line in header)
    assert any(line.startswith("# model_args.features = ") for line in header)
    settings = yaml.safe_load(text)
    assert isinstance(settings["epochs"], int) and settings["epochs"] >= 1
    assert settings["method"] == "n2v" and isinstance(settings["patches_per_epoch"], int)
    assert settings["model_args"]["features"] in LADDER_FEATURES and settings["patch_shape"] == [16, 16]
