"""The denoise task end to end through the CLI: the three methods, evaluation, prediction to files, 3D, colour,
resume, the demo, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from conftest import cpu_unet_options, evaluate_checkpoint_args, evaluate_saved_args, two_process_launcher
from deepscope.cli import main
from deepscope.engine.checkpoint import load_checkpoint


def smooth_images(n: int, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """uint8 images of smooth blobs over a gradient: easy to tell from noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        field = ndimage.gaussian_filter(rng.random(shape), sigma=3 if len(shape) == 2 else 2)
        field = (field - field.min()) / (field.max() - field.min())
        ramp = np.linspace(0, 1, shape[-1])
        images.append(np.clip(40 + 160 * field + 40 * ramp, 0, 255).astype(np.uint8))
    return images


def write_clean(root: Path, n_train: int = 6, n_test: int = 2, size: int = 64) -> Path:
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        (root / split / "clean").mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(smooth_images(n, (size, size), seed)):
            Image.fromarray(image).save(root / split / "clean" / f"im{i}.png")
    return root


def write_noisy_pairs(root: Path, sigma: float = 20, size: int = 64) -> Path:
    """noisy/ and noisy2/ (float32 TIFF, unclipped) and clean/ (PNG) in train/ and test/."""
    rng = np.random.default_rng(7)
    for split, n, seed in (("train", 6, 0), ("test", 2, 1)):
        for folder in ("noisy", "noisy2", "clean"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(smooth_images(n, (size, size), seed)):
            Image.fromarray(image).save(root / split / "clean" / f"im{i}.png")
            for folder in ("noisy", "noisy2"):
                tifffile.imwrite(
                    root / split / folder / f"im{i}.tif", (image + rng.normal(0, sigma, image.shape)).astype(np.float32)
                )
    return root


def dn_args(data: Path, out: Path | None, method: str, *extra: str, epochs: int = 5) -> list[str]:
    """A small, quick CPU denoising run through the CLI, in float32 on every processor (scores compare with ``evaluate``);
    ``out`` None: no --out, the caller adds it."""
    where = ["--out", str(out)] if out is not None else []
    return [
        "train",
        "denoise",
        "--data",
        str(data),
        *where,
        "--method",
        method,
        "--epochs",
        str(epochs),
        *cpu_unet_options(batch_size=16, lr=0.004, depth=2, patch=32, patches_per_epoch=320, val_fraction=0.2),
        *extra,
    ]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def run_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    return write_clean(tmp_path_factory.mktemp("clean") / "data")


@pytest.fixture(scope="module")
def n2v_run(clean_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "n2v"
    assert (
        main(
            dn_args(
                clean_data,
                out,
                "n2v",
                "--set",
                "noise={kind: gaussian, sigma: 25}",
                "--set",
                "blind_spot.ratio=0.03",
                epochs=8,
            )
        )
        == 0
    )
    return out


def test_noise2void_learns_from_noisy_images_alone(n2v_run):
    metrics = json.loads((n2v_run / "metrics.json").read_text())
    assert metrics["test_psnr"] > metrics["test_psnr_input"] + 2, metrics
    assert metrics["test_ssim"] > metrics["test_ssim_input"]
    assert metrics["test_data_range"] == 255.0
    assert (n2v_run / "report.html").exists() and (n2v_run / "crops.png").exists()
    assert "PSNR and SSIM (test images)" in (n2v_run / "report.html").read_text()
    config = (n2v_run / "config.yaml").read_text()
    assert "monitor: psnr" in config and "method: n2v" in config


def test_evaluate_checkpoint_agrees_with_scoring_its_saved_results(n2v_run, clean_data, tmp_path, capsys):
    preds = tmp_path / "preds"
    assert (
        main(
            evaluate_checkpoint_args(
                n2v_run / "best.pt", clean_data, tmp_path / "e1.json", "--split", "test", "--save-pred", str(preds)
            )
        )
        == 0
    )
    from_model = last_json(capsys)
    assert main(evaluate_saved_args("denoise", preds, clean_data / "test" / "clean", tmp_path / "e2.json")) == 0
    from_files = last_json(capsys)
    assert from_files["psnr"] == pytest.approx(from_model["psnr"], abs=1e-6)
    assert from_files["ssim"] == pytest.approx(from_model["ssim"], abs=1e-6)
    assert [r["name"] for r in from_files["per_image"]] == ["im0", "im1"] and from_files["data_range"] == 255.0
    metrics = json.loads((n2v_run / "metrics.json").read_text())
    # training scored the same noisy test images
    assert from_model["psnr"] == pytest.approx(metrics["test_psnr"], abs=0.05)
    assert main(evaluate_checkpoint_args(n2v_run / "best.pt", clean_data, tmp_path / "e3.json", "--tta")) == 0
    assert last_json(capsys)["tta"] is True


def test_predict_tiles_match_the_whole_image_and_write_every_format(n2v_run, clean_data, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(smooth_images(1, (200, 200), 5)[0]).save(big)
    whole, tiled = tmp_path / "whole.tif", tmp_path / "tiled.tif"
    assert (
        main(["predict", str(n2v_run / "best.pt"), str(big), "--out", str(whole), "--tile", "256", "--device", "cpu"])
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(n2v_run / "best.pt"),
                str(big),
                "--out",
                str(tiled),
                "--tile",
                "96",
                "--halo",
                "48",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    a, b = tifffile.imread(whole), tifffile.imread(tiled)
    assert a.shape == (200, 200) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=0.01)  # halo // 2 covers the receptive field: tiling changes nothing
    source = clean_data / "test" / "clean" / "im0.png"
    assert (
        main(
            [
                "predict",
                str(n2v_run / "best.pt"),
                str(source),
                "--out",
                str(tmp_path / "out.h5"),
                "--tta",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["denoised"].shape == (64, 64)
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                str(n2v_run / "best.pt"),
                str(clean_data / "test" / "clean"),
                "--out",
                str(tmp_path / "folder"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert last_json(capsys)["predictions"] == 2 and sorted(p.name for p in (tmp_path / "folder").iterdir()) == [
        "im0.tif",
        "im1.tif",
    ]


def test_noise2noise_learns_from_pairs_of_noisy_acquisitions(tmp_path):
    data = write_noisy_pairs(tmp_path / "pairs")
    assert main(dn_args(data, tmp_path / "n2n", "n2n")) == 0
    metrics = json.loads((tmp_path / "n2n" / "metrics.json").read_text())
    assert metrics["test_psnr"] > metrics["test_psnr_input"] + 3, metrics


def test_supervised_baseline_learns_noisy_to_clean(tmp_path):
    data = write_noisy_pairs(tmp_path / "pairs")
    for split in ("train", "test"):
        for path in (data / split / "noisy2").iterdir():
            path.unlink()
        (data / split / "noisy2").rmdir()
    assert main(dn_args(data, tmp_path / "sup", "supervised")) == 0
    metrics = json.loads((tmp_path / "sup" / "metrics.json").read_text())
    assert metrics["test_psnr"] > metrics["test_psnr_input"] + 3, metrics


def test_volumes_train_n2v2_without_clean_images_and_predict_in_3d(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "vol" / "noisy").mkdir(parents=True)
    for i, volume in enumerate(smooth_images(3, (16, 32, 32), 0)):
        tifffile.imwrite(
            tmp_path / "vol" / "noisy" / f"v{i}.tif", (volume + rng.normal(0, 20, volume.shape)).astype(np.float32)
        )
    out = tmp_path / "run3d"
    n2v2 = (
        "--set",
        "model_args={features: 8, depth: 2, blurpool: true, top_skip: false}",
        "--set",
        "blind_spot.replace=median",
    )
    args = dn_args(
        tmp_path / "vol",
        out,
        "n2v",
        "--set",
        "patch_shape=[8, 16, 16]",
        "--set",
        "inference.tile=[16, 32, 32]",
        "--set",
        "val_fraction=0.34",
        *n2v2,
        epochs=2,
    )
    assert main(args) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    # no clean images: the validation loss is monitored
    assert "val_loss" in history[-1] and "val_psnr" not in history[-1]
    assert "monitor: loss" in (out / "config.yaml").read_text()
    assert load_checkpoint(out / "best.pt")["task_state"]["model_settings"]["blurpool"] is True
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                str(out / "best.pt"),
                str(tmp_path / "vol" / "noisy" / "v0.tif"),
                "--out",
                str(tmp_path / "v0.zarr"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    import zarr

    assert zarr.open_group(str(tmp_path / "v0.zarr"), mode="r")["denoised"].shape == (16, 32, 32)


def test_colour_images_with_fresh_noise_keep_their_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 1)):
        (tmp_path / "rgb" / split / "clean").mkdir(parents=True)
        for i in range(n):
            rgb = np.stack(smooth_images(3, (48, 48), int(rng.integers(100))), axis=-1)
            Image.fromarray(rgb).save(tmp_path / "rgb" / split / "clean" / f"c{i}.png")
    out = tmp_path / "rgbrun"
    assert (
        main(dn_args(tmp_path / "rgb", out, "n2n", "--set", "noise={kind: gaussian, sigma: 25, fresh: true}", epochs=3))
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_psnr"] > metrics["test_psnr_input"]
    assert load_checkpoint(out / "best.pt")["task_state"]["channels"] == 3
    assert (
        main(
            [
                "predict",
                str(out / "best.pt"),
                str(tmp_path / "rgb" / "test" / "clean" / "c0.png"),
                "--out",
                str(tmp_path / "c0.tif"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert tifffile.imread(tmp_path / "c0.tif").shape == (48, 48, 3)
    # saved evaluation results keep the same layout, so they score against the clean PNGs
    preds = tmp_path / "preds"
    assert (
        main(
            evaluate_checkpoint_args(out / "best.pt", tmp_path / "rgb", tmp_path / "e1.json", "--save-pred", str(preds))
        )
        == 0
    )
    assert main(evaluate_saved_args("denoise", preds, tmp_path / "rgb" / "test" / "clean", tmp_path / "e2.json")) == 0
    scored = [json.loads((tmp_path / name).read_text()) for name in ("e1.json", "e2.json")]
    assert scored[1]["psnr"] == pytest.approx(scored[0]["psnr"], abs=1e-6)


def test_resume_after_interruption_equals_an_uninterrupted_run(clean_data, tmp_path):
    # steps_per_epoch given (one pass, 320 / 16): the budget only cuts the run, it plans nothing
    extra = ("--set", "noise={kind: gaussian, sigma: 25}", "--set", "steps_per_epoch=20")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(dn_args(clean_data, straight, "n2v", *extra, epochs=2)) == 0
    assert main(dn_args(clean_data, split, "n2v", *extra, "--max-minutes", "0.0005", epochs=2)) == 0
    first = load_checkpoint(split / "last.pt")
    assert (first["epoch"], first["epoch_complete"]) == (0, False)
    assert main(["train", "denoise", "--out", str(split), "--resume", "--max-minutes", "60"]) == 0
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(split / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow  # over 30 s on 2 cores
def test_demo_denoise_cleans_the_held_out_photograph(tmp_path, capsys):
    assert main(["demo", "denoise", "--out", str(tmp_path / "demo")]) == 0
    result = last_json(capsys)
    assert result["test_psnr"] > result["test_psnr_noisy"] + 5, result
    assert (tmp_path / "demo" / "report.html").exists()


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_pairs_of_different_shapes_are_refused(tmp_path, capsys):
    data = write_noisy_pairs(tmp_path / "pairs")
    tifffile.imwrite(data / "train" / "noisy2" / "im3.tif", np.zeros((60, 64), np.float32) + np.arange(64))
    err = run_error(dn_args(data, tmp_path / "run", "n2n"), capsys)
    assert "im3.tif" in err and "does not match" in err


def test_constant_and_nan_images_are_refused(tmp_path, capsys):
    data = write_clean(tmp_path / "c", n_train=3, n_test=1)
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(data / "train" / "clean" / "flat.png")
    err = run_error(dn_args(data, tmp_path / "run", "n2v", "--set", "noise.kind=gaussian"), capsys)
    assert "flat.png" in err and "constant image" in err
    (tmp_path / "n" / "noisy").mkdir(parents=True)
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    tifffile.imwrite(tmp_path / "n" / "noisy" / "ok.tif", image)
    image[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "n" / "noisy" / "bad.tif", image)
    err = run_error(dn_args(tmp_path / "n", tmp_path / "run2", "n2v"), capsys)
    assert "bad.tif" in err and "NaN" in err


def test_predicting_an_image_with_nans_names_it(n2v_run, tmp_path, capsys):
    image = np.full((40, 40), 100, np.float32)
    image[5, 5] = np.nan
    tifffile.imwrite(tmp_path / "holes.tif", image)
    err = run_error(
        [
            "predict",
            str(n2v_run / "best.pt"),
            str(tmp_path / "holes.tif"),
            "--out",
            str(tmp_path / "o.tif"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert "holes.tif" in err and "NaN" in err


def test_a_data_range_that_does_not_fit_the_images_is_refused(tmp_path, capsys):
    data = write_clean(tmp_path / "c", n_train=1, n_test=1)
    truth = data / "test" / "clean"
    err = run_error(evaluate_saved_args("denoise", truth, truth, tmp_path / "e.json", "--data-range", "1000"), capsys)
    assert "im0.png" in err and "does not match its dtype uint8" in err
    (tmp_path / "f").mkdir()
    tifffile.imwrite(tmp_path / "f" / "a.tif", np.linspace(0, 255, 64 * 64, dtype=np.float32).reshape(64, 64))
    err = run_error(
        evaluate_saved_args("denoise", tmp_path / "f", tmp_path / "f", tmp_path / "e.json", "--data-range", "1"), capsys
    )
    assert "a.tif" in err and "wider than the data range 1" in err


def test_evaluate_denoise_scores_saved_images_against_hand_computed_psnr(tmp_path, capsys):
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    truth = np.tile(np.arange(32, dtype=np.uint8) * 4, (32, 1))
    Image.fromarray(truth).save(tmp_path / "truth" / "a.png")
    tifffile.imwrite(tmp_path / "pred" / "a.tif", truth.astype(np.float32) + 3)
    assert main(evaluate_saved_args("denoise", tmp_path / "pred", tmp_path / "truth", tmp_path / "e.json")) == 0
    result = last_json(capsys)
    assert result["psnr"] == pytest.approx(20 * np.log10(255 / 3)) and result["per_image"][0]["name"] == "a"
    assert 0 < result["ssim"] <= 1 and json.loads((tmp_path / "e.json").read_text())["images"] == 1


def test_missing_partners_and_missing_method_data_are_explained(tmp_path, capsys):
    data = write_noisy_pairs(tmp_path / "pairs")
    (data / "train" / "clean" / "im2.png").unlink()
    err = run_error(dn_args(data, tmp_path / "run", "supervised"), capsys)
    assert "im2" in err and "no clean partner" in err
    solo = tmp_path / "solo" / "noisy"
    solo.mkdir(parents=True)
    tifffile.imwrite(solo / "a.tif", np.random.default_rng(0).random((64, 64)).astype(np.float32))
    err = run_error(dn_args(solo.parent, tmp_path / "run2", "n2n"), capsys)
    assert "n2n needs second noisy acquisitions" in err
    err = run_error(dn_args(solo.parent, tmp_path / "run3", "n2v", "--set", "noise.kind=gaussian"), capsys)
    assert "noise.kind" in err and "noisy" in err


def test_two_gloo_processes_train_and_score_every_validation_image_once(clean_data, tmp_path):
    import os
    import subprocess

    args = dn_args(
        clean_data,
        tmp_path / "ddp",
        "n2v",
        "--set",
        "noise={kind: gaussian, sigma: 25}",
        "--set",
        "val_fraction=0.5",
        epochs=1,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = two_process_launcher(29527)
    done = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["val"]["images"] == 3
    assert sorted(r["name"] for r in metrics["val"]["per_image"]) == sorted(
        {r["name"] for r in metrics["val"]["per_image"]}
    )
