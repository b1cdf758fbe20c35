"""Draws docs/napari.png, the README's picture of the napari plugin: a deepscope checkpoint run on an image by the
Predict widget, in a napari window on a virtual X screen (run it under ``xvfb-run`` where there is no display).

    xvfb-run -a python docs/napari_picture.py CHECKPOINT IMAGE [--out docs/napari.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
import tifffile
from PIL import Image
from qtpy.QtWidgets import QApplication

from deepscope.data.io.images import read_image
from deepscope.napari.widgets import PredictWidget


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("image")
    parser.add_argument("--out", default=str(Path(__file__).with_name("napari.png")))
    args = parser.parse_args()
    image = tifffile.imread(args.image) if args.image.endswith((".tif", ".tiff")) else read_image(Path(args.image))
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1200, 700)
    viewer.add_image(image, name=Path(args.image).stem)
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="deepscope: Predict")
    widget.model.setText(args.checkpoint)
    widget.run()
    while not widget.run_button.isEnabled():
        QApplication.processEvents()
        time.sleep(0.05)
    for layer in viewer.layers:
        if "probabilities" in layer.name:
            layer.visible = False
    viewer.layers.selection.active = viewer.layers[-1]
    QApplication.processEvents()
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(args.out)
    print(widget.status.text(), "->", args.out)
    viewer.close()


if __name__ == "__main__":
    main()
