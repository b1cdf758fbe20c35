"""deepscope export --format bioimageio: packages that pass bioimageio.core's own model test and predict as their
checkpoint does; packages other tools wrote run through deepscope predict with their own processing, and only with
weights that run none of their code."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from torch import nn

from conftest import cpu_unet_options, last_json, one_line_error, train_args
from deepscope.cli import main
from deepscope.export.bioimageio import architecture_source

pytest.importorskip("bioimageio.core", reason="package tests need bioimageio.core (pip install -e '.[test]')")

ZOO = ["--format", "bioimageio", "--author", "Ada Lovelace", "--license", "MIT"]


def steps(tensor: dict, kind: str) -> list[str]:
    """The processing steps of a tensor, less the dtype casts bioimageio.spec adds."""
    return [step["id"] for step in tensor.get(kind, []) if step["id"] != "ensure_dtype"]


@pytest.fixture(scope="module")
def flows_package(small_flows_run, tmp_path_factory) -> tuple[Path, dict]:
    """The package of the session's small flows run, written once for the tests that read it, and what export said."""
    import contextlib
    import io
    import json

    package = tmp_path_factory.mktemp("flows_package") / "model.zip"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(small_flows_run / "best.pt"), *ZOO, "--out", str(package)]) == 0
    return package, json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("target", ["flows", "foreground_boundaries"])
def test_a_segmentation_package_passes_the_zoo_test_and_predicts_as_its_checkpoint(
    small_nuclei, small_flows_run, tmp_path, capsys, request, target
):
    run = small_flows_run
    if target == "flows":
        package, result = request.getfixturevalue("flows_package")
    else:
        run = tmp_path / target
        options = cpu_unet_options(batch_size=8, lr=0.005, depth=2, patch=64, patches_per_epoch=32, val_fraction=0.2)
        assert main(train_args("segment", small_nuclei, run, 1, *options, "--set", f"target={target}")) == 0
        package = tmp_path / "model.zip"
        capsys.readouterr()
        assert main(["export", str(run / "best.pt"), *ZOO, "--out", str(package)]) == 0
        result = last_json(capsys)
    assert result["bioimageio_test"] == "passed" and max(result["max_abs_difference"].values()) <= 1e-4
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        readme = archive.read("README.md").decode()
    assert {"weights.pt", "weights.torchscript", "weights.onnx", "architecture.py", "cover.png"} <= names
    assert {"test_input.npy", "test_output.npy"} <= names
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    assert steps(rdf["inputs"][0], "preprocessing") == ["scale_range"]
    assert steps(rdf["outputs"][0], "postprocessing") == ([] if target == "flows" else ["sigmoid"])
    assert rdf["authors"] == [{"name": "Ada Lovelace"}] and rdf["license"] == "MIT"
    assert "## Validation" in readme and "## Metrics of the run" in readme
    # deepscope predict on the package gives the checkpoint's probabilities and instances
    image = sorted((small_nuclei / "test" / "images").iterdir())[0]
    import h5py

    predicted = {}
    for name, model in (("checkpoint", run / "best.pt"), ("package", package)):
        target_file = tmp_path / f"{name}.h5"
        assert (
            main(["predict", str(model), str(image), "--out", str(target_file), "--instances", "--device", "cpu"]) == 0
        )
        with h5py.File(target_file) as f:
            predicted[name] = (f["probabilities"][...], f["instances"][...])
    np.testing.assert_allclose(predicted["package"][0], predicted["checkpoint"][0], atol=1e-4)
    np.testing.assert_array_equal(predicted["package"][1], predicted["checkpoint"][1])


def test_a_package_starts_a_fine_tuning_run(small_nuclei, flows_package, tmp_path, capsys):
    """--init-from takes a package's pytorch_state_dict weights (read with torch.load(weights_only=True), its
    architecture file never run) when deepscope builds the same architecture."""
    package, _ = flows_package
    options = cpu_unet_options(batch_size=8, lr=0.005, depth=2, patch=64, patches_per_epoch=32, val_fraction=0.2)
    run = tmp_path / "tuned"
    tuned = train_args("segment", small_nuclei, run, 1, *options, "--set", "target=flows", "--init-from", str(package))
    assert main(tuned) == 0
    log = (run / "train.log").read_text()
    taken = re.search(r"initialised (\d+) of (\d+) tensors from", log)
    assert taken and taken.group(1) == taken.group(2)


def test_a_denoising_package_passes_the_zoo_test(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 1)):
        for role in ("noisy", "clean"):
            (tmp_path / "data" / split / role).mkdir(parents=True)
        for i in range(n):
            smooth = np.cumsum(np.cumsum(rng.normal(size=(48, 48)), 0), 1)
            clean = ((smooth - smooth.min()) / np.ptp(smooth) * 200).astype(np.float32)
            tifffile.imwrite(tmp_path / "data" / split / "clean" / f"im{i}.tif", clean)
            noisy = (clean + rng.normal(0, 20, clean.shape)).astype(np.float32)
            tifffile.imwrite(tmp_path / "data" / split / "noisy" / f"im{i}.tif", noisy)
    run = tmp_path / "n2v"
    options = cpu_unet_options(batch_size=16, lr=0.004, depth=2, patch=32, patches_per_epoch=32, val_fraction=0.2)
    assert main(train_args("denoise", tmp_path / "data", run, 1, "--method", "n2v", *options)) == 0
    capsys.readouterr()
    assert main(["export", str(run / "best.pt"), *ZOO, "--out", str(tmp_path / "n2v.zip")]) == 0
    result = last_json(capsys)
    assert result["bioimageio_test"] == "passed"
    with zipfile.ZipFile(tmp_path / "n2v.zip") as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    assert steps(rdf["inputs"][0], "preprocessing") == ["fixed_zero_mean_unit_variance"]
    assert steps(rdf["outputs"][0], "postprocessing") == ["scale_linear"]
    assert any("Noise2Void" in c["text"] for c in rdf["cite"])


def test_the_architecture_source_runs_without_deepscope(tmp_path):
    """The package's architecture file imports nothing of deepscope's but its error type, and builds the U-Net."""
    source = architecture_source()
    imports = [line for line in source.splitlines() if "deepscope" in line and "import" in line]
    assert imports == ["    from deepscope.errors import DeepscopeError"]
    namespace: dict = {}
    exec(compile(source.replace("from deepscope.errors", "from no_such_package"), "architecture.py", "exec"), namespace)
    net = namespace["UNet"](1, 2, dim=2, depth=2, features=4)
    assert net(torch.zeros(1, 1, 16, 16)).shape == (1, 2, 16, 16)


class PlainUNet(nn.Module):
    """A small U-Net written here, not by deepscope: one level down, one up."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        return self.head(torch.cat([skip, self.up(self.bottom(skip))], 1))


class TwoOutputs(nn.Module):
    """:class:`PlainUNet`'s output and its negative, as two output tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = PlainUNet()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.net(x)
        return y, -y


def foreign_package(folder: Path, weights: str, two_outputs: bool = False) -> Path:
    """A package of :class:`PlainUNet` built by bioimageio.spec, with TorchScript or only state-dict weights; with
    ``two_outputs``, a second output ``negative`` (its negative, without postprocessing)."""
    from bioimageio.spec import ValidationContext, build_description, save_bioimageio_package

    torch.manual_seed(0)
    net: nn.Module = PlainUNet().eval()
    raw = np.random.default_rng(1).uniform(0, 1000, (1, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy((raw - raw.mean()) / (raw.std() + 1e-6)))
    np.save(folder / "in.npy", raw)
    np.save(folder / "out.npy", torch.sigmoid(logits).numpy())
    np.save(folder / "negative.npy", -logits.numpy())
    if two_outputs:
        wrapper = TwoOutputs().eval()
        wrapper.net = net
        net = wrapper
    if weights == "torchscript":
        torch.jit.save(torch.jit.trace(net, torch.from_numpy(raw)), str(folder / "net.pt"))
        entry = {"torchscript": {"source": "net.pt", "pytorch_version": "2.4"}}
    else:
        torch.save(net.state_dict(), folder / "net.pt")
        (folder / "plain.py").write_text("from torch import nn\nclass PlainUNet(nn.Module):\n    pass\n")
        architecture = {"source": "plain.py", "callable": "PlainUNet"}
        entry = {"pytorch_state_dict": {"source": "net.pt", "architecture": architecture, "pytorch_version": "2.4"}}
    (folder / "README.md").write_text("# plain\n")
    space = {"min": 8, "step": 2}
    rdf = {
        "format_version": "0.5.4",
        "type": "model",
        "name": "plain unet from elsewhere",
        "description": "written in a test",
        "authors": [{"name": "Someone Else"}],
        "license": "MIT",
        "cite": [{"text": "none", "url": "https://example.org"}],
        "documentation": "README.md",
        "inputs": [
            {
                "id": "image",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["grey"]},
                    {"type": "space", "id": "y", "size": space},
                    {"type": "space", "id": "x", "size": space},
                ],
                "test_tensor": {"source": "in.npy"},
                "preprocessing": [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["channel", "y", "x"]}}],
            }
        ],
        "outputs": [
            {
                "id": "mask",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["probability"]},
                    {"type": "space", "id": "y", "size": {"tensor_id": "image", "axis_id": "y"}},
                    {"type": "space", "id": "x", "size": {"tensor_id": "image", "axis_id": "x"}},
                ],
                "test_tensor": {"source": "out.npy"},
                "postprocessing": [{"id": "sigmoid"}],
            }
        ],
        "weights": entry,
    }
    if two_outputs:
        negative = {**rdf["outputs"][0], "id": "negative", "test_tensor": {"source": "negative.npy"}}
        rdf["outputs"].append({k: v for k, v in negative.items() if k != "postprocessing"})
    with ValidationContext(root=folder, perform_io_checks=False):
        descr = build_description(rdf)
    assert type(descr).__name__ == "ModelDescr", descr.validation_summary.format()
    return save_bioimageio_package(descr, output_path=folder / f"{weights}.zip")


def test_a_package_another_tool_wrote_runs_with_its_own_processing(tmp_path, capsys):
    package = foreign_package(tmp_path, "torchscript")
    image = np.random.default_rng(2).uniform(0, 1000, (40, 24)).astype(np.float32)
    tifffile.imwrite(tmp_path / "image.tif", image)
    out = tmp_path / "mask.tif"
    capsys.readouterr()
    assert main(["predict", str(package), str(tmp_path / "image.tif"), "--out", str(out), "--device", "cpu"]) == 0
    assert last_json(capsys)["outputs"][0]["weights"] == "torchscript"
    torch.manual_seed(0)
    net = PlainUNet().eval()
    standardised = (image - image.mean()) / (image.std() + 1e-6)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(standardised)[None, None])).numpy()[0]
    np.testing.assert_allclose(tifffile.imread(out), expected, atol=1e-4)
    # an image over 512 pixels a side is tiled by the package's size parameters: outputs differ only along the
    # tile borders, since this package declares no halo
    from deepscope.export.packages import predict_array

    large = np.random.default_rng(3).uniform(0, 1000, (600, 520)).astype(np.float32)
    tiled = predict_array(package, large, "large")["mask"]
    with torch.no_grad():
        whole = torch.sigmoid(net(torch.from_numpy((large - large.mean()) / (large.std() + 1e-6))[None, None]))
    assert tiled.shape == (1, 600, 520)
    assert np.mean(np.abs(tiled - whole.numpy()[0]) <= 1e-4) > 0.95


def test_every_output_of_another_tools_package_is_written(tmp_path, capsys):
    package = foreign_package(tmp_path, "torchscript", two_outputs=True)
    image = np.random.default_rng(2).uniform(0, 1000, (40, 24)).astype(np.float32)
    tifffile.imwrite(tmp_path / "image.tif", image)
    capsys.readouterr()
    assert main(["predict", str(package), str(tmp_path / "image.tif"), "--out", str(tmp_path / "out")]) == 0
    outputs = last_json(capsys)["outputs"][0]["outputs"]
    assert list(outputs) == ["mask", "negative"]
    mask, negative = (tifffile.imread(outputs[key]["file"]) for key in ("mask", "negative"))
    assert Path(outputs["negative"]["file"]).name == "image_negative.tif"
    np.testing.assert_allclose(mask, 1 / (1 + np.exp(negative)), atol=1e-5)  # sigmoid(logits), and -logits raw


def test_packages_that_would_run_their_own_code_or_lack_what_the_zoo_needs_are_refused(
    small_flows_run, tmp_path, capsys
):
    package = foreign_package(tmp_path, "pytorch_state_dict")
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((16, 16), np.float32))
    err = one_line_error(["predict", str(package), str(image), "--out", str(tmp_path / "o.tif")], capsys)
    assert "runs only the ONNX and TorchScript weights" in err and str(package) in err
    remote = tmp_path / "remote"
    remote.mkdir()
    with zipfile.ZipFile(foreign_package(remote, "torchscript")) as archive:
        archive.extractall(remote)
    rdf = yaml.safe_load((remote / "rdf.yaml").read_text())
    rdf["weights"]["torchscript"]["source"] = "https://example.org/net.pt"
    rdf["weights"]["torchscript"].pop("sha256", None)
    (remote / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    err = one_line_error(["predict", str(remote / "rdf.yaml"), str(image), "--out", str(tmp_path / "r.tif")], capsys)
    assert "downloads nothing" in err
    checkpoint = str(small_flows_run / "best.pt")
    assert "--author" in one_line_error(["export", checkpoint, "--format", "bioimageio", "--license", "MIT"], capsys)
    assert "--license" in one_line_error(["export", checkpoint, "--format", "bioimageio", "--author", "A B"], capsys)
    err = one_line_error(["export", checkpoint, *ZOO[:-1], "not-a-licence", "--out", str(tmp_path / "x.zip")], capsys)
    assert "license" in err and not (tmp_path / "x.zip").exists()
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("rdf.yaml", "type: [unclosed")
    assert "not valid YAML" in one_line_error(
        ["predict", str(broken), str(image), "--out", str(tmp_path / "b.tif")], capsys
    )


def test_a_classifier_package_passes_the_zoo_test_and_gives_the_checkpoints_probabilities(class_tree, tmp_path, capsys):
    from conftest import fast_args

    run = tmp_path / "cnn"
    # who wrote it and under which licence, said once in the run's config rather than at every export
    package_settings = ["--set", "package.authors=[Grace Hopper]", "--set", "package.license=CC-BY-4.0"]
    assert main(fast_args(class_tree, run, *package_settings, "--set", "package.name=pattern classifier")) == 0
    package = tmp_path / "cnn.zip"
    capsys.readouterr()
    assert main(["export", str(run / "best.pt"), "--format", "bioimageio", "--out", str(package)]) == 0
    result = last_json(capsys)
    assert result["bioimageio_test"] == "passed" and max(result["max_abs_difference"].values()) <= 1e-4
    with zipfile.ZipFile(package) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        source = archive.read("architecture.py").decode()
    assert rdf["authors"] == [{"name": "Grace Hopper"}] and rdf["license"] == "CC-BY-4.0"
    assert rdf["name"] == "pattern classifier"
    output = rdf["outputs"][0]
    assert [axis["type"] for axis in output["axes"]] == ["batch", "channel"]
    assert output["axes"][1]["channel_names"] == ["alpha", "beta", "gamma"]
    assert steps(rdf["inputs"][0], "preprocessing") == ["fixed_zero_mean_unit_variance"]
    assert steps(output, "postprocessing") == ["softmax"]
    # the architecture file builds the classifier without deepscope, and the package's weights fit it
    namespace: dict = {}
    exec(compile(source.replace("from deepscope.errors", "from no_such_package"), "architecture.py", "exec"), namespace)
    architecture = rdf["weights"]["pytorch_state_dict"]["architecture"]
    net = namespace[architecture["callable"]](**architecture["kwargs"])
    with zipfile.ZipFile(package) as archive, archive.open("weights.pt") as f:
        net.load_state_dict(torch.load(f, weights_only=True))
    # deepscope predict on the package gives the checkpoint's probabilities
    files = sorted((class_tree / "test").rglob("*.png"))[:4]
    tables = {}
    for name, model in (("checkpoint", run / "best.pt"), ("package", package)):
        assert main(["predict", str(model), *map(str, files), "--out", str(tmp_path / f"{name}.csv")]) == 0
        tables[name] = [line.split(",") for line in (tmp_path / f"{name}.csv").read_text().splitlines()]
    assert [row[:2] for row in tables["package"]] == [row[:2] for row in tables["checkpoint"]]
    np.testing.assert_allclose(
        np.array([row[2:] for row in tables["package"][1:]], float),
        np.array([row[2:] for row in tables["checkpoint"][1:]], float),
        atol=1e-4,
    )


def test_the_u_net_encoders_architecture_source_builds_it_without_deepscope():
    """An SSL run's U-Net encoder from the file its package holds (the package is written as the ResNet encoder's,
    tested whole below)."""
    from deepscope.models import layers, unet
    from deepscope.models.ssl import UNetEncoder

    source = architecture_source([layers, unet, UNetEncoder])
    namespace: dict = {}
    exec(compile(source.replace("from deepscope.errors", "from no_such_package"), "architecture.py", "exec"), namespace)
    encoder = namespace["UNetEncoder"](1, depth=2, features=4)
    assert encoder(torch.zeros(2, 1, 16, 16)).shape == (2, encoder.out_features)
    assert encoder.state_dict().keys() == UNetEncoder(1, depth=2, features=4).state_dict().keys()


def test_an_ssl_encoder_package_passes_the_zoo_test(tmp_path, capsys):
    from deepscope.demo.data import write_digits_npz

    data = write_digits_npz(tmp_path / "digits.npz")
    run = tmp_path / "ssl"
    options = ["--batch-size", "64", "--amp", "off", "--set", "model_args.width=4", "--set", "probe_fractions=[1]"]
    assert main(train_args("ssl", data, run, 1, *options, "--set", "steps_per_epoch=2", "--set", "knn_bank=100")) == 0
    package = tmp_path / "encoder.zip"
    capsys.readouterr()
    assert main(["export", str(run / "best.pt"), *ZOO, "--out", str(package)]) == 0
    result = last_json(capsys)
    assert result["bioimageio_test"] == "passed" and result["task"] == "ssl"
    with zipfile.ZipFile(package) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    output = rdf["outputs"][0]
    assert [axis["type"] for axis in output["axes"]] == ["batch", "channel"] and not steps(output, "postprocessing")
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["callable"] == "ResNet"  # the default encoder
