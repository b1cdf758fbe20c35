"""napari widgets: run a model on the open image (tiled, with progress, cancellable), and show a run folder (its
pictures as layers, its metrics, its report in the browser)."""

from __future__ import annotations

import threading
import webbrowser
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari.qt.threading import thread_worker
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from deepscope.errors import DeepscopeError
from deepscope.napari.reader import LayerData, run_layers, run_summary
from deepscope.napari.runner import Cancelled, predict_image

MODEL_FILTER = "deepscope models (*.pt *.onnx *.torchscript *.zip *.yaml);;All files (*)"


@dataclass
class Failure:
    """What a prediction raised, returned to the Qt thread (a worker that returns or raises an exception is reported
    by napari as a crash; the widget says it in its status line instead)."""

    error: Exception


def attempt(*args: Any) -> list[LayerData] | Failure:
    """:func:`predict_image`, its failure returned as a :class:`Failure` rather than raised."""
    try:
        return predict_image(*args)
    except Exception as exc:  # anything the model or the image raises ends in the status line, not a traceback
        return Failure(exc)


def file_row(edit: QLineEdit, pick: Any) -> QHBoxLayout:
    row = QHBoxLayout()
    row.addWidget(edit)
    browse = QPushButton("Browse")
    browse.clicked.connect(pick)
    row.addWidget(browse)
    return row


class PredictWidget(QWidget):
    """A model file (checkpoint, ONNX, TorchScript or bioimage.io package) run on the chosen image layer; the
    results come back as layers. The run happens in a worker thread; Cancel stops it at the next tile."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model = QLineEdit()
        self.model.setPlaceholderText("best.pt, .onnx, .torchscript or a bioimage.io .zip")
        self.image = QComboBox()
        self.run_button, self.cancel_button = QPushButton("Run"), QPushButton("Cancel")
        self.progress, self.status = QProgressBar(), QLabel("")
        self.status.setWordWrap(True)
        self.cancel_button.setEnabled(False)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Model"))
        layout.addLayout(file_row(self.model, self.pick_model))
        layout.addWidget(QLabel("Image layer"))
        layout.addWidget(self.image)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self.refresh_layers)
        self.viewer.layers.events.removed.connect(self.refresh_layers)
        self.refresh_layers()
        self.stop = threading.Event()
        self.done, self.total = 0, 1
        self.timer = QTimer(self)  # the worker only writes numbers; the bar is redrawn on the Qt thread
        self.timer.timeout.connect(self.show_progress)
        self.worker: Any = None

    def pick_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "deepscope model", "", MODEL_FILTER)
        if path:
            self.model.setText(path)

    def refresh_layers(self, *_: Any) -> None:
        chosen = self.image.currentText()
        self.image.clear()
        self.image.addItems([layer.name for layer in self.viewer.layers if layer._type_string == "image"])
        if chosen:
            self.image.setCurrentText(chosen)

    def report(self, done: int, total: int) -> None:
        self.done, self.total = done, max(1, total)

    def show_progress(self) -> None:
        self.progress.setValue(int(100 * self.done / self.total))

    def run(self) -> None:
        """Start the prediction of the chosen layer with the chosen model in a worker thread."""
        model, name = Path(self.model.text().strip()), self.image.currentText()
        if not model.is_file():
            self.status.setText(f"{model}: no such model file")
            return
        if not name:
            self.status.setText("open an image first")
            return
        image = self.viewer.layers[name].data
        self.stop.clear()
        self.done, self.total = 0, 1
        self.worker = thread_worker(attempt)(model, image, name, self.report, self.stop)
        self.worker.returned.connect(self.finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"running {model.name} on {name}")
        self.timer.start(100)
        self.worker.start()

    def cancel(self) -> None:
        self.stop.set()

    def settle(self, text: str) -> None:
        self.timer.stop()
        self.show_progress()
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.status.setText(text)

    def finished(self, layers: list[LayerData] | Failure) -> None:
        if isinstance(layers, Failure):
            self.failed(layers.error)
            return
        for data, settings, kind in layers:
            getattr(self.viewer, f"add_{kind}")(data, **settings)
        self.progress.setValue(100)
        self.settle(f"done: {', '.join(settings['name'] for _, settings, _ in layers)}")

    def failed(self, error: Exception) -> None:
        cancelled = isinstance(error, Cancelled)
        shown = str(error) if isinstance(error, DeepscopeError) else f"{type(error).__name__}: {error}"
        self.settle("cancelled" if cancelled else f"error: {shown}")


class RunWidget(QWidget):
    """A run folder: its pictures (curves, overlays) as layers, its metrics as text, its report in the browser."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("a run folder (runs/...)")
        self.summary = QPlainTextEdit()
        self.summary.setReadOnly(True)
        self.open_button, self.report_button = QPushButton("Show run"), QPushButton("Open report.html")
        self.report_button.setEnabled(False)
        layout = QVBoxLayout(self)
        layout.addLayout(file_row(self.folder, self.pick_folder))
        layout.addWidget(self.open_button)
        layout.addWidget(self.summary)
        layout.addWidget(self.report_button)
        self.open_button.clicked.connect(self.show_run)
        self.report_button.clicked.connect(self.open_report)

    def pick_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "deepscope run folder")
        if path:
            self.folder.setText(path)

    def show_run(self) -> None:
        folder = Path(self.folder.text().strip())
        layers = run_layers(folder, probe=False)
        if layers is None:
            self.summary.setPlainText(f"{folder}: not a run folder (no metrics.json and config.yaml)")
            self.report_button.setEnabled(False)
            return
        for data, settings, kind in layers:
            getattr(self.viewer, f"add_{kind}")(data, **settings)
        self.summary.setPlainText(run_summary(folder))
        self.report_button.setEnabled((folder / "report.html").is_file())

    def open_report(self) -> None:
        webbrowser.open((Path(self.folder.text().strip()) / "report.html").resolve().as_uri())
