"""deepscope export: ONNX and TorchScript files equal the checkpoint's network on real images, carry the settings
deepscope predicts with, and predict as the checkpoint does; what cannot be exported is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import cpu_unet_options, fast_args, last_json, one_line_error, train_args
from deepscope.cli import main
from deepscope.demo.data import write_digits_npz
from deepscope.export.exportable import Exportable
from deepscope.export.formats import TOLERANCE, export
from deepscope.export.runtime import exported_format, exported_metadata, load_exported
from deepscope.models import build_unet

pytest.importorskip("onnxruntime", reason="export tests need onnxruntime (pip install -e '.[test]')")

FORMATS = ("onnx", "torchscript")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_segmentation_export_equals_the_checkpoint_and_predicts_the_same_instances(
    small_flows_run, small_nuclei, tmp_path, capsys, fmt
):
    capsys.readouterr()
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(small_flows_run / "best.pt"), "--format", fmt, "--out", str(out)]) == 0
    result = last_json(capsys)
    assert result["max_abs_difference"] <= TOLERANCE and len(result["checked_shapes"]) == 2  # the example, one larger
    assert result["input_axes"] == "bcyx" and result["spatial_multiple"] == [4, 4]
    assert "test" in result["notes"][-1]  # the example image comes from the test split
    metadata = exported_metadata(out)
    assert metadata["task"] == "segment" and metadata["config"]["target"] == "flows"
    assert metadata["task_state"]["divisor"] == [4, 4]
    image = sorted((small_nuclei / "test" / "images").iterdir())[0]
    predicted = {}
    for name, model in (("checkpoint", small_flows_run / "best.pt"), ("export", out)):
        target = tmp_path / f"{name}.h5"
        assert main(["predict", str(model), str(image), "--out", str(target), "--instances", "--device", "cpu"]) == 0
        import h5py

        with h5py.File(target) as f:
            predicted[name] = (f["probabilities"][...], f["instances"][...])
    np.testing.assert_allclose(predicted["export"][0], predicted["checkpoint"][0], atol=1e-4)
    np.testing.assert_array_equal(predicted["export"][1], predicted["checkpoint"][1])


def test_a_real_image_checks_the_export(small_flows_run, shared_data, tmp_path, capsys):
    """An ISBI 2012 electron microscopy slice (512x512, grey) as --sample: the check runs on its first tile."""
    images = shared_data / "isbi2012_em" / "images"
    if not images.is_dir():
        pytest.skip(f"{images} not found")
    sample = sorted(images.iterdir())[0]
    capsys.readouterr()
    out = tmp_path / "dsb.onnx"
    args = ["export", str(small_flows_run / "best.pt"), "--format", "onnx", "--out", str(out), "--sample", str(sample)]
    assert main(args) == 0
    result = last_json(capsys)
    assert result["max_abs_difference"] <= TOLERANCE and str(sample) in result["notes"][-1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_3d_unet_exports_with_free_depth_height_and_width(tmp_path, fmt):
    torch.manual_seed(0)
    net = build_unet(1, 2, 3, features=4, depth=2).eval()
    volume = torch.rand(1, 1, 8, 16, 12)
    state = {"config": {"task": "segment"}, "task_state": {}}
    out = tmp_path / f"unet3d.{fmt}"
    result = export(Exportable("segment", net, volume, (4, 4, 4), state, "test"), fmt, out)
    assert result["input_axes"] == "bczyx" and result["checked_shapes"][1] == [1, 1, 12, 20, 16]
    model, metadata = load_exported(out, torch.device("cpu"))
    other = torch.rand(2, 1, 4, 8, 24)  # another batch and shape again, after loading
    with torch.no_grad():
        np.testing.assert_allclose(model(other).numpy(), net(other).numpy(), atol=1e-5)
    assert metadata["axes"] == "bczyx"


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("noisy") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 1)):
        for role in ("noisy", "clean"):
            (root / split / role).mkdir(parents=True)
        for i in range(n):
            smooth = np.cumsum(np.cumsum(rng.normal(size=(64, 64)), 0), 1)
            clean = (smooth - smooth.min()) / np.ptp(smooth) * 200
            tifffile.imwrite(root / split / "clean" / f"im{i}.tif", clean.astype(np.float32))
            noisy = clean + rng.normal(0, 20, clean.shape)
            tifffile.imwrite(root / split / "noisy" / f"im{i}.tif", noisy.astype(np.float32))
    return root


@pytest.fixture(scope="module")
def denoise_run(noisy, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "n2v"
    options = cpu_unet_options(batch_size=16, lr=0.004, depth=2, patch=32, patches_per_epoch=64, val_fraction=0.2)
    assert main(train_args("denoise", noisy, run, 1, "--method", "n2v", *options)) == 0
    return run


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_denoiser_export_denoises_as_the_checkpoint(denoise_run, noisy, tmp_path, capsys, fmt):
    run = denoise_run
    out = tmp_path / f"n2v.{fmt}"
    capsys.readouterr()
    assert main(["export", str(run / "best.pt"), "--format", fmt, "--out", str(out)]) == 0
    assert last_json(capsys)["max_abs_difference"] <= TOLERANCE
    image = noisy / "test" / "noisy" / "im0.tif"
    for name, model in (("checkpoint", run / "best.pt"), ("export", out)):
        assert main(["predict", str(model), str(image), "--out", str(tmp_path / f"{name}.tif"), "--device", "cpu"]) == 0
    np.testing.assert_allclose(
        tifffile.imread(tmp_path / "export.tif"), tifffile.imread(tmp_path / "checkpoint.tif"), atol=1e-3
    )  # in the image's units (0..255): 1e-5 of its range


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_classifier_export_gives_the_checkpoints_probabilities(class_tree, tmp_path, capsys, fmt):
    run = tmp_path / "cnn"
    assert main(fast_args(class_tree, run)) == 0
    out = tmp_path / f"cnn.{fmt}"
    capsys.readouterr()
    assert main(["export", str(run / "best.pt"), "--format", fmt, "--out", str(out)]) == 0
    result = last_json(capsys)
    assert result["max_abs_difference"] <= TOLERANCE and result["spatial_multiple"] is None
    assert result["input_shape"][0] == 2  # two images: a batch axis the trace froze would be caught
    files = sorted(p for p in (class_tree / "train").rglob("*.png"))[:5]
    csvs = {}
    for name, model in (("checkpoint", run / "best.pt"), ("export", out)):
        target = tmp_path / f"{name}.csv"
        assert main(["predict", str(model), *map(str, files), "--out", str(target), "--device", "cpu"]) == 0
        csvs[name] = [line.split(",") for line in target.read_text().splitlines()]
    exported, expected = csvs["export"], csvs["checkpoint"]
    assert exported[0] == expected[0] and [row[:2] for row in exported] == [row[:2] for row in expected]  # classes
    np.testing.assert_allclose(
        np.array([row[2:] for row in exported[1:]], float),
        np.array([row[2:] for row in expected[1:]], float),
        atol=1e-4,
    )


def test_an_ssl_encoder_exports_its_features(tmp_path, capsys):
    data = write_digits_npz(tmp_path / "digits.npz")
    run = tmp_path / "ssl"
    options = ["--batch-size", "64", "--amp", "off", "--set", "model_args.width=4", "--set", "probe_fractions=[1]"]
    assert main(train_args("ssl", data, run, 1, *options, "--set", "steps_per_epoch=2", "--set", "knn_bank=100")) == 0
    out = tmp_path / "encoder.onnx"
    capsys.readouterr()
    assert main(["export", str(run / "best.pt"), "--format", "onnx", "--out", str(out)]) == 0
    result = last_json(capsys)
    assert result["max_abs_difference"] <= TOLERANCE and result["task"] == "ssl"
    assert "projection head is left out" in result["notes"][0]


def test_what_cannot_be_exported_or_run_is_refused_in_one_line(small_flows_run, tmp_path, capsys):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model at all")
    assert "not a readable ONNX model" in one_line_error(
        ["predict", str(bogus), str(bogus), "--out", str(tmp_path)], capsys
    )
    assert str(bogus) in one_line_error(["export", str(bogus), "--format", "onnx"], capsys)
    # an ONNX file made elsewhere has no deepscope settings to predict with
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), plain)
    assert exported_format(plain) == "onnx" and exported_metadata(plain) is None
    assert "not exported by deepscope" in one_line_error(
        ["predict", str(plain), str(plain), "--out", str(tmp_path)], capsys
    )
    # an export refused by the check leaves no file behind
    out = tmp_path / "missing-sample.onnx"
    err = one_line_error(
        [
            "export",
            str(small_flows_run / "best.pt"),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--sample",
            str(tmp_path / "nope.tif"),
        ],
        capsys,
    )
    assert "nope.tif" in err and not out.exists()
