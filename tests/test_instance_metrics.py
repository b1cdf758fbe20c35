"""Instance segmentation metrics on hand-computed label images, checked against skimage where it has the metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.metrics

from deepscope.errors import DataError
from deepscope.metrics.instance import (
    THRESHOLDS,
    adapted_rand,
    check_labels,
    evaluate_instances,
    match_counts,
    overlap_table,
    scores,
    variation_of_information,
)


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Truth: 3x3 square, 4x4 square, 2x3 rectangle. Prediction: the 3x3 exactly, the 4x4 shifted right by one
    column (intersection 4x3 = 12, union 16 + 16 - 12 = 20, IoU 0.6), the rectangle missed, a spurious 3x3."""
    truth = np.zeros((10, 10), dtype=np.int32)
    pred = np.zeros((10, 10), dtype=np.int32)
    truth[0:3, 0:3] = 1
    truth[5:9, 1:5] = 2
    truth[0:2, 7:10] = 3
    pred[0:3, 0:3] = 1
    pred[5:9, 2:6] = 2
    pred[7:10, 7:10] = 3
    return truth, pred


def test_overlap_table_hand_computed():
    table, truth_ids, pred_ids = overlap_table(*hand_case())
    assert table.shape == (3, 3) and table.dtype == np.float64
    np.testing.assert_allclose(table, [[1.0, 0.0, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.0]], atol=1e-12)
    assert truth_ids.tolist() == [1, 2, 3] and pred_ids.tolist() == [1, 2, 3]


def test_non_consecutive_ids_give_the_same_table():
    truth, pred = hand_case()
    renumber = np.zeros(4, dtype=np.int64)
    renumber[1:] = [7, 42, 1000]
    table, truth_ids, pred_ids = overlap_table(renumber[truth], renumber[pred])
    np.testing.assert_array_equal(table, overlap_table(truth, pred)[0])
    assert truth_ids.tolist() == [7, 42, 1000] and pred_ids.tolist() == [7, 42, 1000]


def test_match_counts_and_scores_hand_computed():
    counts = match_counts(*hand_case(), thresholds=(0.5, 0.6, 0.7))
    # IoU 0.6 passes at 0.6 because the test is IoU >= threshold
    assert counts == {0.5: (2, 1, 1), 0.6: (2, 1, 1), 0.7: (1, 2, 2)}
    assert scores(*counts[0.5]) == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "score": 2 / 4})
    assert scores(*counts[0.7]) == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3, "score": 1 / 5})
    assert scores(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "score": 0.0}
    assert scores(0, 3, 0)["precision"] == 0.0 and scores(0, 3, 0)["recall"] == 0.0


def test_low_threshold_needs_the_optimal_assignment():
    # One row: truth 1 = columns 0-9, truth 2 = 10-12; prediction 2 = 0-2, prediction 1 = 3-12; plus an exact pair.
    # IoU(t1, p1) = 7/13, IoU(t1, p2) = 3/10, IoU(t2, p1) = 3/10, IoU(t2, p2) = 0. Greedily taking the best pair
    # (t1, p1) first leaves t2 and p2 unmatched; at 0.25 the best one-to-one matching is (t1, p2), (t2, p1).
    truth = np.zeros((2, 13), dtype=np.uint16)
    pred = np.zeros((2, 13), dtype=np.uint16)
    truth[0, :10], truth[0, 10:], truth[1, :4] = 1, 2, 3
    pred[0, :3], pred[0, 3:], pred[1, :4] = 2, 1, 5
    table, _, _ = overlap_table(truth, pred)
    np.testing.assert_allclose(table, [[7 / 13, 3 / 10, 0], [3 / 10, 0, 0], [0, 0, 1]])
    assert match_counts(truth, pred, thresholds=(0.25, 0.5)) == {0.25: (3, 0, 0), 0.5: (2, 1, 1)}


def test_3d_labels():
    # 4x4x4 cubes; the second is shifted by one plane: intersection 48, union 80, IoU 0.6
    truth = np.zeros((8, 10, 10), dtype=np.int64)
    pred = np.zeros_like(truth)
    truth[0:4, 0:4, 0:4] = 1
    truth[2:6, 5:9, 5:9] = 2
    pred[0:4, 0:4, 0:4] = 9
    pred[3:7, 5:9, 5:9] = 4
    table, _, pred_ids = overlap_table(truth, pred)
    assert pred_ids.tolist() == [4, 9]
    np.testing.assert_allclose(table, [[0, 1], [0.6, 0]])
    assert match_counts(truth, pred, thresholds=(0.5, 0.7)) == {0.5: (2, 0, 0), 0.7: (1, 1, 1)}


def test_evaluate_instances_sums_counts_over_images():
    truth, pred = hand_case()
    single = np.zeros((6, 6), dtype=np.int32)
    single[1:4, 1:4] = 5
    report = evaluate_instances([("hand", truth, pred), ("single", single, single)])
    assert json.loads(json.dumps(report)) == report
    assert list(report) == ["thresholds", "mean_score", "voi_split", "voi_merge", "arand", "per_image"]
    keys = ["0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9"]
    assert list(report["thresholds"]) == keys and len(THRESHOLDS) == 9
    # summed at 0.5: tp 2 + 1, fp 1 + 0, fn 1 + 0 -> score 3/5; averaging the per-image scores would give (0.5 + 1) / 2
    at_half = report["thresholds"]["0.5"]
    assert at_half == pytest.approx({"tp": 3, "fp": 1, "fn": 1, "precision": 0.75, "recall": 0.75, "f1": 0.75, "score": 0.6})
    assert report["thresholds"]["0.7"]["score"] == pytest.approx(2 / 6)
    assert report["mean_score"] == pytest.approx(np.mean([report["thresholds"][k]["score"] for k in keys]))
    assert report["mean_score"] == pytest.approx((3 * 0.6 + 6 * 2 / 6) / 9)
    hand, single_report = report["per_image"]
    assert hand["name"] == "hand" and list(hand["thresholds"]) == keys
    assert hand["thresholds"]["0.5"]["score"] == pytest.approx(0.5)
    assert single_report["thresholds"]["0.9"]["score"] == 1.0
    assert single_report["voi_split"] == single_report["voi_merge"] == single_report["arand"] == 0.0
    assert report["arand"] == pytest.approx(hand["arand"] / 2)
    assert report["voi_split"] == pytest.approx(hand["voi_split"] / 2)
    with pytest.raises(DataError, match="no images"):
        evaluate_instances([])


def test_variation_of_information_split_and_merge():
    truth = np.array([[0, 1, 1, 1, 1, 0]])
    assert variation_of_information(truth, truth) == (0.0, 0.0)
    split, merge = variation_of_information(truth, np.array([[0, 1, 1, 2, 2, 0]]))
    assert split == pytest.approx(1.0, abs=1e-12) and merge == pytest.approx(0.0, abs=1e-12)  # one bit: a halved object
    split, merge = variation_of_information(np.array([[1, 1, 2, 2]]), np.array([[3, 3, 3, 3]]))
    assert split == pytest.approx(0.0, abs=1e-12) and merge == pytest.approx(1.0, abs=1e-12)
    empty = np.zeros_like(truth)
    assert variation_of_information(empty, truth) == (0.0, 0.0) and adapted_rand(empty, truth) == 0.0


def test_voi_and_arand_match_skimage():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 6, (2, 24, 24))
    assert adapted_rand(truth, pred) == pytest.approx(skimage.metrics.adapted_rand_error(truth, pred)[0], abs=1e-12)
    expected = skimage.metrics.variation_of_information(truth, pred, ignore_labels=(0,))
    np.testing.assert_allclose(variation_of_information(truth, pred), expected, atol=1e-12)
    assert adapted_rand(truth, pred) > 0.1 and min(variation_of_information(truth, pred)) > 0.1


@pytest.mark.parametrize(
    ("truth", "pred", "message"),
    [
        (np.zeros((4, 4), int), np.zeros((4, 5), int), r"img7: truth has shape \(4, 4\) but prediction has shape \(4, 5\)"),
        (np.zeros((4, 4), int), np.zeros((4, 4), np.float32), "img7: labels must be integers, got float32"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), int), "img7: labels must be integers, got bool"),
        (np.zeros((4, 4), int), np.full((4, 4), -1), "img7: labels must not be negative"),
    ],
)
def test_check_labels_rejects_bad_input(truth, pred, message):
    with pytest.raises(DataError, match=message):
        check_labels(truth, pred, "img7")
    with pytest.raises(DataError, match=message.removeprefix("img7: ")):
        evaluate_instances([("img7", truth, pred)])


def test_overlap_table_of_thousands_of_objects():
    # 46 x 46 = 2116 squares of 20x20 with 2-pixel gaps; the prediction is shifted by one column: IoU 380/420
    yy, xx = np.mgrid[:1024, :1024]
    truth = ((yy // 22) * 46 + xx // 22 + 1).astype(np.int32)
    truth[(yy % 22 >= 20) | (xx % 22 >= 20) | (yy >= 46 * 22) | (xx >= 46 * 22)] = 0
    pred = np.roll(truth, 1, axis=1)
    table, truth_ids, pred_ids = overlap_table(truth, pred)
    assert truth_ids.tolist() == pred_ids.tolist() == list(range(1, 2117))
    np.testing.assert_allclose(np.diag(table), 380 / 420)
    assert np.count_nonzero(table) == 2116
    assert match_counts(truth, pred, thresholds=(0.5, 0.95)) == {0.5: (2116, 0, 0), 0.95: (0, 2116, 2116)}


def test_cli_scores_saved_label_folders(tmp_path, capsys):
    import json

    import tifffile

    from deepscope.cli import main

    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    truth = np.zeros((20, 20), np.uint16)
    truth[2:8, 2:8], truth[10:16, 10:16] = 1, 2
    pred = np.zeros_like(truth)
    pred[2:8, 2:8] = 5  # exact; the second object is missed
    tifffile.imwrite(truth_dir / "a.tif", truth)
    tifffile.imwrite(pred_dir / "a.tif", pred)
    tifffile.imwrite(truth_dir / "b.tif", truth)
    tifffile.imwrite(pred_dir / "b.tif", truth)  # perfect
    out = tmp_path / "scores.json"
    assert main(["evaluate", "segment", "--pred", str(pred_dir), "--truth", str(truth_dir), "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["thresholds"]["0.5"] == {**result["thresholds"]["0.5"], "tp": 3, "fp": 0, "fn": 1, "score": 0.75}
    assert [image["name"] for image in result["per_image"]] == ["a", "b"]
    assert json.loads(out.read_text())["mean_score"] == result["mean_score"] == pytest.approx(0.75)

    tifffile.imwrite(truth_dir / "c.tif", truth)
    assert main(["evaluate", "segment", "--pred", str(pred_dir), "--truth", str(truth_dir), "--out", str(out)]) == 2
    assert "c.tif has no prediction file in pred/" in capsys.readouterr().err
    (truth_dir / "c.tif").unlink()
    tifffile.imwrite(pred_dir / "b.tif", truth.astype(np.float32))
    assert main(["evaluate", "segment", "--pred", str(pred_dir), "--truth", str(truth_dir), "--out", str(out)]) == 2
    assert "b: labels must be integers, got float32" in capsys.readouterr().err
