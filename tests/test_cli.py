"""The command line end to end: train, evaluate, predict, configs and the demo."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from conftest import fast_args
from deepscope.cli import main


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_evaluate_predict(class_tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(fast_args(class_tree, out, "--epochs", "4")) == 0
    trained = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()

    assert (
        main(["evaluate", str(out / "best.pt"), "--data", str(class_tree), "--split", "test", "--device", "cpu"]) == 0
    )
    result = last_json(capsys)
    assert result["accuracy"] == pytest.approx(trained["test"]["accuracy"])
    assert result["num_samples"] == 30
    assert json.loads((out / "eval_test.json").read_text())["accuracy"] == result["accuracy"]

    # a folder without test/ is a test set as a whole
    assert main(["evaluate", str(out / "best.pt"), "--data", str(class_tree / "test"), "--split", "test"]) == 0
    assert last_json(capsys)["accuracy"] == pytest.approx(result["accuracy"])

    csv_path = tmp_path / "pred.csv"
    assert main(["predict", str(out / "best.pt"), str(class_tree / "test" / "beta"), "--out", str(csv_path)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 10
    assert set(rows[0]) == {"file", "predicted", "prob_alpha", "prob_beta", "prob_gamma"}
    assert sum(r["predicted"] == "beta" for r in rows) >= 9
    assert sum(float(rows[0][f"prob_{n}"]) for n in ["alpha", "beta", "gamma"]) == pytest.approx(1.0, abs=1e-4)


def test_yaml_config_flags_override_and_resolved_config_saved(npz_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": "logreg", "epochs": 1, "optim": {"lr": 0.02, "name": "adamw"}, "augment": {"flip": False}}
        )
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "classify",
                "--data",
                str(npz_data),
                "--config",
                str(config),
                "--epochs",
                "2",
                "--out",
                str(out),
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "logreg" and saved["epochs"] == 2 and saved["optim"]["lr"] == 0.02
    assert saved["augment"]["flip"] is False and saved["task"] == "classify"


def test_resume_with_a_config_file_keeps_other_saved_settings(npz_data, tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "classify",
                "--data",
                str(npz_data),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--optimizer",
                "adamw",
                "--lr",
                "0.02",
                "--model",
                "logreg",
            ]
        )
        == 0
    )
    extra = tmp_path / "more.yaml"
    extra.write_text("epochs: 2\noptim: {weight_decay: 0.01}\n")
    assert main(["train", "classify", "--out", str(out), "--resume", "--config", str(extra)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["optim"] == {
        **saved["optim"],
        "name": "adamw",
        "lr": 0.02,
        "weight_decay": 0.01,
    }


def test_unknown_config_key_is_an_error(npz_data, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("epochz: 3\n")
    assert main(["train", "classify", "--data", str(npz_data), "--config", str(config)]) == 2
    assert "unknown setting(s) epochz" in capsys.readouterr().err


def test_unknown_amp_mode_from_yaml_is_an_error(npz_data, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("amp: bf32\n")
    assert (
        main(["train", "classify", "--data", str(npz_data), "--config", str(config), "--out", str(tmp_path / "run")])
        == 2
    )
    assert "unknown amp mode 'bf32'; choose auto, off, bf16, fp16" in capsys.readouterr().err


def test_demo_reaches_97_percent(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    result = last_json(capsys)
    assert result["test_accuracy"] >= 0.97
    for name in ["report.html", "worst.png", "confusion.png", "best.pt", "config.yaml"]:
        assert (tmp_path / "demo" / name).exists()


@pytest.mark.slow  # 70 s; the segment task's own end-to-end tests cover the same path within the suite's 10 minutes
def test_demo_segment_finds_the_generated_nuclei(tmp_path, capsys):
    assert main(["demo", "segment", "--out", str(tmp_path / "demo")]) == 0
    result = last_json(capsys)
    assert result["test_score_0.5"] >= 0.7
    for name in ["report.html", "overlays.png", "scores.png", "best.pt", "config.yaml"]:
        assert (tmp_path / "demo" / name).exists()


def test_streaming_from_disk_trains_like_memory(class_tree, tmp_path):
    import torch

    from deepscope.data.classification.dataset import FileImageSet
    from deepscope.data.classification.loaders import ToDevice
    from deepscope.engine.distributed import DistInfo
    from deepscope.tasks.classify.config import ClassifyConfig
    from deepscope.tasks.classify.task import ClassifyTask

    task = ClassifyTask(ClassifyConfig(data=str(class_tree), loader="dataloader"))
    task.setup(torch.device("cpu"), DistInfo())
    assert isinstance(task.splits["train"], FileImageSet) and isinstance(task.train_batches(), ToDevice)

    out = tmp_path / "stream"
    assert main(fast_args(class_tree, out, "--epochs", "4", "--loader", "dataloader")) == 0
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] >= 0.9
