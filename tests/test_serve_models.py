"""Models in ``deepscope serve``: checkpoints of tiny real runs opened in the app, predictions equal to what
``deepscope predict`` writes for the same file, progress, the one-at-a-time worker, bad requests, and the page
drawing a model's instance outlines in a headless browser."""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.measure import label
from skimage.segmentation import find_boundaries

with warnings.catch_warnings():  # Starlette 1.x suggests httpx2 for its test client; httpx works the same here
    warnings.filterwarnings("ignore", "Using `httpx`")
    from starlette.testclient import TestClient

from conftest import TINY_CENTERNET, cpu_unet_options, pattern_images, rgba, train_args, write_tree
from deepscope.cli import main
from deepscope.data.synthetic import nuclei_image
from deepscope.demo.data import write_nuclei, write_shapes
from deepscope.serve.app import create_app
from deepscope.serve.folder import ServedFolder, ServedImage
from deepscope.serve.models import PALETTE, Model, ModelService, Result

try:  # the browser test's fixtures and helpers; without selenium it is skipped, the rest still runs
    from test_serve_browser import (  # noqa: F401
        CHROMEDRIVER,
        CHROMIUM,
        READY,
        browser,
        pixels,
        server,
        wait,
    )
except pytest.skip.Exception:
    CHROMIUM = CHROMEDRIVER = None

SEG, SEM, DENOISE = "models/seg/best.pt", "models/sem/best.pt", "models/dn/best.pt"
TINY = cpu_unet_options(batch_size=8, lr=0.005, depth=2, patch=32, patches_per_epoch=64, val_fraction=0.25)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny real runs of a few seconds each, as ``deepscope train`` writes them: an instance segmentation model
    (foreground and boundaries), a semantic one (background, nucleus) and a Noise2Void denoiser."""
    root = tmp_path_factory.mktemp("runs")
    nuclei = write_nuclei(root / "nuclei", train=4, test=1, size=64)
    semantic, noisy = root / "semantic", root / "noisy" / "train" / "noisy"
    noisy.mkdir(parents=True)
    for split in ("train", "test"):
        for name in ("images", "masks"):
            (semantic / split / name).mkdir(parents=True)
        for path in sorted((nuclei / split / "images").iterdir()):
            shutil.copy(path, semantic / split / "images" / path.name)
            mask = tifffile.imread(nuclei / split / "masks" / path.name) > 0
            tifffile.imwrite(semantic / split / "masks" / path.name, mask.astype(np.uint8))
            if split == "train":
                shutil.copy(path, noisy / path.name)
    assert main(train_args("segment", nuclei, root / "seg", 4, *TINY, "--set", "target=foreground_boundaries")) == 0
    assert (
        main(
            train_args(
                "segment", semantic, root / "sem", 3, *TINY, "--set", "target=semantic", "--set", "class_values=[0, 1]"
            )
        )
        == 0
    )
    assert (
        main(
            train_args(
                "denoise", root / "noisy", root / "dn", 1, "--method", "n2v", "--set", "noise={kind: none}", *TINY
            )
        )
        == 0
    )
    return root


def predict_instances_args(checkpoint: Path, image: Path, out: Path) -> list[str]:
    """``predict`` of ``image`` by ``checkpoint`` on the CPU, its instances too written to ``out``."""
    return ["predict", str(checkpoint), str(image), "--out", str(out), "--instances", "--device", "cpu"]


def add_checkpoints(runs: Path, folder: Path) -> None:
    for name in ("seg", "sem", "dn"):
        (folder / "models" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(runs / name / "best.pt", folder / "models" / name / "best.pt")


def nuclei(size: int = 128) -> np.ndarray:
    return nuclei_image(size, seed=5)[0]


@pytest.fixture
def folder(tmp_path: Path, runs: Path) -> Path:
    """Served: a grey nuclei image, a colour picture, and the three checkpoints under models/."""
    root = tmp_path / "served"
    root.mkdir()
    tifffile.imwrite(root / "cells.tif", nuclei())
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / "rgb.png")
    add_checkpoints(runs, root)
    return root


@pytest.fixture
def client(folder: Path):
    with TestClient(create_app(folder)) as test_client:
        yield test_client


def service(client: TestClient) -> ModelService:
    return client.app.state.session.models


def finished(client: TestClient, image: str) -> tuple[dict, list[float]]:
    """The status once the image's prediction is no longer running, and every progress seen meanwhile."""
    seen, deadline = [], time.monotonic() + 120
    while True:
        status = client.get("/api/models/status", params={"image": image}).json()
        seen.append(status["progress"])
        if status["state"] != "running":
            return status, seen
        assert time.monotonic() < deadline, status
        time.sleep(0.005)


def predicted(client: TestClient, checkpoint: str, image: str = "cells.tif") -> tuple[dict, list[float]]:
    response = client.post("/api/models/open", json={"path": checkpoint})
    assert response.status_code == 200, response.text
    assert client.post("/api/models/predict", params={"image": image}, json={}).status_code == 200
    status, seen = finished(client, image)
    assert status["state"] == "done" and status["computed"], status
    return status, seen


def tile(client: TestClient, kind: str, **extra: str) -> np.ndarray:
    return rgba(
        client.get(
            "/api/models/overlay", params={"image": "cells.tif", "kind": kind, "level": 0, "ty": 0, "tx": 0, **extra}
        )
    )


def test_listing_shows_checkpoints_newest_first_with_task_or_error(client: TestClient, folder: Path) -> None:
    (folder / "broken.pt").write_bytes(b"not a checkpoint")
    (folder / ".deepscope").mkdir()
    shutil.copy(folder / SEG, folder / ".deepscope" / "hidden.pt")
    deep = folder.joinpath(*"abcdefg")  # 7 folders down: beyond the walk's depth
    deep.mkdir(parents=True)
    shutil.copy(folder / SEG, deep / "deep.pt")
    for age, path in enumerate([SEM, DENOISE, "broken.pt", SEG]):
        os.utime(folder / path, (1e9 - age * 100, 1e9 - age * 100))
    listed = client.get("/api/models").json()
    assert [(e["path"], e["task"]) for e in listed] == [
        (SEM, "segment"),
        (DENOISE, "denoise"),
        ("broken.pt", None),
        (SEG, "segment"),
    ]
    assert [e["error"] is None for e in listed] == [True, True, False, True]
    assert listed[2]["error"].startswith("broken.pt: not a readable checkpoint")


def test_instances_and_probabilities_equal_deepscope_predict(client: TestClient, folder: Path, tmp_path: Path) -> None:
    status, seen = predicted(client, SEG)
    assert status["description"] == {
        "path": SEG,
        "task": "segment",
        "ndim": 2,
        "channels": 1,
        "classes": ["object"],
        "target": "foreground_boundaries",
        "device": "cpu",
    }
    assert seen == sorted(seen) and seen[-1] == 1.0  # monotone, and complete when done
    out = tmp_path / "predicted"
    assert main(predict_instances_args(folder / SEG, folder / "cells.tif", out)) == 0
    expected = tifffile.imread(out / "cells_instances.tif")
    instances = service(client).instances("cells.tif")
    assert expected.max() > 3 and status["summary"] == f"{expected.max()} objects"
    np.testing.assert_array_equal(instances, expected)
    probability = np.rint(tifffile.imread(out / "cells_probabilities.tif")[0] * 255)
    np.testing.assert_array_equal(service(client).result("cells.tif").probabilities[0], probability)
    # the tiles: outlines opaque on the objects' inner borders only; the probability as the overlay's opacity
    np.testing.assert_array_equal(
        tile(client, "outlines")[..., 3] > 0, find_boundaries(expected, mode="inner", background=0)
    )
    np.testing.assert_array_equal(tile(client, "probabilities")[..., 3], probability)


def test_semantic_model_gives_classes_and_connected_objects(client: TestClient, folder: Path, tmp_path: Path) -> None:
    status, _ = predicted(client, SEM)
    out = tmp_path / "predicted"
    assert main(["predict", str(folder / SEM), str(folder / "cells.tif"), "--out", str(out), "--device", "cpu"]) == 0
    result = service(client).result("cells.tif")
    np.testing.assert_array_equal(result.probabilities, np.rint(tifffile.imread(out / "cells_probabilities.tif") * 255))
    classes = tifffile.imread(out / "cells_classes.tif")
    np.testing.assert_array_equal(result.classes, classes)
    # objects: the 8-connected pieces of the classes after the first (background), as pixel predict --instances finds
    objects = label(classes == 1, connectivity=2)
    assert objects.max() > 3 and status["summary"].startswith(f"{objects.max()} objects")
    np.testing.assert_array_equal(service(client).instances("cells.tif"), objects)
    shown = tile(client, "classes")
    assert (shown[classes == 0, 3] == 0).all() and (shown[classes == 1] == [*bytes.fromhex(PALETTE[1][1:]), 255]).all()
    assert client.post("/api/models/open", json={"path": SEG}).status_code == 200  # another model: results forgotten
    after = client.get("/api/models/status", params={"image": "cells.tif"}).json()
    assert (after["state"], after["computed"], service(client).instances("cells.tif")) == ("idle", False, None)


def test_a_2d_model_predicts_the_viewed_slice_of_a_stack(client: TestClient, folder: Path, tmp_path: Path) -> None:
    planes = np.stack([nuclei_image(64, seed=s)[0] for s in (7, 8, 9)])
    tifffile.imwrite(folder / "stack.tif", planes, photometric="minisblack")
    tifffile.imwrite(tmp_path / "plane.tif", planes[1])
    assert client.post("/api/models/open", json={"path": SEG}).status_code == 200
    assert client.post("/api/models/predict", params={"image": "stack.tif", "z": 1}, json={}).json()["z"] == 1
    assert finished(client, "stack.tif")[0]["state"] == "done"
    assert main(predict_instances_args(folder / SEG, tmp_path / "plane.tif", tmp_path / "out")) == 0
    np.testing.assert_array_equal(
        service(client).instances("stack.tif", 1), tifffile.imread(tmp_path / "out" / "plane_instances.tif")
    )
    assert service(client).instances("stack.tif", 0) is None
    assert client.get("/api/models/status", params={"image": "stack.tif", "z": 0}).json()["computed"] is False


def test_denoised_image_equals_deepscope_predict(client: TestClient, folder: Path, tmp_path: Path) -> None:
    predicted(client, DENOISE)
    out = tmp_path / "denoised"
    assert (
        main(["predict", str(folder / DENOISE), str(folder / "cells.tif"), "--out", str(out), "--device", "cpu"]) == 0
    )
    expected = tifffile.imread(out / "cells.tif")
    denoised = service(client).result("cells.tif").denoised
    np.testing.assert_array_equal(denoised[0], expected)
    assert np.abs(expected - nuclei()).mean() > 1  # the model did change the image
    grey = tile(client, "denoised", contrast="20,180")
    np.testing.assert_array_equal(grey[..., 0], np.rint(np.clip((expected - 20) / 160, 0, 1) * 255))


def test_bad_requests_are_one_line_errors(client: TestClient, folder: Path) -> None:
    def error(response, status: int) -> str:
        assert response.status_code == status, response.text
        message = response.json()["error"]
        assert "\n" not in message
        return message

    overlay = {"image": "cells.tif", "kind": "outlines", "level": 0, "ty": 0, "tx": 0}
    assert "no model is open" in error(client.post("/api/models/predict", params={"image": "cells.tif"}, json={}), 400)
    assert "no model is open" in error(client.get("/api/models/overlay", params=overlay), 400)
    assert client.get("/api/models/status", params={"image": "cells.tif"}).json()["state"] == "idle"
    (folder / "broken.pt").write_bytes(b"junk")
    for path, status in (
        ("../x.pt", 403),
        ("/etc/x.pt", 403),
        (".deepscope/x.pt", 403),
        ("missing.pt", 400),
        ("cells.tif", 400),
        ("broken.pt", 400),
        (None, 400),
    ):
        assert str(folder) not in error(client.post("/api/models/open", json={"path": path}), status)  # no server paths
    assert client.post("/api/models/open", json={"path": SEG}).status_code == 200
    assert "expected one of" in error(client.get("/api/models/overlay", params={**overlay, "kind": "nope"}), 400)
    error(client.get("/api/models/overlay", params={**overlay, "level": 9}), 400)
    error(client.get("/api/models/overlay", params={**overlay, "image": "nothere.tif"}), 404)
    error(client.get("/api/models/boxes", params={"image": "cells.tif"}), 400)  # not a detector
    blank = tile(client, "outlines")  # not predicted yet: a transparent tile of the tile's size
    assert blank.shape == (128, 128, 4) and (blank[..., 3] == 0).all()
    response = client.post("/api/models/predict", params={"image": "rgb.png"}, json={})
    assert response.status_code == 200
    assert response.json()["state"] == "failed"
    assert response.json()["error"] == f"rgb.png has 3 channel(s) but the model {SEG} takes 1"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One-epoch runs of a classifier of 12x12 pictures (3 classes) and of a tiny CenterNet detector of shapes."""
    root = tmp_path_factory.mktemp("pictures")
    x, y = pattern_images(4, size=12)
    write_tree(root / "classes" / "train", x, y, ["alpha", "beta", "gamma"])
    assert (
        main(
            [
                "train",
                "classify",
                "--data",
                str(root / "classes"),
                "--out",
                str(root / "cls"),
                "--model",
                "cnn",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--device",
                "cpu",
                "--amp",
                "off",
                "--set",
                "model_args.widths=[8,16]",
            ]
        )
        == 0
    )
    shapes = write_shapes(root / "shapes", train=4, test=1, size=48)
    assert main(train_args("detect", shapes, root / "det", 1, "--device", "cpu", *TINY_CENTERNET)) == 0
    return root


def test_classifier_and_detector_answer_as_deepscope_predict(pictures: Path, tmp_path: Path) -> None:
    folder = tmp_path / "served"
    (folder / "models").mkdir(parents=True)
    Image.fromarray(pattern_images(1, size=12, seed=3)[0][1]).save(folder / "picture.png")
    shutil.copy(pictures / "shapes" / "test" / "images" / "0000.png", folder / "shapes.png")
    for name in ("cls", "det"):
        shutil.copy(pictures / name / "best.pt", folder / "models" / f"{name}.pt")
    assert (
        main(
            [
                "predict",
                str(folder / "models/cls.pt"),
                str(folder / "picture.png"),
                "--out",
                str(tmp_path / "p.csv"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(folder / "models/det.pt"),
                str(folder / "shapes.png"),
                "--out",
                str(tmp_path / "d.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with TestClient(create_app(folder)) as client:
        status, _ = predicted(client, "models/cls.pt", "picture.png")
        row = next(csv.DictReader((tmp_path / "p.csv").open()))
        assert status["scores"][0]["class"] == row["predicted"]  # most probable first
        assert {s["class"]: round(s["probability"], 6) for s in status["scores"]} == pytest.approx(
            {name: float(row[f"prob_{name}"]) for name in ("alpha", "beta", "gamma")}, abs=1e-6
        )
        client.post("/api/models/predict", params={"image": "shapes.png"}, json={})
        failed, _ = finished(client, "shapes.png")
        assert (
            failed["error"]
            == "shapes.png: images are 48x48 but the model expects 12x12 (it was trained without --resize)"
        )

        status, _ = predicted(client, "models/det.pt", "shapes.png")
        coco = json.loads((tmp_path / "d.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        expected = [
            [a["bbox"][1], a["bbox"][0], a["bbox"][1] + a["bbox"][3], a["bbox"][0] + a["bbox"][2], a["score"]]
            for a in coco["annotations"]
        ]
        boxes = client.get("/api/models/boxes", params={"image": "shapes.png"}).json()
        assert len(boxes) == len(expected) > 0 and status["boxes"] == len(boxes)
        assert [b["class"] for b in boxes] == [names[a["category_id"]] for a in coco["annotations"]]
        np.testing.assert_allclose(
            [[b["y0"], b["x0"], b["y1"], b["x1"], b["score"]] for b in boxes], expected, atol=0.011
        )


class Blocking(Model):
    """A stand-in model that predicts until released, counting how many run at once."""

    task = "segment"

    def __init__(self, path: Path) -> None:
        super().__init__(path, "blocking.pt", 2, 1, [])
        self.release, self.started, self.active, self.most = threading.Event(), [], 0, 0

    def run(self, image: ServedImage, z: int | None, progress) -> Result:
        self.active += 1
        self.most = max(self.most, self.active)
        self.started.append(image.name)
        try:
            for step in range(100_000):
                progress(step, 100_000)  # raises once a newer request replaced this one
                if self.release.wait(0.005):
                    return Result(summary=f"{image.name} #{len(self.started)}")
            raise AssertionError("never released")
        finally:
            self.active -= 1


def test_one_prediction_at_a_time_and_a_newer_request_cancels(tmp_path: Path) -> None:
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.zeros((8, 8), np.uint8))
    models = ModelService(ServedFolder(tmp_path))
    models.model = fake = Blocking(tmp_path / "blocking.pt")

    def until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    try:
        models.predict("a.tif")
        until(lambda: fake.started == ["a.tif"])
        assert models.predict("b.tif")["state"] == "running"  # queued behind a
        models.predict("a.tif")  # a again: the running a stops, the new one queues behind b
        until(lambda: fake.started == ["a.tif", "b.tif"])
        assert models.status("a.tif")["progress"] == 0.0
        fake.release.set()
        until(lambda: models.status("a.tif")["state"] == "done")
        assert fake.started == ["a.tif", "b.tif", "a.tif"] and fake.most == 1
        assert models.status("b.tif")["summary"] == "b.tif #2" and models.status("a.tif")["summary"] == "a.tif #3"
    finally:
        models.close()


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="no headless Chromium (see test_serve_browser.py)")
def test_page_opens_a_checkpoint_predicts_and_draws_outlines(server: str, browser, tmp_path: Path, runs: Path) -> None:
    folder = tmp_path / "data"  # what the browser test's server serves; files added now are listed at once
    tifffile.imwrite(folder / "nuclei.tif", nuclei(96))
    add_checkpoints(runs, folder)
    assert main(predict_instances_args(folder / SEG, folder / "nuclei.tif", tmp_path / "out")) == 0
    border = find_boundaries(tifffile.imread(tmp_path / "out" / "nuclei_instances.tif"), mode="inner", background=0)
    browser.get(server + "#nuclei.tif")
    wait(
        browser,
        "document.body.dataset.image === 'nuclei.tif'",
        READY,
        "document.querySelector('#models-list li') !== null",
    )
    browser.execute_script("document.querySelector(`#models-list li[data-path='${arguments[0]}']`).click()", SEG)
    wait(browser, f"document.body.dataset.modelPath === '{SEG}'", READY)
    browser.find_element("id", "model-predict").click()
    wait(browser, "document.body.dataset.modelState === 'done'", READY)
    on = np.argwhere(border)[:: max(1, border.sum() // 40)] + 0.5
    off = np.argwhere(~ndimage.binary_dilation(border))[::97] + 0.5  # not next to a border either
    assert len(on) >= 10
    assert (pixels(browser, "model-outlines", on.tolist())[:, 3] > 0).all()
    assert (pixels(browser, "model-outlines", off.tolist())[:, 3] == 0).all()
    assert browser.execute_script("return document.body.dataset.error") is None
