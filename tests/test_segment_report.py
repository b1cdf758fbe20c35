"""The segment report's additions: the per-image table worst first, the worst names and the error panel."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np

from deepscope.metrics.instance import evaluate_instances, image_scores
from deepscope.tasks.segment import report
from deepscope.tasks.segment.report import (
    MISSED,
    SPURIOUS,
    error_panel,
    overlay_caption,
    per_image_section,
    report_sections,
    worst_names,
)


def squares(shifts: list[int | None], size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """One 8x8 truth square per shift; its prediction shifted right by that many columns (None: missed)."""
    truth = np.zeros((size + 2, 12 * len(shifts)), dtype=np.int32)
    pred = np.zeros_like(truth)
    for i, shift in enumerate(shifts):
        truth[1 : size + 1, 12 * i : 12 * i + size] = i + 1
        if shift is not None:
            pred[1 : size + 1, 12 * i + shift : 12 * i + shift + size] = i + 1
    return truth, pred


def records() -> list[dict]:
    # score@0.5: perfect 1, shifted 1 (8x8 shifted by 2: IoU 48/80 = 0.6, Kaggle lower), half 1/2, none 0
    cases = {"perfect": [0, 0], "shifted": [2, 2], "half": [0, None], "none": [None, None]}
    return [image_scores(name, *squares(shifts)) for name, shifts in cases.items()]


def test_worst_names_sort_by_score_at_half_then_kaggle():
    per_image = records()
    assert [r["thresholds"]["0.5"]["score"] for r in per_image] == [1.0, 1.0, 0.5, 0.0]
    assert per_image[1]["kaggle"] < per_image[0]["kaggle"] == 1.0
    assert worst_names(per_image, 4) == ["none", "half", "shifted", "perfect"]
    assert worst_names(per_image, 2) == ["none", "half"]


def test_per_image_section_lists_every_image_worst_first_with_added_columns():
    per_image = records()
    per_image[2]["modality"] = "brightfield"
    heading, body = per_image_section(per_image)
    assert heading == "Per image (worst first)"
    header = re.findall(r"<th>(.*?)</th>", body)
    assert header == [
        "image",
        "modality",
        "objects true",
        "objects predicted",
        "score@0.5",
        "Kaggle",
        "PQ",
        "VOI merge",
        "VOI split",
    ]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(<td>.*?)</tr>", body)]
    assert [row[0] for row in rows] == ["none", "half", "shifted", "perfect"]
    # half: 2 true objects, 1 predicted, score 1/2, Kaggle 1/2, PQ = SQ 1 * RQ 1 / (1 + 1/2)
    assert rows[1] == ["half", "brightfield", "2", "1", "0.5000", "0.5000", f"{2 / 3:.4f}", "0.0000", "0.0000"]
    assert rows[0][1] == "" and rows[0][2:4] == ["2", "0"]


def test_report_sections_list_the_new_scalars_and_the_per_image_table(tmp_path):
    final = evaluate_instances([(r, *squares(s)) for r, s in (("a", [0, 2]), ("b", [None, 0, 0]))])
    sections = dict(report_sections(final, "test", tmp_path))
    metrics = sections["Test metrics"]
    for key in ("kaggle_score", "pq", "sq", "rq"):
        assert f"<td>{key}</td><td>{final[key]:.4f}</td>" in metrics
    assert re.findall(r"<tr><td>(\w)</td>", sections["Per image (worst first)"]) == ["b", "a"]


def test_error_panel_fills_missed_objects_red_and_spurious_ones_yellow():
    truth, pred = squares([0, None, 2, None])  # matched, missed, IoU 0.6 (matched), and a fourth slot left empty
    truth[truth == 4] = 0
    pred[1:9, 38:42] = 7  # a spurious object in the background
    rgb = np.full(truth.shape + (3,), 0.25)
    panel = error_panel(rgb, truth, pred)
    np.testing.assert_array_equal(panel[4, 14], MISSED)
    np.testing.assert_array_equal(panel[4, 40], SPURIOUS)
    untouched = (truth != 2) & (pred != 7)
    np.testing.assert_array_equal(panel[untouched], rgb[untouched])
    assert rgb.max() == 0.25  # the input is not drawn on
    # a merge: one 8x20 prediction over two 8x8 truths (IoU 64/160 each) is spurious and both truths are missed
    truth = truth[:, :20]
    merged = np.zeros_like(truth)
    merged[1:9, :] = 1
    panel = error_panel(rgb[:, :20], truth, merged)
    np.testing.assert_array_equal(panel[4, 10], SPURIOUS)  # the gap between the truths
    np.testing.assert_array_equal(panel[4, 4], SPURIOUS)
    np.testing.assert_array_equal(panel[1, 4], MISSED)  # missed outlines drawn over the spurious fill


def test_draw_overlays_adds_the_error_panel_and_the_score(monkeypatch, tmp_path):
    truth, pred = squares([0, None])
    item = SimpleNamespace(name="img", labels=truth, channels_first=lambda channels: np.full((1,) + truth.shape, 0.5))
    record = image_scores("img", truth, pred)
    monkeypatch.setattr(report, "score_image", lambda *args: (record, np.zeros((2,) + truth.shape), pred))
    drawn = {}
    monkeypatch.setattr(
        report,
        "image_grid",
        lambda panels, captions, path, columns: drawn.update(panels=panels, captions=captions, columns=columns),
    )
    config = SimpleNamespace(target="foreground_boundaries", class_values=None, ignore_label=None)
    report.draw_overlays(SimpleNamespace(channels=1), [item], config, tmp_path / "overlays.png")
    assert drawn["columns"] == 5 and len(drawn["panels"]) == 5
    assert drawn["captions"][-1] == "score@0.5 0.50 (1 FN, 0 FP)"
    np.testing.assert_array_equal(drawn["panels"][-1], error_panel(np.full(truth.shape + (3,), 0.5), truth, pred))
    assert overlay_caption("foreground_boundaries").count("|") == 4 and overlay_caption("semantic").count("|") == 3


def test_draw_overlays_marks_the_errors_of_the_volume_on_the_middle_slice(monkeypatch, tmp_path):
    # the object is matched in its middle slice but missed in 3D (predicted in 1 of its 5 slices: IoU 1/5)
    truth = np.zeros((5, 6, 6), dtype=np.int32)
    truth[:, 1:5, 1:5] = 1
    pred = np.zeros_like(truth)
    pred[2] = truth[2]
    item = SimpleNamespace(name="vol", labels=truth, channels_first=lambda channels: np.zeros((1,) + truth.shape))
    monkeypatch.setattr(
        report, "score_image", lambda *args: (image_scores("vol", truth, pred), np.zeros((1,) + truth.shape), pred)
    )
    drawn = {}
    monkeypatch.setattr(
        report, "image_grid", lambda panels, captions, path, columns: drawn.update(panels=panels, captions=captions)
    )
    report.draw_overlays(
        SimpleNamespace(channels=1),
        [item],
        SimpleNamespace(target="foreground", class_values=None, ignore_label=None),
        tmp_path / "overlays.png",
    )
    assert drawn["captions"][-1] == "score@0.5 0.00 (1 FN, 1 FP)"
    np.testing.assert_array_equal(drawn["panels"][-1][3, 3], SPURIOUS)
    np.testing.assert_array_equal(drawn["panels"][-1][1, 3], MISSED)
