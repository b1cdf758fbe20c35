"""The detect task end to end through the CLI: train, resume, evaluate, predict, score saved detections, bad input."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from conftest import TINY_CENTERNET, two_process_launcher
from deepscope.cli import main
from deepscope.demo.data import write_shapes
from deepscope.engine.checkpoint import load_checkpoint, load_init_weights, save_checkpoint
from deepscope.errors import CheckpointError
from deepscope.models.detection import build_detector
from deepscope.tasks.detect.apply import load_detector
from deepscope.tasks.detect.config import DetectConfig
from deepscope.tasks.detect.predict import Detector, DetInferenceConfig
from deepscope.tasks.detect.task import detector_args


def detect_train_args(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    """``train detect`` of a tiny CenterNet on ``data`` for ``epochs`` into ``out``; ``extra`` options follow."""
    return ["train", "detect", "--data", str(data), "--epochs", str(epochs), "--out", str(out), *TINY_CENTERNET, *extra]


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated shapes, 24 training and 6 test images of 64x64 with a COCO file each."""
    return write_shapes(tmp_path_factory.mktemp("shapes"), train=24, test=6, size=64)


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(detect_train_args(shapes, out, 3)) == 0
    return out


def test_training_writes_the_run_folder_and_the_loss_falls(trained: Path) -> None:
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.json", "report.html", "pr_curves.png", "detections.png"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert 0 <= metrics["test_map"] <= metrics["test_map_50"] <= 1
    assert set(metrics["test"]["per_class"]) == {"square", "disc", "triangle"}
    report = (trained / "report.html").read_text()
    assert "mAP" in report and "Best score threshold" in report


def test_given_settings_are_kept_and_open_ones_planned_with_reasons(trained: Path) -> None:
    """The run gave the model, its backbone, native scale and the epochs; the plan fills only what was left open."""
    text = (trained / "config.yaml").read_text()
    header = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    chosen = {line.split(" = ")[0] for line in header if " = " in line}
    assert chosen == {"val_fraction", "max_size", "inference.max_detections", "augment.mosaic"}
    config = yaml.safe_load(text)
    assert config["augment"]["mosaic"] == 0  # native scale: objects keep their pixel size
    assert (config["model"], config["image_size"], config["epochs"]) == ("centernet", 0, 3)
    assert config["model_args"] == {"backbone": "tiny", "fpn_channels": 16}
    # 24 training images and a test split of their own: all are trained on, the test split scores the last epoch
    assert config["val_fraction"] == 0 and config["inference"]["max_detections"] == 100
    assert any(line.startswith("val_fraction = 0") and "own test split" in line for line in header)
    plan = json.loads((trained / "metrics.json").read_text())["plan"]
    assert plan["fingerprint"]["images"] == 24 and plan["settings"]["max_size"] == config["max_size"]


def test_resume_after_an_epoch_equals_an_uninterrupted_run(shapes: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # epochs and steps given: the time limit below only stops the run, the engine plans no schedule for it
    # mosaics in the first of the two epochs only (close_mosaic: the last half of the steps without)
    mosaic = ["--set", "augment.mosaic=1.0", "--set", "augment.close_mosaic=0.5"]
    args = ["train", "detect", "--data", str(shapes), *TINY_CENTERNET, "--set", "steps_per_epoch=6", *mosaic]
    assert main([*args, "--epochs", "2", "--out", str(straight)]) == 0
    # stopped by the time limit after its first step (as a killed run leaves last.pt mid-epoch), then resumed
    assert main([*args, "--epochs", "2", "--out", str(resumed), "--max-minutes", "0.00001"]) == 0
    assert json.loads((resumed / "metrics.json").read_text())["stopped"] == "max_minutes"
    assert main(["train", "detect", "--resume", "--out", str(resumed), "--set", "max_minutes=null"]) == 0
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(resumed / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_predict_and_score_saved_detections_agree(
    trained: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(trained / "best.pt"), "--data", str(shapes), "--split", "test"]) == 0
    scores = last_json(capsys)
    assert scores["map"] == pytest.approx(json.loads((trained / "metrics.json").read_text())["test_map"])
    pred = tmp_path / "pred.json"
    assert main(["predict", str(trained / "best.pt"), str(shapes / "test" / "images"), "--out", str(pred)]) == 0
    coco = json.loads(pred.read_text())
    assert {i["file_name"] for i in coco["images"]} == {p.name for p in (shapes / "test" / "images").iterdir()}
    assert all(len(a["bbox"]) == 4 and 0 <= a["score"] <= 1 for a in coco["annotations"])
    for truth in (shapes / "test", shapes / "test" / "annotations.json"):  # a data folder or a COCO file
        assert (
            main(["evaluate", "detect", "--pred", str(pred), "--truth", str(truth), "--out", str(tmp_path / "s.json")])
            == 0
        )
        saved = last_json(capsys)
        assert saved["map"] == pytest.approx(scores["map"]) and saved["map_50"] == pytest.approx(scores["map_50"])
        assert saved["max_detections"] == 100 and "per_class" in saved


def test_the_inference_thresholds_reach_the_model() -> None:
    """Detectors filter their own candidates (RetinaNet: score 0.05, NMS 0.5 built in): the inference settings are the
    model's too. An untrained RetinaNet scores about 0.01 (its prior), so only a threshold that reaches the model
    lets its boxes out."""
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8)
    small = {"backbone": "tiny", "fpn_channels": 16}
    for settings, expected in (({"score_threshold": 0.0, "nms_iou": 0.9}, (0.0, 0.9)), ({}, (0.05, 0.7))):
        inference = DetInferenceConfig(**settings)
        cfg = DetectConfig(
            data="x", model="retinanet", model_args=small, image_size=64, max_size=80, inference=inference
        )
        torch.manual_seed(0)
        model = build_detector("retinanet", 1, 3, **detector_args(cfg))
        assert (model.score_thresh, model.nms_thresh) == expected
        found = Detector(model, cfg.inference, torch.device("cpu"))(image)["scores"]
        assert (len(found) > 0 and found.max() < 0.05) if settings else len(found) == 0


def test_predict_writes_voc_yolo_pictures_and_tiles(
    trained: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = shapes / "test" / "images"
    assert (
        main(
            [
                "predict",
                str(trained / "best.pt"),
                str(images),
                "--out",
                str(tmp_path / "voc"),
                "--format",
                "voc",
                "--draw",
            ]
        )
        == 0
    )
    assert (
        len(list((tmp_path / "voc").glob("*.xml"))) == 6
        and (tmp_path / "voc" / "pictures" / "detections.png").is_file()
    )
    assert (
        main(["predict", str(trained / "best.pt"), str(images), "--out", str(tmp_path / "yolo"), "--format", "yolo"])
        == 0
    )
    assert len(list((tmp_path / "yolo").glob("*.txt"))) == 6
    assert (
        main(
            [
                "predict",
                str(trained / "best.pt"),
                str(images),
                "--out",
                str(tmp_path / "t.json"),
                "--tile",
                "48",
                "--overlap",
                "24",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["settings"]["tile"] == [48, 48]


def test_bad_flags_and_checkpoints_fail_in_one_line(
    trained: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(trained / "best.pt")
    assert (
        main(["predict", ckpt, str(shapes / "test" / "images"), "--out", str(tmp_path / "x.json"), "--format", "voc"])
        == 2
    )
    assert "folder" in capsys.readouterr().err
    assert main(["predict", ckpt, str(shapes / "test" / "images"), "--out", str(tmp_path / "x"), "--halo", "8"]) == 2
    assert "--halo" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    save_checkpoint({"model": {}, "config": {"task": "segment"}}, other)
    with pytest.raises(CheckpointError, match="segment"):
        load_detector(other, torch.device("cpu"))
    assert main(detect_train_args(shapes, tmp_path / "r", 1, "--init-from", str(other))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err


def test_init_from_a_torchvision_resnet_fits_the_backbone_or_names_what_does_not(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = build_detector("fcos", 2, 3, backbone="resnet18", norm="batch", fpn_channels=32, min_size=64, max_size=64)
    message = load_init_weights(model, weights)
    assert "backbone.body." in message and "fc.weight" in message
    source = torch.load(weights)
    assert torch.equal(model.state_dict()["backbone.body.layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    grouped = build_detector("fcos", 2, 3, backbone="resnet18", norm="group", fpn_channels=32, min_size=64, max_size=64)
    with pytest.raises(CheckpointError, match="batch-norm statistics"):
        load_init_weights(grouped, weights)
    wrong = tmp_path / "wrong.pt"
    torch.save({"layer1.0.conv1.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    with pytest.raises(CheckpointError, match="different shape"):
        load_init_weights(model, wrong)


def test_a_whole_detector_checkpoint_initialises_a_new_run(
    trained: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fine"
    assert main(detect_train_args(shapes, out, 1, "--init-from", str(trained / "best.pt"))) == 0
    log = (out / "train.log").read_text()
    assert "initialised" in log and "of " in log
    state = load_checkpoint(out / "last.pt")
    assert state["config"]["init_from"] == str(trained / "best.pt")
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["history"][0]["train_loss"])


def test_two_gloo_processes_train_and_score_every_test_image_once(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under DDP each process predicts its share of the test images; the gathered score equals one process scoring
    them all with the same weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = two_process_launcher(29531)
    out = tmp_path / "ddp"
    run = subprocess.run(
        [*launcher, *detect_train_args(shapes, out, 1)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert main(["evaluate", str(out / "best.pt"), "--data", str(shapes), "--split", "test"]) == 0
    assert last_json(capsys)["map"] == pytest.approx(metrics["test_map"])


@pytest.mark.slow
def test_demo_detect_finds_the_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "detect", "--out", str(tmp_path / "demo")]) == 0
    result = last_json(capsys)
    assert result["map_50"] >= 0.8 and result["map"] > 0.5
    assert (tmp_path / "demo" / "report.html").is_file()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_detector_predicts_and_scores_as_the_checkpoint(
    trained: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    pytest.importorskip("onnxruntime", reason="export tests need onnxruntime (pip install -e '.[test]')")
    out = tmp_path / f"detector.{fmt}"
    capsys.readouterr()
    assert main(["export", str(trained / "best.pt"), "--format", fmt, "--out", str(out)]) == 0
    result = last_json(capsys)
    assert result["checked_shapes"] == [[2, 3, 64, 64], [2, 3, 65, 65]] and result["max_abs_difference"] < 1e-3
    found = {}
    for name, model in (("checkpoint", trained / "best.pt"), ("export", out)):
        target = tmp_path / f"{name}.json"
        assert main(["predict", str(model), str(shapes / "test" / "images"), "--out", str(target)]) == 0
        found[name] = json.loads(target.read_text())["annotations"]
        # tiles of a 64-pixel image: the export takes batches of same-size tiles as the checkpoint does
        tiled = tmp_path / f"{name}_tiled.json"
        tiles = ["--tile", "48", "--overlap", "16"]
        assert main(["predict", str(model), str(shapes / "test" / "images"), "--out", str(tiled), *tiles]) == 0
        found[f"{name}_tiled"] = json.loads(tiled.read_text())["annotations"]
    for key in ("", "_tiled"):
        ours, theirs = found["checkpoint" + key], found["export" + key]
        assert len(ours) == len(theirs) > 0
        assert [(a["image_id"], a["category_id"]) for a in ours] == [(a["image_id"], a["category_id"]) for a in theirs]
        np.testing.assert_allclose([a["bbox"] for a in ours], [a["bbox"] for a in theirs], atol=1e-2)
        np.testing.assert_allclose([a["score"] for a in ours], [a["score"] for a in theirs], atol=1e-4)
    scores = {}
    for name, model in (("checkpoint", trained / "best.pt"), ("export", out)):
        assert main(["evaluate", str(model), "--data", str(shapes), "--out", str(tmp_path / f"e_{name}.json")]) == 0
        scores[name] = last_json(capsys)["map"]
    assert scores["export"] == pytest.approx(scores["checkpoint"], abs=1e-6)


def test_detectors_without_dense_candidates_are_not_exported(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DETR checkpoint (set prediction) is refused in one line; a package is refused for detectors."""
    state = load_checkpoint(trained / "best.pt", task="detect")
    state["config"]["model"] = "detr"
    state["config"]["model_args"] = {"backbone": "tiny", "fpn_channels": 16, "hidden_dim": 32, "dim_feedforward": 32}
    detr = build_detector("detr", 3, 3, **state["config"]["model_args"])
    state["model"] = detr.state_dict()
    save_checkpoint(state, tmp_path / "detr.pt")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "detr.pt"), "--format", "onnx", "--out", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "detr detector cannot be exported" in err and "FCOS" in err
    assert not (tmp_path / "d.onnx").exists()
    assert main(["export", str(trained / "best.pt"), "--format", "bioimageio"]) == 2
    assert "no convention for detections" in capsys.readouterr().err
