"""Report pictures and tables of a segmentation run: metric tables, score against IoU threshold, overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage.segmentation import find_boundaries

from deepscope.data.seg_dataset import (
    SegItem,
)
from deepscope.engine.report import display_rgb, image_grid, plot_lines, table
from deepscope.tasks.segment.config import SegmentConfig
from deepscope.tasks.segment.predict import Predictor, score_image

SHOWN = 6  # images drawn in the report


# ---- report pictures ---------------------------------------------------------------------------------------------


def report_sections(final: dict[str, Any], split: str, run_dir: Path) -> list[tuple[str, str]]:
    """Metric tables and the score-against-IoU-threshold curve."""
    if not final:
        return []
    scalars = [{"metric": k, "value": v} for k, v in final.items() if isinstance(v, (int, float))]
    sections = [(f"{split.capitalize()} metrics", table(scalars))]
    if "thresholds" in final:
        rows = [{"IoU threshold": t, **v} for t, v in final["thresholds"].items()]
        x = [float(t) for t in final["thresholds"]]
        plot_lines(x, {k: [final["thresholds"][t][k] for t in final["thresholds"]] for k in ("score", "f1", "precision", "recall")},
                   run_dir / "scores.png", "IoU threshold", "value")
        sections.append(("Instance matching", "<img src='scores.png' alt='scores against IoU threshold'>" + table(rows)))
    if "per_class" in final:
        sections.append(("Per class", table([{"class": k, **v} for k, v in final["per_class"].items()])))
    return sections


def _outline(rgb: np.ndarray, labels: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    out = rgb.copy()
    out[find_boundaries(labels, mode="inner")] = colour
    return out


def draw_overlays(predictor: Predictor, items: Sequence[SegItem], config: SegmentConfig, path: Path) -> None:
    """Image, truth and prediction outlines, and the first probability channel, one row per image (3D: middle slice)."""
    panels, captions = [], []
    for item in items:
        _, probs, pred = score_image(predictor, item, config.class_values, config.ignore_label)
        image = np.asarray(item.channels_first(predictor.channels)[(slice(None),) + tuple(slice(None) for _ in item.labels.shape)])
        truth = np.asarray(item.labels[...])
        if truth.ndim == 3:
            z = truth.shape[0] // 2
            image, truth, pred, probs = image[:, z], truth[z], pred[z], probs[:, z]
        rgb = display_rgb(image)
        panels += [rgb, _outline(rgb, truth, (0, 1, 0)), _outline(rgb, pred, (1, 0, 1)), np.repeat(probs[-1 if config.target == "semantic" else 0][..., None], 3, -1)]
        captions += [item.name[:28], f"truth: {len(np.unique(truth)) - 1}", f"prediction: {len(np.unique(pred)) - 1}", "probability"]
    if panels:
        image_grid(panels, captions, path, columns=4)


