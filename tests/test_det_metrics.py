"""Detection metrics against pycocotools' COCOeval run directly on the same data, and COCO-JSON detection files."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deepscope.data.detection.types import DetData, DetItem
from deepscope.errors import DataError
from deepscope.metrics.coco_files import detections_to_coco, load_coco_predictions, score_coco_files
from deepscope.metrics.detection import DetectionScorer, best_f1_threshold

CLASSES = ["nucleus", "cell", "debris"]
# COCOeval.stats order
STATS = [
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
]


def _boxes(rng: np.random.Generator, n: int, sides: tuple[int, int]) -> np.ndarray:
    """Integer boxes (exact in float32 and float64 alike, so both sides compute the same IoUs)."""
    xy = rng.integers(0, 600, (n, 2))
    wh = rng.integers(*sides, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _jitter(rng: np.random.Generator, boxes: np.ndarray) -> np.ndarray:
    out = boxes + rng.integers(-3, 4, boxes.shape)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def scene() -> tuple[list[dict], list[dict]]:
    """Three classes, small/medium/large objects, crowds, given areas, empty images and one with 150 objects."""
    rng = np.random.default_rng(7)
    preds, targets = [], []
    for n_truth, n_pred in [(0, 0), (6, 9), (0, 5), (8, 0), (20, 30), (150, 200), (12, 15)]:
        truth = np.concatenate(
            [
                _boxes(rng, n_truth // 3, (4, 12)),
                _boxes(rng, n_truth // 3, (40, 60)),
                _boxes(rng, n_truth - 2 * (n_truth // 3), (110, 150)),
            ]
        )
        labels = np.ones(n_truth, np.int64) if n_truth == 150 else rng.integers(1, 4, n_truth)
        crowd = rng.random(n_truth) < 0.1
        box_area = (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
        area = np.where(rng.random(n_truth) < 0.3, 0.6 * box_area, box_area)  # a few "mask" areas move size classes
        if n_truth:
            pick = rng.integers(0, n_truth, n_pred)
            boxes, pred_labels = _jitter(rng, truth[pick]), labels[pick].copy()
            relabel = rng.random(n_pred) < 0.15
            pred_labels[relabel] = rng.integers(1, 4, relabel.sum())
        else:
            boxes, pred_labels = _boxes(rng, n_pred, (10, 50)), rng.integers(1, 4, n_pred)
        targets.append(
            {
                "boxes": torch.tensor(truth).reshape(-1, 4),
                "labels": torch.tensor(labels),
                "iscrowd": torch.tensor(crowd),
                "area": torch.tensor(area),
            }
        )
        preds.append(
            {
                "boxes": torch.tensor(boxes).reshape(-1, 4),
                "labels": torch.tensor(pred_labels),
                "scores": torch.tensor(rng.random(n_pred), dtype=torch.float32),
            }
        )
    return preds, targets


def _to_coco(preds: list[dict], targets: list[dict], masks: bool = False) -> tuple[dict, list[dict]]:
    """The same data as pycocotools' own inputs: a ground-truth dataset and a results list."""
    images, annotations, results = [], [], []
    for i, (pred, target) in enumerate(zip(preds, targets)):
        images.append(
            {"id": i + 1, "width": 64 if masks else 800, "height": 64 if masks else 800, "file_name": f"im{i}.png"}
        )
        truth_objects = zip(target["boxes"].tolist(), target["labels"].tolist(), target["iscrowd"].tolist())
        for k, (box, label, crowd) in enumerate(truth_objects):
            ann = {
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": label,
                "iscrowd": int(crowd),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            }
            if masks:  # COCO's area is the mask's
                ann["segmentation"] = mask_utils.encode(np.asfortranarray(target["masks"][k].numpy().astype(np.uint8)))
                ann["area"] = float(target["masks"][k].sum())
            else:
                ann["area"] = float(target["area"][k])
            annotations.append(ann)
        for k, (box, label, score) in enumerate(
            zip(pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist())
        ):
            bbox = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            res = {"image_id": i + 1, "category_id": label, "score": score, "bbox": bbox}
            if masks:
                res["segmentation"] = mask_utils.encode(
                    np.asfortranarray(pred["masks"][k, 0].numpy() >= 0.5).astype(np.uint8)
                )
            results.append(res)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def _cocoeval(truth: dict, results: list[dict], max_dets: list[int], iou_type: str = "bbox") -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(truth)
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        evaluation.params.maxDets = max_dets
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def _ap(precision: np.ndarray) -> float:
    """COCOeval.summarize's average of a precision slice (valid entries only)."""
    return float(precision[precision > -1].mean())


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_box_map_equals_pycocotools(scene, backend: str) -> None:
    preds, targets = scene
    scorer = DetectionScorer(CLASSES, backend=backend)
    scorer.update(preds[:3], targets[:3])
    scorer.update(preds[3:], targets[3:])
    result = scorer.compute()
    reference = _cocoeval(*_to_coco(preds, targets), [1, 10, 100])
    for name, value in zip(STATS, reference.stats):
        assert result[name] == pytest.approx(value, abs=1e-6), name
    for k, name in enumerate(CLASSES):
        assert result["per_class"][name] == pytest.approx(_ap(reference.eval["precision"][:, :, k, 0, -1]), abs=1e-6)
    assert result["voc_ap_50"] == result["map_50"] and result["voc_ap_75"] == result["map_75"]
    assert result["max_detections"] == 100 and "map_maxdets100" not in result
    json.dumps(result, allow_nan=False)


def test_more_than_100_objects_are_not_capped(scene) -> None:
    preds, targets = scene
    scorer = DetectionScorer(CLASSES, max_detections=300)
    scorer.update(preds, targets)
    result = scorer.compute()
    truth, results = _to_coco(preds, targets)
    at_300, at_100 = _cocoeval(truth, results, [1, 10, 300]), _cocoeval(truth, results, [1, 10, 100])
    # pycocotools' summarize reports AP@[.5:.95] only at 100 detections (stats[0] is -1 here); the rest use maxDets[2]
    assert result["map"] == pytest.approx(_ap(at_300.eval["precision"][:, :, :, 0, -1]), abs=1e-6)
    for name, value in list(zip(STATS, at_300.stats))[1:]:
        assert result[name.replace("mar_100", "mar_300")] == pytest.approx(value, abs=1e-6), name
    for name, value in zip(STATS[:6], at_100.stats[:6]):
        assert result[f"{name}_maxdets100"] == pytest.approx(value, abs=1e-6), name
    assert result["mar_100"] == pytest.approx(at_100.stats[8], abs=1e-6)
    assert result["map"] > result["map_maxdets100"] + 0.01


def _mask_scene() -> tuple[list[dict], list[dict]]:
    """Discs on 64x64 images: one image whose only masks are false positives, a crowd, a missed object."""
    yy, xx = np.mgrid[:64, :64]

    def disc(cx: int, cy: int, r: int) -> np.ndarray:
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r

    def item(discs: list[tuple[int, int, int]], labels: list[int], scores: list[float] | None, crowd=()) -> dict:
        masks = torch.tensor(np.array([disc(*d) for d in discs]).reshape(-1, 64, 64))
        boxes = torch.tensor([[cx - r, cy - r, cx + r + 1, cy + r + 1] for cx, cy, r in discs], dtype=torch.float32)
        boxes = boxes.reshape(-1, 4)
        out = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}
        if scores is None:  # no area: the scorer takes it from the masks
            return {**out, "iscrowd": torch.tensor([i in crowd for i in range(len(discs))], dtype=torch.bool)}
        # model-style probabilities
        return {**out, "scores": torch.tensor(scores), "masks": masks[:, None].float() * 0.9}

    targets = [
        item([(16, 16, 8), (44, 40, 12), (10, 50, 3)], [1, 2, 1], None, crowd=(2,)),
        item([], [], None),
        item([(30, 30, 20), (8, 8, 4)], [1, 1], None),
    ]
    preds = [
        item([(17, 16, 8), (40, 40, 12), (10, 50, 3), (50, 10, 5)], [1, 2, 1, 1], [0.9, 0.8, 0.7, 0.6]),
        item([(20, 20, 6)], [2], [0.95]),
        item([(31, 29, 18), (50, 50, 6)], [1, 1], [0.85, 0.4]),
    ]
    return preds, targets


def test_mask_map_equals_pycocotools_segm() -> None:
    preds, targets = _mask_scene()
    scorer = DetectionScorer(CLASSES, masks=True)
    scorer.update(preds, targets)
    result = scorer.compute()
    truth, results = _to_coco(preds, targets, masks=True)
    segm, bbox = _cocoeval(truth, results, [1, 10, 100], "segm"), _cocoeval(truth, results, [1, 10, 100], "bbox")
    assert result["mask_map"] == pytest.approx(segm.stats[0], abs=1e-6)
    assert result["mask_map_50"] == pytest.approx(segm.stats[1], abs=1e-6)
    assert result["mask_map_75"] == pytest.approx(segm.stats[2], abs=1e-6)
    assert result["map"] == pytest.approx(bbox.stats[0], abs=1e-6)  # boxes scored with the mask areas, as COCO does
    assert result["mask_map"] != result["map"]


def test_empty_and_undefined_come_out_as_none() -> None:
    nothing = DetectionScorer(CLASSES).compute()
    assert nothing["map"] is None and nothing["mar_100"] is None and nothing["per_class"] == dict.fromkeys(CLASSES)
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    only_false_positives = DetectionScorer(CLASSES)
    only_false_positives.update(
        [{"boxes": box, "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}],
        [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}],
    )
    assert only_false_positives.compute(curves=True)["map"] is None
    missed = DetectionScorer(CLASSES)
    missed.update(
        [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}],
        [{"boxes": box, "labels": torch.tensor([2])}],
    )
    result = missed.compute(curves=True)
    assert result["map"] == 0.0 and result["map_small"] == 0.0 and result["map_large"] is None
    assert result["per_class"] == {"nucleus": None, "cell": 0.0, "debris": None}
    assert result["best_f1"]["cell"] == {"threshold": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    json.dumps([nothing, result], allow_nan=False)


def test_voc_ap_known_answers() -> None:
    """IoU 0.45 and 0.7 hits: both count at 0.4, one at 0.5 (AP 51 of 101 recall levels at precision 0.5), none at 0.75."""
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]), "labels": torch.tensor([1, 1])}
    pred = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 4.5], [50.0, 50.0, 60.0, 57.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 1]),
    }
    scorer = DetectionScorer(["nucleus"])
    scorer.update([pred], [target])
    result = scorer.compute()
    assert result["voc_ap_40"] == pytest.approx(1.0)
    assert result["voc_ap_50"] == pytest.approx(0.5 * 51 / 101)
    assert result["voc_ap_75"] == 0.0


def test_best_f1_threshold_known_answer() -> None:
    """Four objects; by score TP, TP, FP, TP, FP: F1 peaks at 0.75 when keeping scores >= 0.6."""
    truth = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0], [60.0, 0.0, 70.0, 10.0]]
    )
    pred = torch.cat([truth[:3], torch.tensor([[0.0, 40.0, 10.0, 50.0], [20.0, 40.0, 30.0, 50.0]])])
    scorer = DetectionScorer(["nucleus"])
    scores = torch.tensor([0.9, 0.8, 0.6, 0.7, 0.3])
    scorer.update(
        [{"boxes": pred, "scores": scores, "labels": torch.ones(5, dtype=torch.int64)}],
        [{"boxes": truth, "labels": torch.ones(4, dtype=torch.int64)}],
    )
    result = scorer.compute(curves=True)
    assert best_f1_threshold(result["pr"]["nucleus"]) == pytest.approx((0.6, 0.75, 0.75, 0.75))
    assert result["best_f1"]["nucleus"]["threshold"] == pytest.approx(0.6)
    assert len(result["pr"]["nucleus"]["precision"]) == 101


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def files(scene, tmp_path_factory) -> dict[str, Path]:
    """Truth file (ids 1..n), predictions by the writer with other ids and category ids, and as a bare results list."""
    preds, targets = scene
    folder = tmp_path_factory.mktemp("coco")
    truth, _ = _to_coco(preds, targets)
    images = [{**im, "id": 1000 - im["id"]} for im in truth["images"]]
    written = detections_to_coco(images, CLASSES, preds)
    renamed = {1: 3, 2: 1, 3: 2}  # same names, other ids: matched by name
    written["categories"] = [{"id": renamed[c["id"]], "name": c["name"]} for c in written["categories"]]
    for ann in written["annotations"]:
        ann["category_id"] = renamed[ann["category_id"]]
    plain = [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "score")}
        for a in detections_to_coco(truth["images"], CLASSES, preds)["annotations"]
    ]
    return {
        "truth": _write(folder / "truth.json", truth),
        "written": _write(folder / "pred.json", written),
        "plain": _write(folder / "plain.json", plain),
    }


def test_score_coco_files_matches_by_file_name_and_equals_pycocotools(files) -> None:
    by_name = score_coco_files(files["written"], files["truth"])
    by_id = score_coco_files(files["plain"], files["truth"])
    assert by_name == by_id
    assert by_name["images"] == 7 and by_name["detections"] == 259
    truth = json.loads(files["truth"].read_text())
    reference = _cocoeval(truth, json.loads(files["plain"].read_text()), [1, 10, 100])
    for name, value in zip(STATS, reference.stats):
        assert by_name[name] == pytest.approx(value, abs=1e-6), name


def test_score_coco_files_against_folder_data(files, scene) -> None:
    truth = json.loads(files["truth"].read_text())
    _, targets = scene
    items = [
        DetItem(
            name=im["file_name"],
            path=Path("/data") / im["file_name"],
            width=800,
            height=800,
            boxes=t["boxes"].numpy(),
            labels=t["labels"].numpy(),
            crowd=t["iscrowd"].numpy(),
            image_id=im["id"] + 50,
            area=t["area"].numpy(),
        )
        for im, t in zip(truth["images"], targets)
    ]
    data = DetData(class_names=CLASSES, splits={"val": items})
    assert score_coco_files(files["written"], data, split="val") == score_coco_files(files["written"], files["truth"])


def test_score_coco_files_bad_input(files, tmp_path: Path) -> None:
    good = json.loads(files["plain"].read_text())
    cases = {
        "broken.json": "{not json",
        "no_score.json": json.dumps([{k: v for k, v in good[0].items() if k != "score"}]),
        "bbox3.json": json.dumps([{**good[0], "bbox": [1, 2, 3]}]),
        "unknown_image.json": json.dumps([{**good[0], "image_id": 4242}]),
        "unknown_class.json": json.dumps([{**good[0], "category_id": 9}]),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=name) as err:
            score_coco_files(tmp_path / name, files["truth"])
        assert "\n" not in str(err.value)
    stranger = json.loads(files["written"].read_text())
    stranger["images"][1]["file_name"] = "elsewhere.png"
    with pytest.raises(DataError, match=r"stranger\.json: image 'elsewhere\.png'"):
        score_coco_files(_write(tmp_path / "stranger.json", stranger), files["truth"])
    with pytest.raises(DataError, match="truth.json"):
        score_coco_files(files["plain"], _write(tmp_path / "truth.json", {"images": []}))


def test_written_file_loads_in_pycocotools_as_dataset_and_results(tmp_path: Path) -> None:
    preds, targets = _mask_scene()
    images = [{"id": i + 1, "file_name": f"im{i}.png", "width": 64, "height": 64} for i in range(3)]
    written = json.loads(json.dumps(detections_to_coco(images, CLASSES, preds, masks_rle=True)))
    assert [a["id"] for a in written["annotations"]] == list(range(1, 8))
    assert written["annotations"][0]["bbox"] == [9.0, 8.0, 17.0, 17.0] and written["annotations"][0]["area"] == 197.0
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = COCO()
        dataset.dataset = written
        dataset.createIndex()
        assert dataset.annToMask(dataset.anns[1]).sum() == 197 and len(dataset.getImgIds()) == 3
        truth, _ = _to_coco(preds, targets, masks=True)
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        results = gt.loadRes(written["annotations"])
    assert len(results.anns) == 7 and np.array_equal(
        results.annToMask(results.anns[2]), preds[0]["masks"][1, 0].numpy() > 0.5
    )
    assert load_coco_predictions(_write(tmp_path / "p.json", written)).file_names == {
        1: "im0.png",
        2: "im1.png",
        3: "im2.png",
    }
