"""Report pictures and tables of a segmentation run: metric tables, score against IoU threshold, the images worst
first, overlays with the errors marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage.segmentation import find_boundaries

from deepscope.data.segmentation.dataset import SegItem
from deepscope.engine.report import display_rgb, image_grid, plot_lines, table
from deepscope.metrics.instance import unmatched_ids
from deepscope.tasks.segment.config import SegmentConfig
from deepscope.tasks.segment.predict import Predictor, score_image

SHOWN = 6  # images drawn in the report
MISSED, SPURIOUS = (1.0, 0.0, 0.0), (1.0, 1.0, 0.0)  # red, yellow


# ---- report pictures ---------------------------------------------------------------------------------------------


def report_sections(final: dict[str, Any], split: str, run_dir: Path) -> list[tuple[str, str]]:
    """Metric tables, the score-against-IoU-threshold curve and the images worst first."""
    if not final:
        return []
    scalars = [{"metric": k, "value": v} for k, v in final.items() if isinstance(v, (int, float))]
    sections = [(f"{split.capitalize()} metrics", table(scalars))]
    if "thresholds" in final:
        rows = [{"IoU threshold": t, **v} for t, v in final["thresholds"].items()]
        x = [float(t) for t in final["thresholds"]]
        plot_lines(
            x,
            {
                k: [final["thresholds"][t][k] for t in final["thresholds"]]
                for k in ("score", "f1", "precision", "recall")
            },
            run_dir / "scores.png",
            "IoU threshold",
            "value",
        )
        sections.append(
            ("Instance matching", "<img src='scores.png' alt='scores against IoU threshold'>" + table(rows))
        )
    if "per_class" in final:
        sections.append(("Per class", table([{"class": k, **v} for k, v in final["per_class"].items()])))
    if final.get("per_image"):
        sections.append(per_image_section(final["per_image"]))
    return sections


def _worst_first(per_image: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records by score at IoU 0.5, then by Kaggle score, which separates images equal at 0.5 by their boundaries."""
    return sorted(per_image, key=lambda r: (r["thresholds"]["0.5"]["score"], r["kaggle"]))


def worst_names(per_image: Sequence[dict[str, Any]], k: int) -> list[str]:
    """Names of the ``k`` worst images (``image_scores`` records), worst first, e.g. to choose the overlays drawn."""
    return [r["name"] for r in _worst_first(per_image)[:k]]


def per_image_section(per_image: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """A table of every image, worst first, so failures stand out; string fields the caller added to the records
    (e.g. ``modality``) become columns, so failures can be traced to a kind of image."""
    extra = list(dict.fromkeys(k for r in per_image for k, v in r.items() if isinstance(v, str) and k != "name"))
    rows = []
    for r in _worst_first(per_image):
        at = r["thresholds"]["0.5"]
        rows.append(
            {
                "image": r["name"],
                **{k: r.get(k, "") for k in extra},
                "objects true": at["tp"] + at["fn"],
                "objects predicted": at["tp"] + at["fp"],
                "score@0.5": at["score"],
                "Kaggle": r["kaggle"],
                "PQ": r["pq"],
                "VOI merge": r["voi_merge"],
                "VOI split": r["voi_split"],
            }
        )
    note = (
        "<p>Sorted by score at IoU 0.5, then Kaggle score (mean over IoU 0.5..0.95); PQ: panoptic quality. "
        "VOI merge grows with merged objects, VOI split with split ones.</p>"
    )
    return "Per image (worst first)", note + table(rows)


def _outline(rgb: np.ndarray, labels: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    out = rgb.copy()
    out[find_boundaries(labels, mode="inner")] = colour
    return out


def error_panel(
    rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray, errors: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """The image with the truth objects missed at IoU 0.5 filled red and the spurious predictions filled yellow.

    ``errors`` (missed truth ids, spurious prediction ids) default to those of ``truth`` and ``pred``; a 3D caller
    passes the volume's with a slice. Missed objects are outlined red again on top, so one under a spurious
    prediction (typically a merge) stays visible.
    """
    missed, spurious = unmatched_ids(truth, pred) if errors is None else errors
    out = rgb.copy()
    missed_labels = np.where(np.isin(truth, missed), truth, 0)
    out[missed_labels > 0] = MISSED
    out[np.isin(pred, spurious)] = SPURIOUS
    return _outline(out, missed_labels, MISSED)


def overlay_caption(target: str) -> str:
    """What the panels of ``draw_overlays`` show, left to right."""
    errors = (
        "" if target == "semantic" else " | errors at IoU 0.5 (missed truth objects red, spurious predictions yellow)"
    )
    return f"image | truth (green outlines) | prediction (magenta outlines) | probability{errors}"


def draw_overlays(predictor: Predictor, items: Sequence[SegItem], config: SegmentConfig, path: Path) -> None:
    """One row per image of ``items`` (e.g. the worst, see ``worst_names``; 3D: the middle slice), panels as
    ``overlay_caption`` says; instance targets' rows are captioned with the image's score at IoU 0.5."""
    instance = config.target != "semantic"
    panels, captions = [], []
    for item in items:
        record, probs, pred = score_image(predictor, item, config.class_values, config.ignore_label)
        image = np.asarray(
            item.channels_first(predictor.channels)[(slice(None),) + tuple(slice(None) for _ in item.labels.shape)]
        )
        truth = np.asarray(item.labels[...])
        errors = unmatched_ids(truth, pred) if instance else None  # of the whole volume, before slicing
        if truth.ndim == 3:
            z = truth.shape[0] // 2
            image, truth, pred, probs = image[:, z], truth[z], pred[z], probs[:, z]
        rgb = display_rgb(image)
        panels += [
            rgb,
            _outline(rgb, truth, (0, 1, 0)),
            _outline(rgb, pred, (1, 0, 1)),
            np.repeat(probs[0 if instance else -1][..., None], 3, -1),
        ]
        captions += [
            item.name[:28],
            f"truth: {len(np.unique(truth)) - 1}",
            f"prediction: {len(np.unique(pred)) - 1}",
            "probability",
        ]
        if errors is not None:  # an instance target
            panels.append(error_panel(rgb, truth, pred, errors))
            captions.append(
                f"score@0.5 {record['thresholds']['0.5']['score']:.2f} ({len(errors[0])} FN, {len(errors[1])} FP)"
            )
    if panels:
        image_grid(panels, captions, path, columns=5 if instance else 4)
