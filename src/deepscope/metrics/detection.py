"""COCO mean average precision of detected boxes (and instance masks), equal to pycocotools' COCOeval.

The matching and accumulation are COCOeval's, run through torchmetrics' ``MeanAveragePrecision`` (which also gathers
the detections of every data-parallel process). Only the last step, averaging COCOeval's precision and recall arrays
into single numbers, is done here, exactly as ``COCOeval.summarize`` does (mean over the entries that are not -1):
``summarize`` pins the overall AP to 100 detections per image (it reports -1 for any other limit, and so would
torchmetrics' ``map``), and one COCOeval run then gives the COCO thresholds, the VOC-style thresholds and the
precision-recall curves together.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from deepscope.errors import DeepscopeError

# COCOeval's own float64 grids. torchmetrics' defaults are float32 copies (0.55 becomes 0.550000011...), which moves
# matches that sit exactly on a threshold and recall levels such as 0.29 = 29/100: its mAP then differs from
# pycocotools' in the third decimal.
COCO_IOUS: tuple[float, ...] = tuple(
    np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True).tolist()
)
RECALL_LEVELS: tuple[float, ...] = tuple(np.linspace(0.0, 1.0, int(np.round(1.0 / 0.01)) + 1, endpoint=True).tolist())
AREAS = ("all", "small", "medium", "large")  # COCOeval's area ranges, in the order of its arrays
STANDARD_MAX_DETECTIONS = 100


def binary_masks(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 masks from a model's (N, 1, H, W) probabilities (cut at 0.5) or from (N, H, W) bool masks."""
    masks = torch.as_tensor(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    if masks.is_floating_point():
        masks = masks >= 0.5
    return masks.to(torch.uint8).cpu()


def _mean_valid(values: np.ndarray) -> float | None:
    """COCOeval.summarize's average: -1 marks "no truth here" (a class or size range without objects); None if all are."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


class DetectionScorer:
    """COCO mAP/mAR, per-class AP and VOC-style AP of detections, accumulated image by image.

    ``compute`` returns plain Python numbers (JSON-safe). A number that COCO leaves undefined (-1 in pycocotools: no
    truth objects at all, none of a size class, or a class that never occurs in the truth) is ``None``.

    - ``map`` (AP at IoU 0.50:0.95), ``map_50``, ``map_75``, ``map_small``/``_medium``/``_large``, ``per_class``
      ({class name: AP}) and ``voc_ap_*`` are computed with at most ``max_detections`` detections per image and class
      (the highest scoring; COCOeval's cap), so images with hundreds of nuclei are not capped at COCO's 100;
      ``max_detections`` says which limit was used. ``mar_1``, ``mar_10`` and ``mar_{max_detections}`` are the
      mean recalls at 1, 10 and ``max_detections`` detections.
    - When ``max_detections`` > 100, the COCO-standard numbers at 100 detections are given too: ``map_maxdets100``,
      ``map_50_maxdets100``, ``map_75_maxdets100``, ``map_small_maxdets100`` (and medium, large) and ``mar_100``.
    - ``voc_ap_40``, ``voc_ap_50``, ``voc_ap_75`` (one per ``voc_ious``): AP at a single IoU threshold, defined as
      COCO does it (precision interpolated at 101 recall levels, averaged over classes with truth), so
      ``voc_ap_50`` equals ``map_50``. It is not VOC2007's 11-point AP nor VOC2010's all-point AP.
    - With ``masks=True``, ``mask_map``, ``mask_map_50`` and ``mask_map_75`` score the instance masks (IoU of masks).
      The truth objects' size class then comes from their mask area (COCO's ``area``) for boxes and masks alike.
    - ``compute(curves=True)`` adds ``pr``: per class with truth, COCO's interpolated precision at the 101 recall
      levels at IoU 0.5 and the detection score at which each level is reached; and ``best_f1``: per class, the score
      threshold maximising F1 on that curve (see :func:`best_f1_threshold`).

    The truth may mark objects ``iscrowd`` (COCO crowds, VOC "difficult"): detections on them count neither as hits
    nor as false positives. ``area`` in a target overrides the box (or mask) area used for the size classes.

    ``backend`` is COCOeval's implementation: ``faster_coco_eval`` (C++, same numbers as pycocotools, tested) scores
    50 images with 500 detections in seconds where pycocotools' Python loops take minutes. ``device`` holds the
    accumulated boxes: under DDP with NCCL it must be the GPU, as NCCL gathers only GPU tensors.
    """

    def __init__(
        self,
        class_names: list[str],
        max_detections: int = 100,
        masks: bool = False,
        voc_ious: tuple[float, ...] = (0.4, 0.5, 0.75),
        backend: Literal["pycocotools", "faster_coco_eval"] = "faster_coco_eval",
        device: torch.device | str = "cpu",
    ) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        if max_detections <= 10:
            raise DeepscopeError(
                f"max_detections must be above 10 (COCO also reports recall at 1 and 10), got {max_detections}"
            )
        self.class_names = list(class_names)
        self.max_detections = max_detections
        self.masks = masks
        self.device = torch.device(device)
        self.voc_ious = tuple(voc_ious)
        self.ious = sorted([*COCO_IOUS, *(t for t in self.voc_ious if not np.isclose(COCO_IOUS, t).any())])

        def metric(iou_type: Any, max_dets: int, ious: list[float]) -> MeanAveragePrecision:
            return MeanAveragePrecision(
                iou_type=iou_type,
                iou_thresholds=ious,
                rec_thresholds=list(RECALL_LEVELS),
                max_detection_thresholds=[1, 10, max_dets],
                extended_summary=True,
                backend=backend,
            )

        # bbox and segm in one metric: segm alone drops the images without truth masks, and the false positives on them.
        self._main = metric(("bbox", "segm") if masks else "bbox", max_detections, self.ious)
        self._standard = None
        if max_detections > STANDARD_MAX_DETECTIONS:
            self._standard = metric("bbox", STANDARD_MAX_DETECTIONS, list(COCO_IOUS))
            self._standard.warn_on_many_detections = False  # capping at 100 is the point of this one

    def reset(self) -> None:
        self._main.reset()
        if self._standard is not None:
            self._standard.reset()

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        """Add images: model-convention predictions and targets (tensors or numpy arrays), one dict per image."""
        preds = [self._prepare(p, is_truth=False) for p in preds]
        targets = [self._prepare(t, is_truth=True) for t in targets]
        self._main.update(preds, targets)
        if self._standard is not None:
            self._standard.update(preds, targets)

    def _prepare(self, item: dict, is_truth: bool) -> dict[str, torch.Tensor]:
        """The tensors torchmetrics expects; truth areas from the masks, as COCO's ``area``, when masks are scored.

        Boxes, scores and areas stay float64 (torchmetrics hands them to COCOeval as they are), so numbers read from a
        COCO file reach COCOeval unrounded, as they would from pycocotools' own loader.
        """
        labels = torch.as_tensor(item["labels"], dtype=torch.int64, device=self.device)
        if len(labels) and (labels.min() < 1 or labels.max() > len(self.class_names)):
            raise ValueError(f"labels must be in 1..{len(self.class_names)}, got {labels.min()}..{labels.max()}")
        out = {
            "boxes": torch.as_tensor(item["boxes"], dtype=torch.float64, device=self.device).reshape(-1, 4),
            "labels": labels,
        }
        if self.masks:
            if item.get("masks") is None:
                raise ValueError("masks=True needs masks in every prediction and target")
            out["masks"] = binary_masks(item["masks"])  # stored as RLE (CPU) by torchmetrics
        if not is_truth:
            out["scores"] = torch.as_tensor(item["scores"], dtype=torch.float64, device=self.device)
            return out
        out["iscrowd"] = torch.as_tensor(
            item.get("iscrowd", torch.zeros(len(labels))), dtype=torch.int64, device=self.device
        )
        if item.get("area") is not None:
            out["area"] = torch.as_tensor(item["area"], dtype=torch.float64, device=self.device)
        elif self.masks:
            out["area"] = out["masks"].flatten(1).sum(1).to(self.device, torch.float64)
        return out

    def compute(self, curves: bool = False) -> dict[str, Any]:
        values = self._main.compute()  # on every process alike: torchmetrics gathers the detections of all of them
        main = self._summary(values, "bbox_" if self.masks else "", self.ious)
        result: dict[str, Any] = {
            **self._coco_numbers(main, self.max_detections),
            "max_detections": self.max_detections,
        }
        coco = main["coco"]
        result["per_class"] = {
            name: _mean_valid(main["precision"][coco, :, k, 0, -1]) if k is not None else None
            for name, k in zip(self.class_names, main["class_index"])
        }
        for t in self.voc_ious:
            result[f"voc_ap_{round(t * 100)}"] = _mean_valid(main["precision"][main["iou"][round(t, 2)], :, :, 0, -1])
        if self._standard is not None:
            standard = self._summary(self._standard.compute(), "", list(COCO_IOUS))
            numbers = self._coco_numbers(standard, STANDARD_MAX_DETECTIONS)
            result.update({f"{k}_maxdets100": v for k, v in numbers.items() if k.startswith("map")})
            result["mar_100"] = numbers["mar_100"]
        if self.masks:
            numbers = self._coco_numbers(self._summary(values, "segm_", self.ious), self.max_detections)
            result.update({f"mask_{k}": numbers[k] for k in ("map", "map_50", "map_75")})
        if curves:
            result["pr"] = self._pr_curves(main)
            result["best_f1"] = {
                name: dict(zip(("threshold", "f1", "precision", "recall"), best_f1_threshold(curve)))
                for name, curve in result["pr"].items()
            }
        return result

    def _summary(self, values: dict[str, Any], prefix: str, ious: list[float]) -> dict[str, Any]:
        """COCOeval's arrays as numpy: precision (T, R, K, A, M), recall (T, K, A, M), scores (T, R, K, A, M).

        T runs over ``ious`` (``iou`` maps a threshold rounded to 0.01 to its index, ``coco`` lists COCO's ten), K over
        the classes that occur in the data (``class_index`` gives each class name's K index, or None). Without any
        image torchmetrics gives no arrays (and -1 for all); empty ones make every average None.
        """
        shape = (len(ious), len(RECALL_LEVELS), 0, len(AREAS), 3)
        empty = {"precision": np.zeros(shape), "recall": np.zeros(shape[:1] + shape[2:]), "scores": np.zeros(shape)}
        arrays = {key: values[prefix + key].numpy() for key in empty} if prefix + "precision" in values else empty
        present = {int(c): k for k, c in enumerate(values["classes"].reshape(-1).tolist())}
        iou = {round(t, 2): i for i, t in enumerate(ious)}
        return {
            **arrays,
            "class_index": [present.get(c) for c in range(1, len(self.class_names) + 1)],
            "iou": iou,
            "coco": [iou[round(t, 2)] for t in COCO_IOUS],
        }

    @staticmethod
    def _coco_numbers(summary: dict[str, Any], max_dets: int) -> dict[str, float | None]:
        """The twelve numbers of COCOeval.stats, with the APs at the last (largest) detection limit."""
        precision, recall, coco, iou = summary["precision"], summary["recall"], summary["coco"], summary["iou"]
        numbers = {
            "map": _mean_valid(precision[coco, :, :, 0, -1]),
            "map_50": _mean_valid(precision[iou[0.5], :, :, 0, -1]),
            "map_75": _mean_valid(precision[iou[0.75], :, :, 0, -1]),
        }
        for a, area in enumerate(AREAS[1:], start=1):
            numbers[f"map_{area}"] = _mean_valid(precision[coco, :, :, a, -1])
        for m, limit in enumerate((1, 10, max_dets)):
            numbers[f"mar_{limit}"] = _mean_valid(recall[coco, :, 0, m])
        for a, area in enumerate(AREAS[1:], start=1):
            numbers[f"mar_{area}"] = _mean_valid(recall[coco, :, a, -1])
        return numbers

    def _pr_curves(self, summary: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
        """Per class with truth: COCO's interpolated precision and the reaching score at each recall level, IoU 0.5."""
        t, curves = summary["iou"][0.5], {}
        for name, k in zip(self.class_names, summary["class_index"]):
            if k is None or summary["precision"][t, 0, k, 0, -1] <= -1:
                continue
            curves[name] = {
                "recall": list(RECALL_LEVELS),
                "precision": summary["precision"][t, :, k, 0, -1].tolist(),
                "scores": summary["scores"][t, :, k, 0, -1].tolist(),
            }
        return curves


def best_f1_threshold(curve: dict[str, list[float]]) -> tuple[float, float, float, float]:
    """(score threshold, F1, precision, recall) where F1 is highest on one class's curve from ``compute(curves=True)``.

    Read off COCOeval's curve rather than re-matching the detections: recall moves in COCO's steps of 0.01 and the
    precision is COCO's interpolated one (the best precision at that recall or more), so keeping the detections
    scoring at least the threshold gives this recall or slightly more and this precision or, within one step of
    recall, slightly less. The highest recall wins ties. (0, 0, 0, 0) when nothing is found.
    """
    precision, recall = np.asarray(curve["precision"]), np.asarray(curve["recall"])
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    if f1[best] <= 0:
        return 0.0, 0.0, 0.0, 0.0
    return float(curve["scores"][best]), float(f1[best]), float(precision[best]), float(recall[best])
