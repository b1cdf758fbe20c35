"""Detections saved as COCO JSON: scoring them against a truth without a model, and writing them.

Prediction files come in the two shapes tools write: a full COCO file (``images`` with ``file_name``, ``categories``,
``annotations`` with ``score``) or a bare results list as COCO's evaluation server takes it. Images are matched by file
name when both sides name them, because ids are renumbered by every tool that writes a file; categories by name
likewise. The numbers come from :class:`~deepscope.metrics.detection.DetectionScorer`; boxes are scored (masks in a
prediction file are carried along but not scored).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepscope.data.detection.annotations import coco_ground_truth, is_number, json_rles, read_json
from deepscope.data.detection.types import DetData
from deepscope.errors import DataError, shown
from deepscope.metrics.detection import DetectionScorer, binary_masks


@dataclass
class CocoPredictions:
    """A prediction file's detections, and the image file names and category names when the file gives them."""

    path: Path
    detections: list[dict[str, Any]]
    file_names: dict[int, str] | None  # image id -> file name
    category_names: dict[int, str] | None  # category id -> name


@dataclass
class _CocoTruth:
    source: str  # the file, or the image folder of a DetData, for messages
    images: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    annotations: list[dict[str, Any]]


# Entries are matched by these values (ids sorted and looked up, names compared): ids must be integers, names text.
ID_KEYS = ("id", "image_id", "category_id")
NAME_KEYS = ("file_name", "name")


def _check_entry(source: Any, where: str, entry: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse, in one line naming the file, an entry that lacks a key or holds an unusable id, name, box or number."""
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DataError(f"{source}: {where} has no '{missing[0]}'")
    for key in ID_KEYS:
        if key in entry and not (isinstance(entry[key], int) and not isinstance(entry[key], bool)):
            raise DataError(f"{source}: {where} has {key} {shown(entry[key])}, expected an integer")
    for key in NAME_KEYS:
        if key in entry and not isinstance(entry[key], str):
            raise DataError(f"{source}: {where} has {key} {shown(entry[key])}, expected text")
    bbox = entry.get("bbox")
    if "bbox" in keys:
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(is_number, bbox))):
            raise DataError(f"{source}: {where} has bbox {shown(bbox)}, expected 4 numbers [x, y, width, height]")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(f"{source}: {where} has a negative width or height in bbox {bbox}")
    for key in ("score", "area"):
        if (key in keys or key in entry) and not (is_number(entry[key]) and (key == "score" or entry[key] >= 0)):
            raise DataError(f"{source}: {where} has {key} {shown(entry[key])}, expected a number")
    if entry.get("iscrowd", 0) not in (0, 1):
        raise DataError(f"{source}: {where} has iscrowd {shown(entry['iscrowd'])}, expected 0 or 1")


def _check_entries(source: Any, what: str, entries: Any, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """``entries`` when it is a list of objects that pass :func:`_check_entry`."""
    if not isinstance(entries, list):
        raise DataError(f"{source}: '{what}' must be a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{source}: {what} {i} is not an object")
        _check_entry(source, f"{what} {i}", entry, keys)
    return entries


def load_coco_predictions(path: str | Path) -> CocoPredictions:
    """Read a full COCO file with scored annotations, or a bare results list ``[{image_id, category_id, bbox, score}]``."""
    path = Path(path)
    data = read_json(path)
    keys = ("image_id", "category_id", "bbox", "score")
    if isinstance(data, list):
        return CocoPredictions(path, _check_entries(path, "detection", data, keys), None, None)
    if not isinstance(data, dict) or "annotations" not in data:
        raise DataError(f"{path}: expected a COCO file with 'annotations' or a list of detections")
    detections = _check_entries(path, "detection", data["annotations"], keys)
    images = _check_entries(path, "image", data.get("images", []), ("id",))
    categories = _check_entries(path, "category", data.get("categories", []), ("id",))
    file_names = (
        _unique_map(str(path), "image id", [(im["id"], im["file_name"]) for im in images])
        if images and all("file_name" in im for im in images)
        else None
    )
    names = (
        _unique_map(str(path), "category id", [(c["id"], c["name"]) for c in categories])
        if categories and all("name" in c for c in categories)
        else None
    )
    return CocoPredictions(path, detections, file_names, names)


def _load_truth(truth: str | Path | DetData, split: str | None) -> _CocoTruth:
    if isinstance(truth, DetData):
        if split is not None and split not in truth.splits:
            raise DataError(f"the truth data has no split {split!r}, only {sorted(truth.splits)}")
        items = truth.splits[split] if split else [item for part in truth.splits.values() for item in part]
        source = str(items[0].path.parent) if items else "the truth data"
        coco = coco_ground_truth(truth.class_names, items)
        return _CocoTruth(source, coco["images"], coco["categories"], coco["annotations"])
    path = Path(truth)
    data = read_json(path)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise DataError(f"{path}: expected a COCO file with 'images', 'annotations' and 'categories'")
    return _CocoTruth(
        str(path),
        _check_entries(path, "image", data["images"], ("id",)),
        _check_entries(path, "category", data["categories"], ("id",)),
        _check_entries(path, "annotation", data["annotations"], ("image_id", "category_id", "bbox")),
    )


def _unique_map(source: str, what: str, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """key -> value, refusing a key that appears twice (it could not tell its images or categories apart)."""
    twice = [key for key, n in Counter(key for key, _ in pairs).items() if n > 1]
    if twice:
        raise DataError(f"{source}: {what} {twice[0]!r} appears more than once")
    return dict(pairs)


def _image_matcher(pred: CocoPredictions, truth: _CocoTruth) -> dict[Any, Any]:
    """Prediction image id -> truth image id: by file name when both sides have them, else by id."""
    if pred.file_names is None or not all("file_name" in im for im in truth.images):
        return _unique_map(truth.source, "image id", [(im["id"], im["id"]) for im in truth.images])
    by_name = _unique_map(truth.source, "file name", [(im["file_name"], im["id"]) for im in truth.images])
    detected = {d["image_id"] for d in pred.detections}
    for pred_id, name in pred.file_names.items():
        if name not in by_name and pred_id in detected:
            raise DataError(f"{pred.path}: image {name!r} has detections but is not in the truth {truth.source}")
    return {pred_id: by_name[name] for pred_id, name in pred.file_names.items() if name in by_name}


def _category_matcher(pred: CocoPredictions, truth: _CocoTruth) -> tuple[list[str], dict[Any, int], dict[Any, int]]:
    """Class names in truth id order, truth category id -> label 1..K, prediction category id -> label."""
    categories = sorted(truth.categories, key=lambda c: c["id"])
    labels = _unique_map(truth.source, "category id", [(c["id"], k + 1) for k, c in enumerate(categories)])
    names = [str(c.get("name", c["id"])) for c in categories]
    if pred.category_names is not None and all("name" in c for c in categories):
        by_name = _unique_map(truth.source, "category name", [(c["name"], labels[c["id"]]) for c in categories])
        return names, labels, {cid: by_name[n] for cid, n in pred.category_names.items() if n in by_name}
    return names, labels, labels


def score_coco_files(
    pred: str | Path, truth: str | Path | DetData, max_detections: int = 100, split: str | None = None
) -> dict[str, Any]:
    """Score a saved prediction file against a COCO truth file or data read from a folder (all splits, or ``split``).

    Returns :meth:`DetectionScorer.compute`'s numbers plus ``images`` (truth images, those without detections count
    as misses) and ``detections`` (detections read).
    """
    predictions = load_coco_predictions(pred)
    gt = _load_truth(truth, split)
    images = _image_matcher(predictions, gt)
    class_names, truth_labels, pred_labels = _category_matcher(predictions, gt)
    per_image: dict[Any, dict[str, list]] = {im["id"]: {"boxes": [], "scores": [], "labels": []} for im in gt.images}
    for i, det in enumerate(predictions.detections):
        where = f"{predictions.path}: detection {i}"
        if det["image_id"] not in images:
            raise DataError(f"{where} is for image {det['image_id']!r}, which is not in the truth {gt.source}")
        if det["category_id"] not in pred_labels:
            raise DataError(f"{where} has category {det['category_id']!r}, which the truth {gt.source} lacks")
        image = per_image[images[det["image_id"]]]
        image["boxes"].append(det["bbox"])
        image["scores"].append(det["score"])
        image["labels"].append(pred_labels[det["category_id"]])
    truth_objects: dict[Any, list[dict[str, Any]]] = {im["id"]: [] for im in gt.images}
    for i, ann in enumerate(gt.annotations):
        if ann["image_id"] not in truth_objects or ann["category_id"] not in truth_labels:
            raise DataError(f"{gt.source}: annotation {i} refers to an image or category that the file does not list")
        truth_objects[ann["image_id"]].append(ann)
    scorer = DetectionScorer(class_names, max_detections=max_detections)
    scorer.update(
        [_xywh_to_model(d["boxes"], labels=d["labels"], scores=d["scores"]) for d in per_image.values()],
        [_truth_to_model(truth_objects[image_id], truth_labels) for image_id in per_image],
    )
    return {**scorer.compute(), "images": len(gt.images), "detections": len(predictions.detections)}


def _xywh_to_model(boxes: list[list[float]], **values: list) -> dict[str, torch.Tensor]:
    """Model-convention tensors: COCO [x, y, w, h] boxes to (x1, y1, x2, y2)."""
    xywh = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    out = {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)}
    for key, value in values.items():
        out[key] = torch.tensor(value, dtype=torch.int64 if key in ("labels", "iscrowd") else torch.float64)
    return out


def _truth_to_model(annotations: list[dict[str, Any]], labels: dict[Any, int]) -> dict[str, torch.Tensor]:
    return _xywh_to_model(
        [a["bbox"] for a in annotations],
        labels=[labels[a["category_id"]] for a in annotations],
        iscrowd=[int(a.get("iscrowd", 0)) for a in annotations],
        area=[float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in annotations],
    )


def detections_to_coco(
    images: list[dict[str, Any]], class_names: list[str], detections: list[dict[str, Any]], masks_rle: bool = False
) -> dict[str, Any]:
    """A COCO file of a model's detections (one dict per image, in ``images`` order) that serves two uses.

    pycocotools loads it as a data set (``COCO()`` with ``dataset=``, then ``createIndex()``) to view or re-train on,
    and its ``annotations`` as results (``COCO.loadRes``) to score; :func:`score_coco_files` reads it back.
    ``images`` hold ``id``, ``file_name``, ``width``, ``height``; categories get ids 1..K. With ``masks_rle`` the
    detections' masks are written as compressed RLE (``counts`` a string, so the file is JSON) and give the area.
    """
    if len(images) != len(detections):
        raise ValueError(f"{len(images)} images but {len(detections)} detection lists")
    annotations: list[dict[str, Any]] = []
    for image, det in zip(images, detections):
        boxes = torch.as_tensor(det["boxes"], dtype=torch.float64).cpu().reshape(-1, 4).tolist()
        scores = torch.as_tensor(det["scores"], dtype=torch.float64).cpu().tolist()
        labels = torch.as_tensor(det["labels"], dtype=torch.int64).cpu().tolist()
        masks = binary_masks(det["masks"]).numpy() if masks_rle and det.get("masks") is not None else None
        rles = json_rles(masks) if masks is not None else []
        for k, (box, score, label) in enumerate(zip(boxes, scores, labels)):
            w, h = box[2] - box[0], box[3] - box[1]
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image["id"],
                "category_id": label,
                "bbox": [round(box[0], 2), round(box[1], 2), round(w, 2), round(h, 2)],
                "score": score,
                "area": round(w * h, 2),
                "iscrowd": 0,
            }
            if masks is not None and rles:  # rles is empty without masks
                annotation["area"] = float(masks[k].sum())
                annotation["segmentation"] = rles[k]
            annotations.append(annotation)
    return {
        "images": [{key: image[key] for key in ("id", "file_name", "width", "height")} for image in images],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(class_names)],
        "annotations": annotations,
    }
