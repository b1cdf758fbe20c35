"""Bad segmentation input is a one-line error naming the file and the problem, exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from conftest import train_args
from deepscope.cli import main
from deepscope.demo.data import write_nuclei


def small_run(data: Path, out: Path, *extra: str) -> list[str]:
    return train_args(
        "segment",
        data,
        out,
        1,
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--set",
        "model_args={features: 4, depth: 2}",
        "--set",
        "patch_shape=[32, 32]",
        "--set",
        "patches_per_epoch=4",
        *extra,
    )


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.strip()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    data = write_nuclei(root / "data", train=4, test=1, size=32)
    assert main(small_run(data, root / "run")) == 0
    return root / "run" / "best.pt"


def pairs(root: Path, labels: list[np.ndarray], shape: tuple[int, int] = (32, 32)) -> Path:
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i, label in enumerate(labels):
        tifffile.imwrite(root / "images" / f"{i}.tif", np.zeros(shape, np.uint8))
        tifffile.imwrite(root / "masks" / f"{i}.tif", label)
    return root


def blob(dtype=np.uint16, shape=(32, 32)) -> np.ndarray:
    label = np.zeros(shape, dtype)
    label[4:12, 4:12] = 1
    return label


def test_image_and_label_shapes_differ(tmp_path, capsys):
    data = pairs(tmp_path / "d", [blob(), blob(shape=(32, 30))])
    message = error_of(capsys, small_run(data, tmp_path / "out"))
    assert "1.tif" in message and "does not match labels" in message


def test_float_labels(tmp_path, capsys):
    data = pairs(tmp_path / "d", [blob(), blob(np.float32)])
    message = error_of(capsys, small_run(data, tmp_path / "out"))
    assert "masks/1.tif" in message and "labels must be integers, got float32" in message


def test_empty_label_image(tmp_path, capsys):
    data = pairs(tmp_path / "d", [blob(), np.zeros((32, 32), np.uint16)])
    message = error_of(capsys, small_run(data, tmp_path / "out"))
    assert "masks/1.tif" in message and "empty label image" in message


def test_unmatched_image_and_mask_names(tmp_path, capsys):
    data = pairs(tmp_path / "d", [blob(), blob()])
    (data / "masks" / "1.tif").rename(data / "masks" / "other.tif")
    message = error_of(capsys, small_run(data, tmp_path / "out"))
    assert "1.tif has no label file" in message


def test_missing_hdf5_key_in_training_and_prediction(tmp_path, capsys, checkpoint):
    folder = tmp_path / "h5"
    folder.mkdir()
    with h5py.File(folder / "a.h5", "w") as f:
        f["raw"], f["label"] = np.zeros((32, 32), np.uint8), blob()
    message = error_of(capsys, small_run(folder, tmp_path / "out", "--set", "raw_key=image"))
    assert "a.h5" in message and "no dataset 'image' (found: label, raw)" in message
    message = error_of(
        capsys,
        [
            "predict",
            str(checkpoint),
            str(folder / "a.h5"),
            "--key",
            "volume",
            "--out",
            str(tmp_path / "p.h5"),
            "--device",
            "cpu",
        ],
    )
    assert "a.h5" in message and "no dataset 'volume'" in message


def test_3d_volume_given_to_a_2d_model(tmp_path, capsys, checkpoint):
    volume = tmp_path / "stack.tif"
    tifffile.imwrite(volume, np.zeros((16, 32, 32), np.uint8))
    message = error_of(
        capsys, ["predict", str(checkpoint), str(volume), "--out", str(tmp_path / "o"), "--device", "cpu"]
    )
    assert "stack.tif" in message and "3D volume (16, 32, 32) given to a 2D model" in message


def test_3d_labels_for_a_2d_patch_shape(tmp_path, capsys):
    folder = tmp_path / "vol"
    folder.mkdir()
    label = np.zeros((8, 32, 32), np.uint16)
    label[2:6, 4:12, 4:12] = 1
    np.savez(folder / "v.npz", raw=np.zeros((8, 32, 32), np.uint8), label=label)
    message = error_of(capsys, small_run(folder, tmp_path / "out"))
    assert "patch_shape [32, 32] has 2 sizes but the labels are 3D" in message


def test_tile_smaller_than_twice_the_halo(tmp_path, capsys, checkpoint):
    image = tmp_path / "im.tif"
    tifffile.imwrite(image, np.zeros((40, 40), np.uint8))
    message = error_of(
        capsys,
        [
            "predict",
            str(checkpoint),
            str(image),
            "--out",
            str(tmp_path / "o"),
            "--tile",
            "16",
            "--halo",
            "12",
            "--device",
            "cpu",
        ],
    )
    assert "tile (16, 16) must be at least twice the halo (12, 12)" in message


def test_wrong_channel_count_for_the_model(tmp_path, capsys, checkpoint):
    image = tmp_path / "rgba.tif"
    tifffile.imwrite(image, np.zeros((40, 40, 4), np.uint8))
    message = error_of(
        capsys, ["predict", str(checkpoint), str(image), "--out", str(tmp_path / "o"), "--device", "cpu"]
    )
    assert "rgba.tif" in message and "4 channels but the model takes 1" in message


def test_missing_input_file(tmp_path, capsys, checkpoint):
    message = error_of(
        capsys,
        ["predict", str(checkpoint), str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o"), "--device", "cpu"],
    )
    assert "missing.tif: file not found" in message
