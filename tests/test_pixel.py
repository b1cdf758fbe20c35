"""Pixel classification end to end: scribbles, forest training with cached features, tiled prediction, instances,
shallow-to-deep, the demo, and clear errors for bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile

from deepscope.cli import main
from deepscope.data.scribbles import check_sparse_labels, dense_classes, sample_scribbles
from deepscope.data.synthetic import nuclei_set
from deepscope.errors import DataError
from deepscope.safefile import read_state, write_state
from deepscope.tasks.pixel.classifier import FORMAT
from deepscope.tasks.pixel.labelled import labelled_indices

FAST = ["--filters", "gaussian", "ggm", "hessian", "structure", "--scales", "1", "2", "4", "--trees", "30"]


def pixel_train_args(images, labels, out, *extra: str) -> list[str]:
    """``pixel train`` of ``images`` with sparse ``labels`` into ``out``, with ``extra`` options and the quick features."""
    return ["pixel", "train", "--images", str(images), "--labels", str(labels), "--out", str(out), *extra, *FAST]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    """Synthetic nuclei: 3 training images with scribbles (0.5 %), 2 test images with dense truth."""
    root = tmp_path_factory.mktemp("pixel")
    rng = np.random.default_rng(0)
    for split, pairs in (("train", nuclei_set(3, 96, seed=1)), ("test", nuclei_set(2, 96, seed=2))):
        for kind in ("images", "truth", "scribbles"):
            (root / split / kind).mkdir(parents=True)
        for i, (image, labels) in enumerate(pairs):
            tifffile.imwrite(root / split / "images" / f"n{i}.tif", image)
            tifffile.imwrite(root / split / "truth" / f"n{i}.tif", labels)
            tifffile.imwrite(
                root / split / "scribbles" / f"n{i}.tif",
                sample_scribbles(dense_classes(labels, foreground=True), 0.005, rng=rng),
            )
    return root


@pytest.fixture(scope="module")
def trained(nuclei, tmp_path_factory):
    out = tmp_path_factory.mktemp("pixel-run")
    assert main(pixel_train_args(nuclei / "train" / "images", nuclei / "train" / "scribbles", out)) == 0
    return out


def foreground_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.logical_and(pred, truth).sum() / np.logical_or(pred, truth).sum())


def test_scribbles_are_strokes_inside_their_class_at_the_asked_fraction():
    classes = dense_classes(np.repeat(np.arange(4), 2500).reshape(100, 100), class_values=[0, 1, 2, 3])
    sparse = sample_scribbles(classes, 0.01, length=12, rng=np.random.default_rng(0))
    labelled = sparse > 0
    assert np.array_equal(sparse[labelled], classes[labelled])  # every scribbled pixel has its true class
    assert sorted(np.unique(sparse[labelled])) == [1, 2, 3, 4]
    assert abs(labelled.sum() - 100) <= 4  # 1 % of 10,000, split evenly (25 per class)
    from skimage.measure import label

    assert label(labelled, connectivity=2).max() < labelled.sum() / 3  # strokes, not scattered pixels


def test_sparse_labels_are_checked():
    with pytest.raises(DataError, match="x.tif: labels must be integers"):
        check_sparse_labels(np.zeros((4, 4), np.float32), "x.tif")
    with pytest.raises(DataError, match="x.tif: no labelled pixels"):
        check_sparse_labels(np.zeros((4, 4), np.uint8), "x.tif")
    with pytest.raises(DataError, match="negative label"):
        check_sparse_labels(-np.ones((4, 4), np.int16), "x.tif")
    with pytest.raises(DataError, match="fraction"):
        sample_scribbles(np.ones((4, 4), np.uint8), 0.0)


def test_class_names_may_skip_unlabelled_class_numbers(nuclei, tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    for path in (nuclei / "train" / "scribbles").glob("*.tif"):  # classes 1 and 3: class 2 never painted
        tifffile.imwrite(
            labels / path.name, np.where(tifffile.imread(path) == 2, 3, tifffile.imread(path)).astype(np.uint8)
        )
    assert main(pixel_train_args(nuclei / "train" / "images", labels, tmp_path / "run", "--no-predict")) == 0
    assert "oob_accuracy" in last_json(capsys)
    assert (
        main(
            pixel_train_args(
                nuclei / "train" / "images",
                labels,
                tmp_path / "run",
                "--no-predict",
                "--set",
                "class_names=[bg, nucleus]",
            )
        )
        == 2
    )
    assert "class_names lists 2 names but labels go up to class 3" in capsys.readouterr().err


def test_train_learns_foreground_and_reuses_cached_features(trained, nuclei, capsys):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["features_from_cache"] == 0 and metrics["features"] == 2 * 3 + 2 * 3 * 2
    assert (
        (trained / "classifier.safetensors").is_file()
        and (trained / "config.yaml").is_file()
        and (trained / "report.html").is_file()
    )
    for i in range(3):  # predictions of the labelled images: class 2 (nuclei) where the truth has nuclei
        pred = tifffile.imread(trained / "predictions" / f"n{i}_classes.tif")
        assert foreground_iou(pred == 2, tifffile.imread(nuclei / "train" / "truth" / f"n{i}.tif") > 0) > 0.8
    assert (
        main(pixel_train_args(nuclei / "train" / "images", nuclei / "train" / "scribbles", trained, "--no-predict"))
        == 0
    )
    again = last_json(capsys)
    assert again["features_from_cache"] == 3 and again["labelled_pixels"] == metrics["labelled_pixels"]
    assert again["oob_accuracy"] == metrics["oob_accuracy"]  # same pixels, same seed: the same forest


def test_predict_new_images_tiled_equals_whole_and_gives_instances(trained, nuclei, tmp_path, capsys):
    classifier, images = str(trained / "classifier.safetensors"), str(nuclei / "test" / "images")
    assert (
        main(
            [
                "pixel",
                "predict",
                classifier,
                images,
                "--out",
                str(tmp_path / "whole"),
                "--instances",
                "--seeds",
                "maxima",
                "--min-distance",
                "4",
                "--min-size",
                "10",
            ]
        )
        == 0
    )
    records = last_json(capsys)["outputs"]
    assert main(["pixel", "predict", classifier, images, "--out", str(tmp_path / "tiled"), "--tile", "40", "40"]) == 0
    for i in range(2):
        truth = tifffile.imread(nuclei / "test" / "truth" / f"n{i}.tif")
        whole = tifffile.imread(tmp_path / "whole" / f"n{i}_probabilities.tif")
        tiled = tifffile.imread(tmp_path / "tiled" / f"n{i}_probabilities.tif")
        assert whole.shape == (2, 96, 96) and np.allclose(whole.sum(0), 1, atol=1e-5)
        assert np.abs(whole - tiled).mean() < 1e-3  # features agree to float rounding, so only rare tree splits flip
        classes = tifffile.imread(tmp_path / "whole" / f"n{i}_classes.tif")
        assert foreground_iou(classes == 2, truth > 0) > 0.8
        objects = records[i]["objects"]
        assert abs(objects - int(truth.max())) <= max(2, int(truth.max()) // 4), (objects, truth.max())
        assert tifffile.imread(tmp_path / "whole" / f"n{i}_instances.tif").max() == objects


def test_predict_refuses_images_the_classifier_was_not_trained_for(trained, tmp_path, capsys):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((32, 32, 3), np.uint8))
    assert (
        main(["pixel", "predict", str(trained / "classifier.safetensors"), str(rgb), "--out", str(tmp_path / "o")]) == 2
    )
    assert "rgb.tif: image has 3 channels but the model takes 1" in capsys.readouterr().err
    volume = tmp_path / "vol.tif"
    tifffile.imwrite(volume, np.zeros((8, 32, 32), np.uint8))
    assert (
        main(["pixel", "predict", str(trained / "classifier.safetensors"), str(volume), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "vol.tif: 3D volume" in capsys.readouterr().err


def test_classifier_whose_features_do_not_match_its_forest_is_refused(trained, nuclei, tmp_path, capsys):
    state = read_state(trained / "classifier.safetensors", FORMAT)
    state["spec"]["filters"]["gaussian"] = [1.0]  # fewer features than the forest was fitted on
    write_state(tmp_path / "bad.safetensors", state, FORMAT, "classifier")
    (tmp_path / "junk.safetensors").write_bytes(b"not a classifier")
    (tmp_path / "old.pkl").write_bytes(pickle.dumps({"format": FORMAT}))  # what deepscope 0.1 saved
    image = str(nuclei / "test" / "images" / "n0.tif")
    for bad, message in (
        ("bad.safetensors", "does not match the forest"),
        ("junk.safetensors", "not a usable pixel classifier"),
        ("old.pkl", "is a pickle, which could run code when opened and is refused"),
    ):
        assert main(["pixel", "predict", str(tmp_path / bad), image, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"{bad}: " in err and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["shape", "orphan", "one_class", "float"])
def test_train_refuses_bad_labels_naming_the_file(nuclei, tmp_path, capsys, case):
    labels = tmp_path / "labels"
    labels.mkdir()
    if case == "shape":
        tifffile.imwrite(labels / "n0.tif", np.ones((50, 50), np.uint8))
        expected = "does not match labels"
    elif case == "orphan":
        tifffile.imwrite(labels / "zz.tif", np.ones((96, 96), np.uint8))
        expected = "no image for the label file(s) zz"
    elif case == "one_class":
        tifffile.imwrite(labels / "n0.tif", np.ones((96, 96), np.uint8))
        expected = "only class 1 is labelled"
    else:
        tifffile.imwrite(labels / "n0.tif", np.ones((96, 96), np.float32))
        expected = "n0.tif: labels must be integers"
    assert main(pixel_train_args(nuclei / "train" / "images", labels, tmp_path / "run")) == 2
    assert expected in capsys.readouterr().err


def test_scribbles_command_samples_from_dense_instance_labels(nuclei, tmp_path, capsys):
    assert (
        main(
            [
                "pixel",
                "scribbles",
                str(nuclei / "test" / "truth"),
                "--out",
                str(tmp_path),
                "--foreground",
                "--fraction",
                "0.002",
            ]
        )
        == 0
    )
    result = last_json(capsys)
    assert result["files"] == 2 and abs(result["fraction"] - 0.002) < 0.0005
    sparse = tifffile.imread(tmp_path / "n0.tif")
    truth = tifffile.imread(nuclei / "test" / "truth" / "n0.tif")
    assert np.array_equal(sparse[sparse > 0] == 2, truth[sparse > 0] > 0)


def test_shallow_to_deep_trains_a_unet_on_forest_labels(trained, nuclei, tmp_path, capsys):
    assert (
        main(
            [
                "pixel",
                "deep",
                str(trained / "classifier.safetensors"),
                str(nuclei / "test" / "images"),
                str(nuclei / "train" / "images"),
                "--out",
                str(tmp_path),
                "--epochs",
                "2",
                "--min-confidence",
                "0.8",
                "--device",
                "cpu",
                "--set",
                "patch_shape=[64,64]",
                "--set",
                "patches_per_epoch=16",
                "--set",
                "model_args={features: 8, depth: 2}",
            ]
        )
        == 0
    )
    result = last_json(capsys)
    assert result["pseudo_labelled_images"] == 5 and 0 < result["ignored_fraction"] < 0.5
    mask = tifffile.imread(tmp_path / "pseudo" / "masks" / "n0.tif")
    assert set(np.unique(mask)) <= {0, 1, 255}
    assert (tmp_path / "unet" / "best.pt").is_file()
    assert (
        main(
            [
                "predict",
                str(tmp_path / "unet" / "best.pt"),
                str(nuclei / "test" / "images" / "n1.tif"),
                "--out",
                str(tmp_path / "unet-pred"),
            ]
        )
        == 0
    )


def test_shallow_to_deep_leaves_the_schedule_to_the_engine(trained, nuclei, tmp_path, monkeypatch):
    """No fixed number of epochs: the semantic U-Net's schedule is planned from the budget by the engine, unless the
    user gives the epochs."""
    import torch

    from deepscope.tasks.pixel import deep

    configs = []

    class Recorder:
        def __init__(self, task) -> None:
            configs.append(task.config)

        def fit(self) -> dict:
            return {}

    monkeypatch.setattr(deep, "Trainer", Recorder)
    images = sorted((nuclei / "test" / "images").glob("*.tif"))
    classifier = trained / "classifier.safetensors"
    deep.train_unet_from_forest(classifier, images, tmp_path / "a", torch.device("cpu"), {"max_minutes": 5})
    deep.train_unet_from_forest(classifier, images, tmp_path / "b", torch.device("cpu"), {"epochs": 3})
    planned, given = configs
    assert planned.epochs is None and planned.steps_per_epoch is None and planned.max_minutes == 5
    assert planned.target == "semantic" and given.epochs == 3


def test_demo_pixel_counts_the_coins(tmp_path, capsys):
    assert main(["demo", "pixel", "--out", str(tmp_path)]) == 0
    result = last_json(capsys)
    assert result["coins_found"] == result["coins_in_image"] == 24
    assert (tmp_path / "predictions.png").is_file() and (tmp_path / "importance.png").is_file()


@pytest.mark.parametrize("setting", ["cache=off", "cache='off'"])  # YAML reads a bare off as false
def test_train_without_cache_keeps_no_features_and_still_predicts(nuclei, tmp_path, capsys, monkeypatch, setting):
    monkeypatch.chdir(tmp_path)
    assert (
        main(pixel_train_args(nuclei / "train" / "images", nuclei / "train" / "scribbles", tmp_path, "--set", setting))
        == 0
    )
    result = last_json(capsys)
    assert result["features_from_cache"] == 0 and not list(tmp_path.rglob("*.npy"))  # no cache anywhere, cwd included
    pred = tifffile.imread(tmp_path / "predictions" / "n0_classes.tif")
    assert foreground_iou(pred == 2, tifffile.imread(nuclei / "train" / "truth" / "n0.tif") > 0) > 0.8


def test_labelled_indices_are_the_nonzero_pixels() -> None:
    rng = np.random.default_rng(0)
    for shape, dtype in (
        ((64, 64), np.uint8),
        ((13, 7), np.uint8),
        ((3, 5, 9), np.uint8),
        ((1,), np.uint8),
        ((20, 30), np.uint16),
    ):
        labels = np.zeros(shape, dtype)
        painted = rng.random(shape) < 0.05
        labels[painted] = rng.integers(1, 5, int(painted.sum()))
        labels.ravel()[-1] = 2  # the tail beyond the last whole 8-pixel word counts too
        np.testing.assert_array_equal(labelled_indices(labels), np.flatnonzero(labels))
    np.testing.assert_array_equal(labelled_indices(np.zeros((8, 8), np.uint8)), [])
