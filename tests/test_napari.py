"""The napari plugin, in a real napari viewer on a virtual X screen (Xvfb, software OpenGL): its manifest, the reader
of deepscope's results, the widget that runs a model on an open image, and the one that shows a run."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from conftest import TINY_CENTERNET, last_json
from deepscope.cli import main

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
napari = pytest.importorskip("napari", reason="the napari plugin tests need napari (pip install -e '.[test]')")


def end_with_parent() -> None:
    """In the child before it runs: ask Linux to send it SIGTERM when its parent, this test process, ends."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@pytest.fixture(scope="session", autouse=True)
def x_display():
    """A virtual X screen for Qt and OpenGL when none is set (napari draws with OpenGL, which Qt's offscreen platform
    lacks); the tests skip without Xvfb."""
    if os.environ.get("DISPLAY"):
        yield
        return
    if shutil.which("Xvfb") is None:
        pytest.skip("napari needs an X display with OpenGL: install Xvfb (Debian: xvfb, libgl1-mesa-dri)")
    display = ":97"
    # the server ends with this process (the kernel signals it), after Qt has let go of it: stopping it at the end of
    # the session, while the QApplication still holds its connection, makes Qt abort at exit
    subprocess.Popen(["Xvfb", display, "-screen", "0", "1280x1024x24", "-nolisten", "tcp"], preexec_fn=end_with_parent)
    time.sleep(1.0)
    os.environ.update(DISPLAY=display, QT_QPA_PLATFORM="xcb")
    yield


@pytest.fixture
def predicted(small_flows_run, small_nuclei, tmp_path, capsys) -> tuple[Path, Path]:
    """A test image and deepscope predict's probabilities and instances of it, in one HDF5 file."""
    image = sorted((small_nuclei / "test" / "images").iterdir())[0]
    out = tmp_path / "pred.h5"
    assert main(["predict", str(small_flows_run / "best.pt"), str(image), "--out", str(out), "--instances"]) == 0
    capsys.readouterr()
    return image, out


def test_the_manifest_is_valid_and_names_the_reader_and_widgets():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("deepscope")
    assert {c.id for c in manifest.contributions.commands} == {"deepscope.read", "deepscope.predict", "deepscope.run"}
    assert [w.display_name for w in manifest.contributions.widgets] == ["Predict", "Run report"]


def test_the_reader_opens_predictions_boxes_and_nothing_else(make_napari_viewer, predicted, tmp_path):
    from deepscope.napari.reader import get_reader

    _, h5 = predicted
    viewer = make_napari_viewer()
    layers = viewer.open(str(h5), plugin="deepscope")
    kinds = [layer._type_string for layer in layers]
    assert kinds.count("labels") == 1 and kinds.count("image") == 3  # flows: probability and two flow channels
    with h5py.File(h5) as f:
        np.testing.assert_array_equal(viewer.layers["pred instances"].data, f["instances"][...])
    coco = tmp_path / "boxes.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}],
                "categories": [{"id": 1, "name": "cell"}],
                "annotations": [{"image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 20], "score": 0.9}],
            }
        )
    )
    (boxes,) = viewer.open(str(coco), plugin="deepscope")
    assert boxes._type_string == "shapes" and list(boxes.properties["label"]) == ["cell"]
    np.testing.assert_allclose(boxes.data[0].min(0), [3, 2]) and np.testing.assert_allclose(
        boxes.data[0].max(0), [23, 12]
    )
    # the VOC XML deepscope predict --format voc writes: 1-based inclusive corners, a score per object
    records = [
        {
            "file_name": "b.png",
            "width": 40,
            "height": 30,
            "detections": {
                "boxes": np.array([[2.0, 3.0, 12.0, 23.0]]),
                "labels": np.array([1]),
                "scores": np.array([0.75]),
            },
        }
    ]
    from deepscope.tasks.detect.predict import write_voc_xml

    write_voc_xml(tmp_path / "voc", records, ["cell"])
    (voc,) = viewer.open(str(tmp_path / "voc" / "b.xml"), plugin="deepscope")
    assert voc.name == "b.png boxes" and list(voc.properties["label"]) == ["cell"]
    np.testing.assert_allclose(voc.properties["score"], [0.75])
    np.testing.assert_allclose(voc.data[0].min(0), [3, 2]) and np.testing.assert_allclose(voc.data[0].max(0), [23, 12])
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((4, 4), np.uint8))
    other_xml = tmp_path / "other.xml"
    other_xml.write_text("<svg></svg>")
    assert get_reader(str(plain)) is None and get_reader(str(tmp_path / "other.json")) is None
    assert get_reader(str(other_xml)) is None


def wait_for(widget, qtbot) -> None:
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60000)


@pytest.mark.parametrize("fmt", ["checkpoint", "onnx"])
def test_the_predict_widget_gives_what_deepscope_predict_gives(
    make_napari_viewer, qtbot, small_flows_run, predicted, tmp_path, capsys, fmt
):
    from deepscope.napari.widgets import PredictWidget

    image, h5 = predicted
    model = small_flows_run / "best.pt"
    if fmt == "onnx":
        model = tmp_path / "model.onnx"
        assert main(["export", str(small_flows_run / "best.pt"), "--format", "onnx", "--out", str(model)]) == 0
        assert last_json(capsys)["format"] == "onnx"
    viewer = make_napari_viewer()
    viewer.add_image(tifffile.imread(image), name="nuclei")
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.setText(str(model))
    assert widget.image.currentText() == "nuclei"
    widget.run()
    wait_for(widget, qtbot)
    assert widget.status.text().startswith("done"), widget.status.text()
    with h5py.File(h5) as f:
        np.testing.assert_array_equal(viewer.layers["nuclei instances"].data, f["instances"][...])
        np.testing.assert_allclose(viewer.layers["nuclei probabilities"].data, f["probabilities"][0], atol=1e-4)
    assert widget.progress.value() == 100


def test_the_predict_widget_draws_a_detectors_boxes_as_deepscope_predict_finds_them(
    make_napari_viewer, qtbot, tmp_path, capsys
):
    """A tiny CenterNet trained on generated shapes, run on a test image in the widget and by deepscope predict."""
    from deepscope.demo.data import write_shapes
    from deepscope.napari.widgets import PredictWidget

    shapes = write_shapes(tmp_path / "shapes", train=8, test=2, size=64)
    run = tmp_path / "run"
    assert main(["train", "detect", "--data", str(shapes), "--epochs", "1", "--out", str(run), *TINY_CENTERNET]) == 0
    image = sorted((shapes / "test" / "images").iterdir())[0]
    assert main(["predict", str(run / "best.pt"), str(image), "--out", str(tmp_path / "boxes.json")]) == 0
    capsys.readouterr()
    expected = json.loads((tmp_path / "boxes.json").read_text())["annotations"]
    viewer = make_napari_viewer()
    from deepscope.data.io.images import read_image

    viewer.add_image(read_image(image), name="shapes", rgb=True)
    widget = PredictWidget(viewer)
    widget.model.setText(str(run / "best.pt"))
    widget.run()
    wait_for(widget, qtbot)
    assert widget.status.text() == "done: shapes boxes", widget.status.text()
    boxes = viewer.layers["shapes boxes"]
    assert len(boxes.data) == len(expected) > 0
    corners = [[*r.min(0)[::-1], *r.max(0)[::-1]] for r in boxes.data]  # napari's (y, x) corners as x1 y1 x2 y2
    np.testing.assert_allclose(
        corners, [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in expected)], atol=1e-2
    )
    np.testing.assert_allclose(boxes.properties["score"], [a["score"] for a in expected], atol=1e-4)


def test_the_predict_widget_names_a_classifiers_class_as_deepscope_predict_does(
    make_napari_viewer, qtbot, class_tree, tmp_path, capsys
):
    from conftest import fast_args
    from deepscope.data.io.images import read_image
    from deepscope.napari.widgets import PredictWidget

    run = tmp_path / "cnn"
    assert main(fast_args(class_tree, run)) == 0
    image = sorted((class_tree / "test").rglob("*.png"))[0]
    assert main(["predict", str(run / "best.pt"), str(image), "--out", str(tmp_path / "p.csv")]) == 0
    capsys.readouterr()
    header, row = [line.split(",") for line in (tmp_path / "p.csv").read_text().splitlines()]
    viewer = make_napari_viewer()
    viewer.add_image(read_image(image), name="pattern", rgb=True)
    widget = PredictWidget(viewer)
    widget.model.setText(str(run / "best.pt"))
    widget.run()
    wait_for(widget, qtbot)
    assert widget.status.text() == "done: pattern class", widget.status.text()
    frame = viewer.layers["pattern class"]
    predicted = dict(zip(header, row))
    assert list(frame.properties["label"]) == [predicted["predicted"]]
    assert frame.properties["score"][0] == pytest.approx(float(predicted[f"prob_{predicted['predicted']}"]), abs=1e-4)


def test_a_cancelled_or_failed_prediction_says_so_in_the_widget(make_napari_viewer, qtbot, small_flows_run, tmp_path):
    from deepscope.napari.runner import Cancelled, predict_image
    from deepscope.napari.widgets import PredictWidget

    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):  # stopped at the first tile
        predict_image(small_flows_run / "best.pt", np.zeros((96, 96), np.float32), "x", lambda d, t: None, stop)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 8, 8, 8), np.float32), name="4d")
    widget = PredictWidget(viewer)
    widget.model.setText(str(tmp_path / "missing.pt"))
    widget.run()
    assert "no such model file" in widget.status.text()
    widget.model.setText(str(small_flows_run / "best.pt"))
    widget.run()
    wait_for(widget, qtbot)
    assert widget.status.text().startswith("error:") and "4d" in widget.status.text()
    widget.failed(Cancelled("prediction cancelled"))
    assert widget.status.text() == "cancelled"


def test_the_run_widget_shows_a_runs_pictures_metrics_and_report(make_napari_viewer, small_flows_run, tmp_path):
    from deepscope.napari.widgets import RunWidget

    viewer = make_napari_viewer()
    widget = RunWidget(viewer)
    widget.folder.setText(str(small_flows_run))
    widget.show_run()
    pictures = sorted(p.stem for p in small_flows_run.glob("*.png"))
    assert pictures and sorted(layer.name.split(" ", 1)[1] for layer in viewer.layers) == pictures
    assert "task: segment" in widget.summary.toPlainText() and widget.report_button.isEnabled()
    widget.folder.setText(str(tmp_path))
    widget.show_run()
    assert "not a run folder" in widget.summary.toPlainText() and not widget.report_button.isEnabled()
