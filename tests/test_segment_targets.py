"""The star-convex and flow targets through the segment task: training, tuned thresholds stored in the checkpoint,
instances by tiles from ``predict --instances``, the plan in log and report, and the checks on odd labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import cpu_unet_options
from deepscope.cli import main
from deepscope.demo.data import write_nuclei
from deepscope.engine.checkpoint import load_checkpoint
from deepscope.metrics.instance import image_scores


def args(data: Path, out: Path, target: str, epochs: int, *extra: str) -> list[str]:
    return [
        "train",
        "segment",
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        f"target={target}",
        "--epochs",
        str(epochs),
        *cpu_unet_options(batch_size=8, lr=0.005, depth=3, patch=64, patches_per_epoch=96, val_fraction=0.2),
        *extra,
    ]


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory) -> Path:
    return write_nuclei(tmp_path_factory.mktemp("nuclei") / "data", train=14, test=3, size=96)


@pytest.fixture(scope="module")
def flows_run(nuclei, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flows") / "run"
    assert main(args(nuclei, out, "flows", 10, "--set", "inference.instance_block=40")) == 0
    return out


def test_flows_learn_nuclei_and_tuned_thresholds_reach_the_checkpoint(flows_run):
    metrics = json.loads((flows_run / "metrics.json").read_text())
    assert metrics["test"]["thresholds"]["0.5"]["score"] > 0.5, metrics["test"]["thresholds"]["0.5"]
    for key in ("kaggle_score", "pq", "sq", "rq"):
        assert 0 <= metrics["test"][key] <= 1
    tried = metrics["post_tuning"]
    assert len(tried) >= 5
    best = max(tried, key=lambda t: t["mean_score"])
    saved = load_checkpoint(flows_run / "best.pt")["config"]["post"]
    assert (saved["threshold"], saved["flow_threshold"]) == (best["threshold"], best["flow_threshold"])
    log = (flows_run / "train.log").read_text()
    assert "model_args.norm = batch" in log and "data: 14 training images" in log
    report = (flows_run / "report.html").read_text()
    assert "Plan: what was measured and chosen" in report and "Per image (worst first)" in report


def test_predict_instances_by_blocks_match_the_trainers_scores(flows_run, nuclei, tmp_path, capsys):
    """instance_block 40 is smaller than the 96-pixel test images, so predict merges blocks; the objects must be those
    the trainer scored on whole images."""
    images = sorted((nuclei / "test" / "images").glob("*.tif"))
    assert (
        main(
            [
                "predict",
                str(flows_run / "best.pt"),
                *map(str, images),
                "--out",
                str(tmp_path / "pred"),
                "--instances",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    per_image = {r["name"]: r for r in json.loads((flows_run / "metrics.json").read_text())["test"]["per_image"]}
    for image in images:
        pred = tifffile.imread(tmp_path / "pred" / f"{image.stem}_instances.tif")
        truth = tifffile.imread(nuclei / "test" / "masks" / image.name)
        tiled = image_scores(image.stem, truth, pred)["thresholds"]["0.5"]
        whole = per_image[image.stem]["thresholds"]["0.5"]
        assert abs(tiled["tp"] - whole["tp"]) <= 1 and abs(tiled["fp"] - whole["fp"]) <= 1


def test_vector_targets_refuse_flip_tta(flows_run, nuclei, tmp_path, capsys):
    image = sorted((nuclei / "test" / "images").glob("*.tif"))[0]
    assert (
        main(
            [
                "predict",
                str(flows_run / "best.pt"),
                str(image),
                "--out",
                str(tmp_path / "p"),
                "--tta",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "flipping would also have to turn" in capsys.readouterr().err


def test_stardist_trains_with_scaled_distances_and_tunes_nms(nuclei, tmp_path):
    out = tmp_path / "sd"
    assert main(args(nuclei, out, "stardist", 2)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert np.isfinite(history[-1]["train_loss"])
    assert {t["nms_threshold"] for t in metrics["post_tuning"]} >= {0.3, 0.4, 0.5}
    config = load_checkpoint(out / "best.pt")["config"]
    assert config["dist_scale"] > 1 and config["model_args"]["depth"] == 3
    log = (out / "train.log").read_text()
    assert "training objects (0.0%) are not star-convex" in log


def test_odd_labels_are_reported_by_file(tmp_path):
    data = write_nuclei(tmp_path / "data", train=6, test=1, size=64)
    mask = data / "train" / "masks" / "002.tif"
    labels = tifffile.imread(mask)
    labels[10:30, 10:30] = labels.max() + 1
    labels[18:22, 18:22] = 0  # a hole
    labels[50:54, 50:54] = labels.max()  # the same id again, apart
    tifffile.imwrite(mask, labels)
    out = tmp_path / "run"
    assert main(args(data, out, "stardist", 1, "--set", "val_fraction=0.3", "--set", "patch_shape=[32, 32]")) == 0
    log = (out / "train.log").read_text()
    assert "masks/002.tif: 1 of 6 objects has holes" in log and "masks/002.tif: 1 of 6 objects is not contiguous" in log
    assert "not star-convex" in log


def test_stardist_distances_are_scaled_in_the_target():
    from deepscope.tasks.segment.config import SegmentConfig
    from deepscope.tasks.segment.task import training_target

    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 8:24, 8:24] = 1
    mask = torch.ones(1, 1, 32, 32)
    plain, _ = training_target(SegmentConfig(data="x", target="stardist", n_rays=8, dist_scale=1.0), labels, mask)
    scaled, _ = training_target(SegmentConfig(data="x", target="stardist", n_rays=8, dist_scale=4.0), labels, mask)
    assert torch.allclose(scaled[:, 1:] * 4, plain[:, 1:]) and torch.equal(scaled[:, 0], plain[:, 0])
    assert plain[0, 1, 16, 16] == pytest.approx(8, abs=1)  # ray 0 along +x from (16, 16) to the edge at x = 24
