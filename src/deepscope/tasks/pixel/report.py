"""Report of a pixel-classification run: labels and predictions over the images, and which features the forest used."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepscope.engine.report import display_rgb, image_grid, pyplot, save_figure, table, write_report
from deepscope.tasks.pixel.classifier import PixelClassifier, class_map
from deepscope.tasks.pixel.labelled import LabelledImage

SHOWN = 6  # images drawn in the report
COLOUR_NAMES = ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan")


def overlay(rgb: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``rgb`` with every pixel of class k > 0 tinted in the k-th palette colour; class 0 (unlabelled) left as is."""
    palette = pyplot().get_cmap("tab10")
    colours = np.array([palette((k - 1) % 10)[:3] for k in range(1, 256)], np.float32)
    out = rgb.copy()
    labelled = classes > 0
    out[labelled] = (1 - alpha) * rgb[labelled] + alpha * colours[classes[labelled] - 1]
    return out


def _middle(array: np.ndarray, ndim: int) -> np.ndarray:
    """2D images as they are; the middle plane of 3D ones (the last ``ndim`` axes are spatial)."""
    return array if ndim == 2 else array[..., array.shape[-3] // 2, :, :]


def draw_predictions(
    classifier: PixelClassifier, items: Sequence[LabelledImage], predictions: Sequence[dict[str, Any]], path: Path
) -> None:
    """Per image: the image, the labels over it, the predicted classes over it (3D: middle plane)."""
    panels, captions = [], []
    nd = classifier.spec.ndim
    for item, pred in zip(items[:SHOWN], predictions[:SHOWN]):
        view = classifier.view(item.image, str(item.source))
        image = _middle(np.asarray(view[(slice(None),) + tuple(slice(None) for _ in range(nd))]), nd)
        labels = _middle(item.labels, nd)
        predicted = _middle(class_map(classifier, pred["probs"]), nd)
        rgb = display_rgb(image)
        panels += [rgb, overlay(rgb, labels, alpha=0.9), overlay(rgb, predicted)]
        captions += [item.name[:28], f"labels ({int(np.count_nonzero(item.labels))} px)", "prediction"]
    if panels:
        image_grid(np.stack(panels), captions, path, columns=3)


def plot_importance(importance: dict[str, float], path: Path) -> None:
    """The forest's impurity importance summed per filter and scale (over eigenvalues and channels)."""
    plt = pyplot()
    grouped: dict[str, float] = defaultdict(float)
    for name, value in importance.items():
        parts = name.split("_")
        parts = parts[1:] if parts[0].startswith("c") and parts[0][1:].isdigit() else parts
        grouped[f"{parts[0]} {parts[1]}"] += value
    names = sorted(grouped, key=grouped.__getitem__, reverse=True)[:25]
    fig, ax = plt.subplots(figsize=(6, 0.22 * len(names) + 0.8))
    ax.barh(names[::-1], [grouped[n] for n in names[::-1]])
    ax.set(xlabel="importance (mean decrease in impurity)")
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_pixel_report(
    out: Path,
    classifier: PixelClassifier,
    items: Sequence[LabelledImage],
    predictions: Sequence[dict[str, Any]],
    metrics: dict[str, Any],
    importance: dict[str, float],
) -> Path:
    sections = [
        ("Labelled pixels", table([{"class": k, "pixels": v} for k, v in metrics["labelled_per_class"].items()]))
    ]
    if predictions:
        draw_predictions(classifier, items, predictions, out / "predictions.png")
        legend = ", ".join(
            f"{name} {COLOUR_NAMES[(c - 1) % 10]}" for c, name in zip(classifier.classes, classifier.class_names)
        )
        sections.append(
            (
                "Labels and predictions",
                f"<p>Colours: {legend}.</p><img src='predictions.png' alt='labels and predictions'>",
            )
        )
    plot_importance(importance, out / "importance.png")
    sections.append(("Feature importance", "<img src='importance.png' alt='feature importance'>"))
    return write_report(out, "Pixel classification", metrics, [], sections)
