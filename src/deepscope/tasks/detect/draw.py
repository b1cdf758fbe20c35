"""Pictures of detections: boxes drawn on an image, a small gallery of several images, precision-recall curves.

Truth is drawn in green, predictions in magenta with their class and score. Boxes are 0-based pixel edges, so a box
starting at x1 is drawn at x1 - 0.5, the left edge of pixel x1 in matplotlib's pixel-centred image coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np

from deepscope.engine.report import display_rgb, pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TRUTH_COLOUR, PRED_COLOUR = "lime", "magenta"
MAX_CAPTIONED = 25  # with more predictions shown, class and score captions would hide the image: boxes only
# longest side, in image pixels, an image keeps in a gallery: the PNG stays small whatever the images
GALLERY_SIDE = 384
# name, image, truth, pred, caption
GalleryItem = tuple[str, np.ndarray, dict[str, np.ndarray] | None, dict[str, np.ndarray], str]


def _display(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1]: 8-bit images as they are, others (16-bit, float microscopy) stretched between their
    0.5 and 99.8 percentiles, since their dtype's range would show them black."""
    image = image[..., None] if image.ndim == 2 else image
    values = image.astype(np.float32)
    if image.dtype == np.uint8:
        values /= 255
    else:
        lo, hi = np.percentile(values, (0.5, 99.8))
        values = (values - lo) / max(float(hi - lo), 1e-6)
    return display_rgb(np.moveaxis(values, -1, 0))


def _draw_boxes(ax: Axes, boxes: np.ndarray, colour: str, texts: Sequence[str] | None = None) -> None:
    from matplotlib.patches import Rectangle

    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=float).reshape(-1, 4)):
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.2))
        if texts:
            ax.text(
                x1 - 0.5,
                y1 - 0.5,
                texts[i],
                fontsize=6,
                color="white",
                va="bottom",
                clip_on=True,
                bbox={"facecolor": colour, "alpha": 0.6, "pad": 0.5, "edgecolor": "none"},
            )


def draw_detections(
    image: np.ndarray,
    truth: dict[str, np.ndarray] | None,
    pred: dict[str, np.ndarray],
    class_names: Sequence[str],
    target: str | Path | Axes,
    score_threshold: float = 0.3,
) -> None:
    """Truth boxes and the predictions scoring at least ``score_threshold`` (their masks shaded, their class and score
    written when there are at most ``MAX_CAPTIONED``) on an (H, W, C) image, into ``target``: an Axes, or a PNG path written at about the image's size (at most ~1000 pixels wide)."""
    if not isinstance(target, str | Path):
        _draw_on(target, image, truth, pred, class_names, score_threshold)
        return
    plt = pyplot()
    height, width = image.shape[:2]
    scale = min(10.0, width / 100) / width
    fig, ax = plt.subplots(figsize=(max(2.0, width * scale), max(2.0, height * scale)))
    _draw_on(ax, image, truth, pred, class_names, score_threshold)
    fig.tight_layout(pad=0.2)
    save_figure(fig, target, dpi=100)


def _draw_on(
    ax: Axes,
    image: np.ndarray,
    truth: dict[str, np.ndarray] | None,
    pred: dict[str, np.ndarray],
    class_names: Sequence[str],
    score_threshold: float,
) -> None:
    shown = np.asarray(pred["scores"]) >= score_threshold
    ax.imshow(_display(image), interpolation="nearest")
    if pred.get("masks") is not None and shown.any():
        shade = np.zeros(image.shape[:2] + (4,), np.float32)
        shade[np.asarray(pred["masks"])[shown].any(0)] = (1, 0, 1, 0.35)
        ax.imshow(shade, interpolation="nearest")
    if truth is not None:
        _draw_boxes(ax, truth["boxes"], TRUTH_COLOUR)
    texts = [
        f"{class_names[int(label) - 1]} {score:.2f}"
        for label, score in zip(pred["labels"][shown], pred["scores"][shown])
    ]
    _draw_boxes(ax, np.asarray(pred["boxes"])[shown], PRED_COLOUR, texts if len(texts) <= MAX_CAPTIONED else None)
    ax.axis("off")


@overload
def _shrunk(found: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]: ...
@overload
def _shrunk(found: None, step: int) -> None: ...
def _shrunk(found: dict[str, np.ndarray] | None, step: int) -> dict[str, np.ndarray] | None:
    """Boxes and masks of an image subsampled by ``step``."""
    if found is None or step == 1:
        return found
    shrunk: dict[str, np.ndarray] = {**found, "boxes": np.asarray(found["boxes"], dtype=np.float32) / step}
    if found.get("masks") is not None:
        shrunk["masks"] = np.asarray(found["masks"])[:, ::step, ::step]
    return shrunk


def detection_gallery(
    items: Sequence[GalleryItem],
    path: str | Path,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    columns: int = 4,
) -> None:
    """A grid of images with their truth and predictions, captioned. Images are subsampled to at most
    ``GALLERY_SIDE`` pixels first: the report only needs an overview, and a large microscopy image would otherwise
    make a PNG of many megabytes."""
    plt = pyplot()
    columns = max(1, min(columns, len(items)))
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 3.2, rows * 3.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, image, truth, pred, caption) in zip(axes.ravel(), items):
        step = max(1, math.ceil(max(image.shape[:2]) / GALLERY_SIDE))
        draw_detections(
            image[::step, ::step], _shrunk(truth, step), _shrunk(pred, step), class_names, ax, score_threshold
        )
        ax.set_title(caption or name, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def _best_f1(recall: np.ndarray, precision: np.ndarray) -> tuple[float, float] | None:
    """(recall, precision) where F1 is highest, or None for an empty curve."""
    if len(recall) == 0:
        return None
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return float(recall[best]), float(precision[best])


def plot_pr_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    f1_points: dict[str, tuple[float, ...]] | None = None,
) -> None:
    """A precision-recall curve per class, with its best-F1 point marked and grey iso-F1 lines behind. ``f1_points``
    gives a class's point as (recall, precision, ...) when the metric chose it; otherwise it is found on the curve.
    Negative precisions (COCO's mark for recall levels never reached) are left out."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    r = np.linspace(0.01, 1, 200)
    for f in (0.2, 0.4, 0.6, 0.8):
        p = f * r / (2 * r - f)
        ok = (p > 0) & (p <= 1) & (2 * r > f)
        ax.plot(r[ok], p[ok], color="0.85", linewidth=0.8, zorder=0)
    for name, (recall, precision) in curves.items():
        recall, precision = np.asarray(recall, dtype=float), np.asarray(precision, dtype=float)
        valid = precision >= 0
        recall, precision = recall[valid], precision[valid]
        point = f1_points.get(name) if f1_points else _best_f1(recall, precision)
        if point is None:
            continue
        best_r, best_p = point[0], point[1]
        f1 = 2 * best_p * best_r / max(best_p + best_r, 1e-12)
        (line,) = ax.plot(recall, precision, linewidth=1.3, label=f"{name} (best F1 {f1:.2f})")
        ax.plot([best_r], [best_p], "o", color=line.get_color(), markersize=5)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01), title="precision-recall per class")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left", ncol=1 + len(curves) // 12)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
