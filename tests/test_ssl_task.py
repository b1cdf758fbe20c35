"""The ssl task end to end through the CLI: train, monitor, probes, report, resume, evaluate --probe, transfer by
--init-from (classify and segment) with --freeze-encoder, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepscope.cli import main
from deepscope.demo.data import write_digits_npz, write_nuclei
from deepscope.engine.checkpoint import load_checkpoint
from deepscope.losses.ssl import nt_xent, vicreg
from deepscope.models.ssl import SSLModel, build_encoder

TINY = [
    "--model",
    "resnet18",
    "--set",
    "model_args.width=8",
    "--set",
    "channels_last=false",
    "--batch-size",
    "64",
    "--amp",
    "off",
]


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_npz(tmp_path_factory.mktemp("digits") / "digits.npz")


@pytest.fixture(scope="module")
def pretrained(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ssl") / "run"
    assert (
        main(
            [
                "train",
                "ssl",
                "--data",
                str(digits),
                "--epochs",
                "6",
                "--out",
                str(out),
                *TINY,
                "--set",
                "view_settings={crop_scale: [0.3, 1.0]}",
                "--set",
                "probe_fractions=[0.1, 1]",
            ]
        )
        == 0
    )
    return out


def few_labels(digits: Path, path: Path, per_class: int) -> Path:
    """The digits with ``per_class`` training images of each class, and all test images."""
    data = np.load(digits)
    keep = np.concatenate([np.flatnonzero(data["y_train"] == c)[:per_class] for c in range(10)])
    np.savez(
        path, x_train=data["x_train"][keep], y_train=data["y_train"][keep], x_test=data["x_test"], y_test=data["y_test"]
    )
    return path


def few_labels_resnet_args(data: Path, epochs: int, *extra: str) -> list[str]:
    """``train classify`` of a narrow ResNet-18 on the few-label set ``data`` for ``epochs``, with no validation split;
    ``extra`` options follow."""
    return [
        "train",
        "classify",
        "--data",
        str(data),
        "--model",
        "resnet18",
        "--set",
        "model_args.width=8",
        "--epochs",
        str(epochs),
        "--batch-size",
        "10",
        "--amp",
        "off",
        "--val-fraction",
        "0",
        *extra,
    ]


def test_training_monitors_knn_probes_against_a_random_encoder_and_reports(pretrained: Path) -> None:
    metrics = json.loads((pretrained / "metrics.json").read_text())
    knn = [h["val_knn_accuracy"] for h in metrics["history"]]
    assert len(knn) == 6 and knn[-1] > knn[0]
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert metrics["linear_accuracy@1"] > metrics["random_encoder_linear_accuracy@1"]
    assert metrics["knn_accuracy"] > metrics["random_encoder_knn_accuracy"]
    assert set(metrics) >= {"linear_accuracy@0.1", "random_encoder_linear_accuracy@0.1"}
    report = (pretrained / "report.html").read_text()
    assert "embedding.png" in report and "neighbours.png" in report and "random init" in report
    assert (pretrained / "embedding.png").stat().st_size > 0
    assert "monitor: knn_accuracy" in (pretrained / "config.yaml").read_text()


def test_evaluate_probes_a_checkpoint(pretrained: Path, digits: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "evaluate",
                str(pretrained / "best.pt"),
                "--data",
                str(digits),
                "--probe",
                "knn",
                "linear",
                "--fractions",
                "0.1",
                "1",
                "--out",
                str(pretrained / "eval.json"),
            ]
        )
        == 0
    )
    result = last_json(capsys)
    trained = json.loads((pretrained / "metrics.json").read_text())
    assert result["knn_accuracy"] == pytest.approx(trained["knn_accuracy"], abs=1e-6)
    assert result["linear_accuracy@1"] == pytest.approx(trained["linear_accuracy@1"], abs=1e-6)
    assert "linear_accuracy@0.01" not in result


def test_resume_replays_the_same_run(digits: Path, tmp_path: Path) -> None:
    train = np.load(digits)
    small = tmp_path / "small.npz"
    np.savez(small, x_train=train["x_train"][:180], y_train=train["y_train"][:180])  # no test split, no probes: quick
    # epochs and steps given (one pass of 180 // 64 steps): the engine plans no schedule, the clock stops the run
    args = ["train", "ssl", "--data", str(small), *TINY, "--val-fraction", "0", "--set", "steps_per_epoch=2"]
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    # stops after step 1
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "split"), "--max-minutes", "0.0001"]) == 0
    assert main(["train", "ssl", "--out", str(tmp_path / "split"), "--resume", "--max-minutes", "10"]) == 0
    one, two = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("whole", "split"))
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)


def test_a_pretrained_encoder_learns_faster_on_few_labels(
    pretrained: Path, digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = few_labels(digits, tmp_path / "few.npz", 5)
    args = few_labels_resnet_args(data, 3, "--set", "augment.crop_padding=0", "--set", "augment.flip=false")
    assert main([*args, "--out", str(tmp_path / "scratch")]) == 0
    scratch = last_json(capsys)
    assert main([*args, "--out", str(tmp_path / "ssl"), "--init-from", str(pretrained / "best.pt")]) == 0
    transferred = last_json(capsys)
    assert transferred["test_accuracy"] > scratch["test_accuracy"] + 0.1
    log = (tmp_path / "ssl" / "train.log").read_text()
    assert "initialised 120 of 122 tensors" in log and "mapping encoder.*" in log and "projector" in log


def test_freeze_encoder_trains_only_the_new_head(pretrained: Path, digits: Path, tmp_path: Path) -> None:
    data = few_labels(digits, tmp_path / "few.npz", 5)
    out = tmp_path / "probe"
    assert (
        main(
            few_labels_resnet_args(
                data, 1, "--out", str(out), "--init-from", str(pretrained / "best.pt"), "--freeze-encoder"
            )
        )
        == 0
    )
    encoder = load_checkpoint(pretrained / "best.pt")["model"]
    probe = load_checkpoint(out / "last.pt")["model"]
    for key in ("conv1.weight", "bn1.running_mean", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        torch.testing.assert_close(probe[key], encoder[f"encoder.{key}"], rtol=0, atol=0)
    # parameters only: 60 tensors, running statistics are buffers
    assert "120 frozen" not in (out / "train.log").read_text()
    assert "60 frozen" in (out / "train.log").read_text()
    assert json.loads((out / "metrics.json").read_text())["parameters"] == 64 * 10 + 10


def test_unet_encoder_pretrained_on_unlabelled_patches_starts_a_segmenter(tmp_path: Path) -> None:
    data = write_nuclei(tmp_path / "nuclei", train=6, test=2, size=64)
    unet = ["--set", "model_args={depth: 2, features: 4}"]
    assert (
        main(
            [
                "train",
                "ssl",
                "--data",
                str(data),
                "--model",
                "unet",
                *unet,
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--set",
                "patch_size=32",
                "--amp",
                "off",
                "--out",
                str(tmp_path / "ssl"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "ssl" / "metrics.json").read_text())
    assert "val_loss" in metrics["history"][0] and "knn_accuracy" not in metrics  # no labels: the loss is monitored
    assert (
        main(
            [
                "train",
                "segment",
                "--data",
                str(data),
                *unet,
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--amp",
                "off",
                "--set",
                "patch_shape=[32, 32]",
                "--init-from",
                str(tmp_path / "ssl" / "best.pt"),
                "--out",
                str(tmp_path / "seg"),
            ]
        )
        == 0
    )
    assert "mapping encoder.*" in (tmp_path / "seg" / "train.log").read_text()


# ---- losses: known answers and learning ------------------------------------------------------------------------------


def test_nt_xent_matches_a_direct_implementation() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(10):
        partner = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.3 for j in others])
        total += -(logits[others.index(partner)] - torch.logsumexp(logits, 0))
    assert float(nt_xent(z1, z2, 0.3)) == pytest.approx(float(total / 10), rel=1e-5)


def test_vicreg_terms() -> None:
    z = torch.randn(256, 8)
    z = (z - z.mean(0)) / z.std(0)
    # equal, unit-variance views: nothing to pay
    assert float(vicreg(z, z, covariance=0.0)) == pytest.approx(0.0, abs=1e-3)
    constant = torch.zeros(16, 8)
    # collapse costs
    assert float(vicreg(constant, constant, covariance=0.0)) == pytest.approx(25 * (1 - 1e-2), rel=1e-3)


@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_loss_halves_when_fitting_fixed_views(method: str) -> None:
    torch.manual_seed(0)
    model = SSLModel(build_encoder("resnet18", (3, 8, 8), width=4), [32, 16])
    v1 = torch.rand(16, 3, 8, 8)
    v2 = v1 + 0.1 * torch.randn_like(v1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        z1, z2 = model(torch.cat([v1, v2]))[1].chunk(2)
        return nt_xent(z1, z2, 0.2) if method == "simclr" else vicreg(z1, z2)

    first = float(loss().detach())
    for _ in range(40):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert float(value.detach()) < 0.5 * first


# ---- bad input ----------------------------------------------------------------------------------------------------------


def test_bad_input_is_one_clear_line(
    digits: Path, pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(args: list[str]) -> str:
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert "at least 2 images per process" in error(
        ["train", "ssl", "--data", str(digits), *TINY, "--batch-size", "1", "--out", str(tmp_path / "b1")]
    )
    folder = tmp_path / "plain"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((20, 30), 40 * i, np.uint8)).save(folder / f"{i}.png")
    message = error(
        ["train", "ssl", "--data", str(folder), *TINY, "--set", "patch_size=32", "--out", str(tmp_path / "small")]
    )
    assert "20x30" in message and "0.png" in message
    message = error(
        ["train", "ssl", "--data", str(digits), *TINY, "--set", "view_scale=1.5", "--out", str(tmp_path / "v")]
    )
    assert "view_scale must be in (0, 1]" in message and "1.5" in message
    message = error(["evaluate", str(pretrained / "best.pt"), "--data", str(folder), "--probe", "knn"])
    assert str(folder) in message and "labelled" in message
    message = error(
        [
            "train",
            "classify",
            "--data",
            str(digits),
            "--model",
            "resnet18",
            "--set",
            "model_args.width=16",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "wide"),
            "--init-from",
            str(pretrained / "best.pt"),
        ]
    )
    assert "best.pt" in message and "different shape" in message
    assert "--probe" in error(["evaluate", str(pretrained / "best.pt"), "--data", str(digits)])
    assert "--init-from" in error(
        [
            "train",
            "classify",
            "--data",
            str(digits),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "frozen"),
            "--freeze-encoder",
        ]
    )


@pytest.mark.slow
def test_demo_ssl_beats_the_random_encoder(tmp_path: Path) -> None:
    from deepscope.demo.runs import run_demo

    result = run_demo("ssl", tmp_path / "demo")
    assert result["knn_accuracy"] > result["random_encoder_knn_accuracy"] + 0.05
    assert result["linear_accuracy"] > result["random_encoder_linear_accuracy"] + 0.03
    assert (tmp_path / "demo" / "report.html").exists()


def test_an_ssl_checkpoint_starts_a_detector_backbone(tmp_path: Path) -> None:
    """A width-64 SSL ResNet-18 of images above 64 px (the ImageNet stem: 7x7 convolution and max-pool) fits a detector's
    batch-norm resnet18 backbone key for key (encoder.* -> backbone.body.*); the CIFAR stem of small images would not."""
    from deepscope.engine.checkpoint import load_init_weights
    from deepscope.models.detection import build_detector

    ssl = SSLModel(build_encoder("resnet18", (3, 96, 96)), [32, 16])
    torch.save({"model": ssl.state_dict()}, tmp_path / "ssl.pt")
    detector = build_detector(
        "fcos", 2, 3, backbone="resnet18", norm="batch", fpn_channels=32, min_size=64, max_size=64
    )
    message = load_init_weights(detector, tmp_path / "ssl.pt")
    assert "mapping encoder.* onto backbone.body.*" in message
    body = detector.backbone.body.state_dict()
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var"):
        torch.testing.assert_close(body[key], ssl.state_dict()[f"encoder.{key}"], rtol=0, atol=0)
