"""Instance segmentation metrics on hand-computed label images, checked against skimage where it has the metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.metrics

from deepscope.errors import DataError
from deepscope.metrics.instance import (
    KAGGLE_THRESHOLDS,
    THRESHOLDS,
    adapted_rand,
    check_labels,
    evaluate_instances,
    image_scores,
    match_counts,
    overlap_table,
    panoptic,
    scores,
    unmatched_ids,
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
    assert list(report) == [
        "thresholds",
        "mean_score",
        "voi_split",
        "voi_merge",
        "arand",
        "kaggle_score",
        "pq",
        "sq",
        "rq",
        "per_image",
    ]
    keys = ["0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9"]
    assert list(report["thresholds"]) == keys and len(THRESHOLDS) == 9
    # summed at 0.5: tp 2 + 1, fp 1 + 0, fn 1 + 0 -> score 3/5; averaging the per-image scores would give (0.5 + 1) / 2
    at_half = report["thresholds"]["0.5"]
    assert at_half == pytest.approx(
        {"tp": 3, "fp": 1, "fn": 1, "precision": 0.75, "recall": 0.75, "f1": 0.75, "score": 0.6}
    )
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
        (
            np.zeros((4, 4), int),
            np.zeros((4, 5), int),
            r"img7: truth has shape \(4, 4\) but prediction has shape \(4, 5\)",
        ),
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


def shifted_squares() -> tuple[np.ndarray, np.ndarray]:
    """Four 10x10 squares, predicted shifted right by 0, 1, 2 and 3 columns: IoU (10 - k) / (10 + k), i.e.
    1, 9/11, 8/12 and 7/13 (0.538, between the thresholds 0.5 and 0.55)."""
    truth = np.zeros((12, 60), dtype=np.uint16)
    pred = np.zeros_like(truth)
    for k in range(4):
        truth[1:11, 15 * k : 15 * k + 10] = k + 1
        pred[1:11, 15 * k + k : 15 * k + k + 10] = 10 + k
    return truth, pred


def test_kaggle_score_and_panoptic_quality_of_shifted_squares():
    truth, pred = shifted_squares()
    np.testing.assert_allclose(np.diag(overlap_table(truth, pred)[0]), [1, 9 / 11, 8 / 12, 7 / 13])
    record = image_scores("squares", truth, pred)
    assert KAGGLE_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    # pairs above 0.5, 0.55, ..., 0.95: 4, 3, 3, 3, 2, 2, 2, 1, 1, 1 of 4 truths and 4 predictions
    per_threshold = [4 / 4, 3 / 5, 3 / 5, 3 / 5, 2 / 6, 2 / 6, 2 / 6, 1 / 7, 1 / 7, 1 / 7]
    assert record["kaggle"] == pytest.approx(np.mean(per_threshold))
    sq = (1 + 9 / 11 + 8 / 12 + 7 / 13) / 4
    assert record["sq"] == pytest.approx(sq) and record["rq"] == 1.0 and record["pq"] == pytest.approx(sq)
    assert (record["pq_tp"], record["pq_fp"], record["pq_fn"]) == (4, 0, 0)
    assert record["pq_iou_sum"] == pytest.approx(4 * sq)


def test_kaggle_and_panoptic_need_iou_above_the_threshold():
    truth, pred = hand_case()  # IoUs 1 and 0.6 (exactly 12/20), the rest unmatched; 3 objects on each side
    record = image_scores("hand", truth, pred)
    # match_counts accepts IoU >= 0.6 (StarDist), Kaggle only IoU > 0.6: 2 matches at 0.5 and 0.55, then 1
    assert record["thresholds"]["0.6"]["tp"] == 2
    assert record["kaggle"] == pytest.approx((2 * 2 / 4 + 8 * 1 / 5) / 10)
    assert (
        record["sq"] == pytest.approx(0.8)
        and record["rq"] == pytest.approx(2 / 3)
        and record["pq"] == pytest.approx(0.8 * 2 / 3)
    )
    # IoU exactly 0.5 (a 2x4 truth, its left half predicted) is a match for score@0.5, not for PQ or Kaggle
    half_truth = np.zeros((2, 4), dtype=np.uint8)
    half_truth[:] = 1
    half_pred = np.zeros_like(half_truth)
    half_pred[:, :2] = 1
    half = image_scores("half", half_truth, half_pred)
    assert half["thresholds"]["0.5"]["score"] == 1.0
    assert half["kaggle"] == 0.0 and half["pq"] == 0.0 and (half["pq_tp"], half["pq_fp"], half["pq_fn"]) == (0, 1, 1)


def test_empty_images_score_one_when_both_are_empty_else_zero():
    empty = np.zeros((8, 8), dtype=np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 3
    nothing = image_scores("nothing", empty, empty)
    assert nothing["kaggle"] == 1.0 and (nothing["pq"], nothing["sq"], nothing["rq"]) == (1.0, 1.0, 1.0)
    for truth, pred in ((one, empty), (empty, one)):
        record = image_scores("one side", truth, pred)
        assert record["kaggle"] == 0.0 and (record["pq"], record["sq"], record["rq"]) == (0.0, 0.0, 0.0)
    assert (image_scores("missed", one, empty)["pq_fn"], image_scores("spurious", empty, one)["pq_fp"]) == (1, 1)
    assert panoptic(0.0, 0, 0, 0) == {"pq": 1.0, "sq": 1.0, "rq": 1.0}


def test_kaggle_is_a_mean_over_images_and_panoptic_quality_is_pooled():
    # one image with a single, perfect object; one with 20 objects and no prediction at all
    single = np.zeros((6, 6), dtype=np.int32)
    single[1:4, 1:4] = 1
    crowd = np.zeros((20, 40), dtype=np.int32)
    for i in range(20):
        crowd[(i // 10) * 10 + 1 : (i // 10) * 10 + 8, (i % 10) * 4 : (i % 10) * 4 + 3] = i + 1
    report = evaluate_instances([("single", single, single), ("crowd", crowd, np.zeros_like(crowd))])
    assert [r["kaggle"] for r in report["per_image"]] == [1.0, 0.0]
    assert report["kaggle_score"] == 0.5  # every image weighs the same
    assert report["thresholds"]["0.5"]["score"] == pytest.approx(1 / 21)  # every object weighs the same
    # pooled: tp 1, fn 20, matched IoU 1 -> SQ 1, RQ 1 / (1 + 20 / 2); the mean of the images' PQ would be 0.5
    assert report["sq"] == 1.0 and report["rq"] == pytest.approx(1 / 11) and report["pq"] == pytest.approx(1 / 11)
    assert [r["pq"] for r in report["per_image"]] == [1.0, 0.0]


def test_unmatched_ids_follow_the_matching_counts():
    truth, pred = hand_case()
    missed, spurious = unmatched_ids(truth, pred)
    assert missed.tolist() == [3] and spurious.tolist() == [3]
    assert unmatched_ids(truth, pred, 0.7)[0].tolist() == [2, 3] and unmatched_ids(truth, pred, 0.6)[0].tolist() == [3]
    # the case that needs the assignment: at 0.25 every object matches, at 0.5 truth 2 and prediction 2 are left
    truth = np.zeros((2, 13), dtype=np.uint16)
    pred = np.zeros((2, 13), dtype=np.uint16)
    truth[0, :10], truth[0, 10:], truth[1, :4] = 1, 2, 3
    pred[0, :3], pred[0, 3:], pred[1, :4] = 2, 1, 5
    assert [ids.tolist() for ids in unmatched_ids(truth, pred, 0.25)] == [[], []]
    assert [ids.tolist() for ids in unmatched_ids(truth, pred, 0.5)] == [[2], [2]]
    empty = np.zeros_like(truth)
    assert [ids.tolist() for ids in unmatched_ids(truth, empty)] == [[1, 2, 3], []]
