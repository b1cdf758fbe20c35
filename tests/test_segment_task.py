"""The segment task end to end: training through the CLI, evaluation, prediction to files, resume, 3D and semantic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from PIL import Image

from conftest import cpu_unet_options, evaluate_checkpoint_args, evaluate_saved_args, two_process_launcher
from deepscope.cli import main
from deepscope.demo.data import write_nuclei
from deepscope.engine.checkpoint import load_checkpoint
from deepscope.engine.distributed import DistInfo
from deepscope.metrics.instance import evaluate_instances
from deepscope.tasks.segment.config import SegmentConfig
from deepscope.tasks.segment.task import SegmentTask


def seg_args(data: Path, out: Path | None, *extra: str, epochs: int = 6) -> list[str]:
    """A small, quick CPU segmentation run through the CLI (``out`` None: no --out, the caller adds it), in float32 on
    every processor (scores compare with ``evaluate`` and between processes). The target is given: the boundary
    maps learn these nuclei in seconds (the planned default, flows, is tested by test_segment_targets)."""
    where = ["--out", str(out)] if out is not None else []
    return [
        "train",
        "segment",
        "--data",
        str(data),
        *where,
        "--epochs",
        str(epochs),
        *cpu_unet_options(batch_size=8, lr=0.005, depth=3, patch=64, patches_per_epoch=64, val_fraction=0.2),
        "--set",
        "target=foreground_boundaries",
        *extra,
    ]


def semantic_data(nuclei: Path, data: Path) -> Path:
    """The nuclei as PNG masks with values {0, 255} (as ISBI 2012), for the semantic target with ``class_values``."""
    for split in ("train", "test"):
        for name in ("images", "masks"):
            (data / split / name).mkdir(parents=True)
        for path in sorted((nuclei / split / "images").iterdir()):
            Image.fromarray(tifffile.imread(path)).save(data / split / "images" / f"{path.stem}.png")
            mask = (tifffile.imread(nuclei / split / "masks" / path.name) > 0).astype(np.uint8) * 255
            Image.fromarray(mask).save(data / split / "masks" / f"{path.stem}.png")
    return data


def tiled_instances_args(checkpoint: Path, image: Path, out: Path, *, tile: int, halo: int) -> list[str]:
    """``predict`` of ``image`` by ``checkpoint`` on the CPU by square tiles of ``tile`` pixels with ``halo``, its
    probabilities and instances written to ``out``."""
    return [
        "predict",
        str(checkpoint),
        str(image),
        "--out",
        str(out),
        "--tile",
        str(tile),
        "--halo",
        str(halo),
        "--instances",
        "--device",
        "cpu",
    ]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory) -> Path:
    return write_nuclei(tmp_path_factory.mktemp("nuclei") / "data", train=16, test=4, size=96)


@pytest.fixture(scope="module")
def trained(nuclei, tmp_path_factory) -> Path:
    """One trained 2D run shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run") / "seg"
    # validation at the fixed threshold: tuned on these few validation images, one early epoch scores best by chance
    # (0.82 at epoch 9, 0.64 from epoch 12 on), and the tiling test below needs the converged model
    assert main(seg_args(nuclei, out, "--set", "post.tune=false", epochs=30)) == 0
    return out


def test_training_learns_instances_and_writes_the_run(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["test"]["thresholds"]["0.5"]["score"] > 0.45, metrics["test"]["thresholds"]["0.5"]
    assert metrics["test"]["dice"] > 0.9
    history = metrics["history"]
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    for name in ("report.html", "overlays.png", "scores.png", "curves.png", "config.yaml", "best.pt", "last.pt"):
        assert (trained / name).is_file(), name
    assert "overlays.png" in (trained / "report.html").read_text()


def test_evaluate_checkpoint_matches_scoring_its_saved_predictions(trained, nuclei, tmp_path, capsys):
    preds = tmp_path / "pred"
    assert (
        main(
            evaluate_checkpoint_args(
                trained / "best.pt", nuclei, tmp_path / "eval.json", "--split", "test", "--save-pred", str(preds)
            )
        )
        == 0
    )
    direct = last_json(capsys)
    assert main(evaluate_saved_args("segment", preds, nuclei / "test" / "masks", tmp_path / "e2.json")) == 0
    saved = last_json(capsys)
    assert direct["thresholds"] == saved["thresholds"]
    assert direct["thresholds"]["0.5"]["score"] == pytest.approx(
        json.loads((trained / "metrics.json").read_text())["test"]["thresholds"]["0.5"]["score"]
    )


@pytest.mark.parametrize("suffix", [".h5", ".zarr", ".tif"])
def test_predict_writes_probabilities_and_instances_by_tiles(trained, nuclei, tmp_path, capsys, suffix):
    from deepscope.data.synthetic import nuclei_image

    image, truth = nuclei_image(size=160, seed=7)
    source = tmp_path / "big.tif"
    tifffile.imwrite(source, image)
    out = tmp_path / f"pred{suffix}"
    assert main(tiled_instances_args(trained / "best.pt", source, out, tile=48, halo=8)) == 0
    if suffix == ".h5":
        with h5py.File(out) as f:
            probs, labels = f["probabilities"][...], f["instances"][...]
    elif suffix == ".zarr":
        group = zarr.open_group(str(out), mode="r")
        probs, labels = group["probabilities"][...], group["instances"][...]
    else:
        probs, labels = tifffile.imread(out), tifffile.imread(tmp_path / "pred_instances.tif")
    assert probs.shape == (2, 160, 160) and labels.shape == (160, 160)
    assert probs.min() >= 0 and probs.max() <= 1
    # one tile for the whole image gives the same instances: tile borders neither cut nor merge objects
    whole = tmp_path / "whole.h5"
    assert main(tiled_instances_args(trained / "best.pt", source, whole, tile=160, halo=16)) == 0
    with h5py.File(whole) as f:
        untiled = f["instances"][...]
    agreement = evaluate_instances([("tiled", untiled, labels)])["thresholds"]["0.5"]["score"]
    assert agreement > 0.95
    assert sorted(np.unique(labels))[1:] == list(range(1, labels.max() + 1))  # unique consecutive ids
    assert evaluate_instances([("truth", truth.astype(np.int32), labels)])["thresholds"]["0.5"]["score"] > 0.5


def test_predict_folder_of_images_to_folder(trained, nuclei, tmp_path, capsys):
    out = tmp_path / "preds"
    assert (
        main(
            ["predict", str(trained / "best.pt"), str(nuclei / "test" / "images"), "--out", str(out), "--device", "cpu"]
        )
        == 0
    )
    result = last_json(capsys)
    assert result["predictions"] == 4
    assert sorted(p.name for p in out.iterdir())[:1] == ["000_probabilities.tif"]
    assert not any("instances" in p.name for p in out.iterdir())


def test_resume_after_interruption_equals_an_uninterrupted_run(nuclei, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert (
        main(
            seg_args(
                nuclei, straight, "--set", "augment.affine_degrees=10", "--set", "augment.noise_std=0.05", epochs=2
            )
        )
        == 0
    )
    # a wall-time limit stops the run part-way through the first epoch; resuming finishes it
    assert (
        main(
            seg_args(
                nuclei,
                split,
                "--set",
                "augment.affine_degrees=10",
                "--set",
                "augment.noise_std=0.05",
                "--max-minutes",
                "0.002",
                epochs=2,
            )
        )
        == 0
    )
    first = load_checkpoint(split / "last.pt")
    assert (first["epoch"], first["epoch_complete"]) == (0, False)
    assert main(["train", "segment", "--out", str(split), "--resume", "--max-minutes", "60"]) == 0
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(split / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_semantic_classes_from_label_values(nuclei, tmp_path):
    """Masks with values {0, 255} (as ISBI 2012) trained as two classes through ``class_values``."""
    data = semantic_data(nuclei, tmp_path / "semantic")
    out = tmp_path / "run"
    assert main(seg_args(data, out, "--set", "target=semantic", "--set", "class_values=[0, 255]", epochs=12)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["per_class"]["255"]["iou"] > 0.7
    assert metrics["test"]["mean_iou"] > 0.8


def test_semantic_schedule_is_planned_by_the_engine(nuclei, tmp_path):
    """No --epochs: the semantic target leaves its schedule to the engine, which plans the epochs from the budget
    (the given patches per epoch stay) and writes its reasons above the settings in config.yaml."""
    data = semantic_data(nuclei, tmp_path / "semantic")
    out = tmp_path / "run"
    small = cpu_unet_options(batch_size=4, lr=0.005, depth=2, patch=32, patches_per_epoch=8, val_fraction=0.2)
    semantic = ["--set", "target=semantic", "--set", "class_values=[0, 255]"]
    # 2 minutes: a schedule fits also on a loaded machine (the deadline bounds the run); epochs of 2 steps keep it short
    assert (
        main(["train", "segment", "--data", str(data), "--out", str(out), *small, *semantic, "--max-minutes", "2"]) == 0
    )
    text = (out / "config.yaml").read_text()
    comments = [line for line in text.splitlines() if line.startswith("# ")]
    assert any(line.startswith("# epochs = ") for line in comments), comments
    assert any(line.startswith("# timing: ") for line in comments)
    saved = yaml.safe_load(text)
    assert isinstance(saved["epochs"], int) and saved["epochs"] >= 1
    assert saved["target"] == "semantic" and saved["steps_per_epoch"] == 2  # 8 patches given, in batches of 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["plan"]["settings"]["epochs"] == saved["epochs"]
        and "steps_per_epoch" not in metrics["plan"]["settings"]
    )
    assert "Plan: what was measured and chosen" in (out / "report.html").read_text()


def test_setup_plans_flows_for_instance_labels_and_keeps_a_given_target(nuclei):
    """The target left open is planned (flows for instance labels), and an instance target plans its own schedule."""
    given = {"epochs": 1, "batch_size": 8, "patch_shape": [64, 64], "patches_per_epoch": 16, "device": "cpu"}
    task = SegmentTask(SegmentConfig(data=str(nuclei), **given))
    task.setup(torch.device("cpu"), DistInfo())
    assert (task.config.target, task.config.loss, task.out_channels) == ("flows", "flows", 3)
    assert task.plan.settings["target"] == "flows" and task.plan.reasons[0].startswith("target = flows: ")
    assert task.plans_schedule and task.config.monitor == "mean_score"
    assert not any(n.startswith("target =") for n in task.notes)  # the engine logs the plan, not the task's notes
    kept = SegmentTask(SegmentConfig(data=str(nuclei), target="foreground_boundaries", **given))
    kept.setup(torch.device("cpu"), DistInfo())
    assert kept.config.target == "foreground_boundaries" and "target" not in kept.plan.settings
    assert kept.inference_state()["out_channels"] == 2
    semantic = SegmentTask(SegmentConfig(data=str(nuclei), target="semantic", **given))
    semantic.setup(torch.device("cpu"), DistInfo())
    assert not semantic.plans_schedule and semantic.config.loss == "ce"


def test_validation_scores_at_a_tuned_threshold_where_the_untuned_one_finds_nothing(nuclei, tmp_path, monkeypatch):
    """A model whose object probabilities stay under the untuned 0.5 scores 0 there; the validation the engine selects
    the best epoch by scores it at its tuned threshold, and the run's final tuning starts from that threshold."""
    from test_segment_plan import Confident

    given = {"epochs": 1, "batch_size": 8, "patch_shape": [64, 64], "patches_per_epoch": 16, "val_fraction": 0.25}
    task = SegmentTask(SegmentConfig(data=str(nuclei), target="foreground", device="cpu", **given))
    task.setup(torch.device("cpu"), DistInfo())
    model = Confident(0.4)
    tuned = task.evaluate(model, task.val_batches())
    assert tuned["post_threshold"] < 0.4 and tuned["mean_score"] > 0.2 and tuned["post_threshold_scores"]["0.5"] == 0
    task.config.post.tune = False
    assert task.evaluate(model, task.val_batches())["mean_score"] == 0  # the untuned threshold, as before the fix
    task.config.post.tune = True
    history = [{"epoch": 1, "val_post_threshold": 0.3}, {"epoch": 2, "val_post_threshold": tuned["post_threshold"]}]
    seen = {}

    def tune_post(predictor, items):
        seen["threshold"] = predictor.post.threshold
        return predictor.post, []

    monkeypatch.setattr("deepscope.tasks.segment.task.tune_post", tune_post)
    result = task.finish(model, tmp_path, history, {"best_epoch": 2})
    assert seen["threshold"] == tuned["post_threshold"]  # the best epoch's, not the first's
    assert result["test"]["mean_score"] > 0.2  # the test images at the stored threshold
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["post"]["threshold"] == tuned["post_threshold"]


def test_lazy_hdf5_volumes_train_a_3d_model(tmp_path):
    """3D training from HDF5 containers holding raw and label, read patch by patch."""
    from deepscope.data.synthetic import nuclei_image

    folder = tmp_path / "vols"
    folder.mkdir()
    for i in range(3):
        slices = [nuclei_image(48, seed=10 * i + z % 3) for z in range(16)]
        raw = np.stack([s[0] for s in slices])
        label = np.stack([s[1].astype(np.int32) + 100 * (z // 3) * (s[1] > 0) for z, s in enumerate(slices)])
        with h5py.File(folder / f"v{i}.h5", "w") as f:
            f["raw"], f["label"] = raw, label
    out = tmp_path / "run3d"
    args = [
        "train",
        "segment",
        "--data",
        str(folder),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--set",
        "model_args={features: 4, depth: 2, pool: [1, 2, 2]}",
        "--set",
        "patch_shape=[8, 32, 32]",
        "--set",
        "patches_per_epoch=8",
        "--set",
        "val_fraction=0.34",
        "--set",
        "target=foreground_boundaries",  # flows' 3D targets cost seconds a batch on a CPU
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["val"]["voi_split"]) and metrics["val"]["images"] == 1
    state = load_checkpoint(out / "best.pt")["task_state"]
    assert state["ndim"] == 3 and state["divisor"] == [1, 4, 4]


def test_plantseg_nuclei_volume_end_to_end(shared_data, tmp_path):
    """The real 3D nuclei crop: top half trains, bottom half scores (VOI, adapted Rand)."""
    volume = np.load(shared_data / "plantseg3d" / "nuclei_1135_mini.npz")
    for split, part in (("train", slice(0, 64)), ("test", slice(64, 100))):
        (tmp_path / "vol" / split).mkdir(parents=True)
        np.savez(tmp_path / "vol" / split / "nuclei.npz", raw=volume["raw"][part], label=volume["label"][part])
    out = tmp_path / "run"
    args = [
        "train",
        "segment",
        "--data",
        str(tmp_path / "vol"),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--lr",
        "0.005",
        "--set",
        "model_args={features: 8, depth: 2}",
        "--set",
        "patch_shape=[32, 48, 48]",
        "--set",
        "patches_per_epoch=16",
        "--set",
        "val_fraction=0",
        "--set",
        "target=foreground_boundaries",
    ]
    assert main(args) == 0
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["dice"] > 0.5 and test["arand"] < 0.9


@pytest.mark.slow  # over 30 s on 2 cores
def test_two_gloo_processes_match_one_process(nuclei, tmp_path):
    """Patches depend only on their global index, so two processes with half batches make the same steps as one
    (BCE is a per-pixel mean and GroupNorm is per sample, so averaging the halves' gradients is exact)."""
    args = seg_args(
        nuclei,
        None,
        "--set",
        "loss=bce",
        "--set",
        "model_args={features: 8, depth: 2, norm: group}",
        "--set",
        "augment={flip: false, rot90: false}",
        epochs=2,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "deepscope"]
    single = subprocess.run(
        cli + args + ["--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = two_process_launcher(29518)
    double = subprocess.run(
        launcher + args + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (
        load_checkpoint(tmp_path / "one" / "last.pt")["model"],
        load_checkpoint(tmp_path / "two" / "last.pt")["model"],
    )
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
    m1, m2 = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    # validation is sharded over the processes and gathered: every image is scored once; the scores agree up to the
    # float noise between the two runs' weights (a barely trained model's watershed reacts to it)
    assert m2["processes"] == 2 and m1["val"]["images"] == m2["val"]["images"] == 3
    assert sorted(i["name"] for i in m1["val"]["per_image"]) == sorted(i["name"] for i in m2["val"]["per_image"])
    assert m2["val"]["dice"] == pytest.approx(m1["val"]["dice"], abs=0.01)
