"""Applying a segmentation model: whole images tile by tile, scores against the truth, checkpoints, files on disk."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepscope.atomic import write_tiff
from deepscope.config import from_dict
from deepscope.data.io.views import input_view
from deepscope.data.segmentation.dataset import SegItem, find_items, load_items
from deepscope.data.segmentation.targets import batch_class_map
from deepscope.errors import CheckpointError, DataError, DeepscopeError
from deepscope.inference.blockio import Output, open_input, output_paths
from deepscope.inference.fastest import runtime_of
from deepscope.inference.geometry import tile_and_halo
from deepscope.inference.loading import fastest, load_trained_model
from deepscope.inference.tiling import predict_tiled
from deepscope.metrics.instance import image_scores, summarize
from deepscope.metrics.semantic import confusion, confusion_scores
from deepscope.models import build_unet
from deepscope.postprocess.flows import flow_instances
from deepscope.postprocess.star import star_instances
from deepscope.postprocess.tiled import tiled_instances
from deepscope.postprocess.watershed import watershed_from_seeds
from deepscope.tasks.segment.config import VECTOR_TARGETS, InferenceConfig, PostConfig, SegmentConfig

# ---- prediction and scoring of whole images ---------------------------------------------------------------------


class ProbabilityFirst(nn.Module):
    """Sigmoid on channel 0 (object or cell probability), the rest as predicted (star distances, flows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.sigmoid(x[:, :1]), x[:, 1:]], dim=1)


@dataclass
class Predictor:
    """Everything needed to turn an image into probabilities, instances or classes, as saved in a checkpoint."""

    model: nn.Module
    target: str
    channels: int
    out_channels: int
    tile: tuple[int, ...]
    halo: tuple[int, ...]
    divisor: tuple[int, ...]
    inference: InferenceConfig
    post: PostConfig
    device: torch.device
    batch_size: int = 4
    dist_scale: float = 1.0  # stardist: predicted distances are in units of this many pixels

    def probabilities(self, image: Any, out: Any = None, progress: Callable[[int, int], None] | None = None) -> Any:
        """(out_channels, *spatial) float32 probabilities of a (C, *spatial) image or view, written into ``out``;
        ``progress`` as in :func:`predict_tiled`."""
        activation = (
            nn.Softmax(dim=1)
            if self.target == "semantic"
            else ProbabilityFirst()
            if self.target in VECTOR_TARGETS
            else nn.Sigmoid()
        )
        return predict_tiled(
            nn.Sequential(self.model, activation),
            image,
            self.tile,
            self.halo,
            self.out_channels,
            out=out,
            blend=self.inference.blend,
            batch_size=self.batch_size,
            device=self.device,
            flip_tta=self.inference.flip_tta,
            model_divisor=self.divisor,
            progress=progress,
        )

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """Instances (int32, 1..n) for instance targets, the class index map for semantic models."""
        probs = np.asarray(probs)
        if self.target == "semantic":
            return probs.argmax(0).astype(np.int32)
        return self.instances(probs)

    def instances(self, probs: np.ndarray, post: PostConfig | None = None) -> np.ndarray:
        """Instances of one image's (or window's) network output by the target's own method; ``post`` replaces the
        predictor's settings (threshold tuning tries several). Computed in float32 also where the caller predicts
        under autocast (the trainer's validation in bf16): flows' sparse heat diffusion has no bf16 kernel, and
        distances and flows are compared at sub-pixel precision."""
        with torch.autocast(self.device.type, enabled=False):
            return self._instances(probs, post or self.post)

    def _instances(self, probs: np.ndarray, post: PostConfig) -> np.ndarray:
        if self.target == "stardist":
            return star_instances(
                probs[0],
                probs[1:] * self.dist_scale,
                post.threshold,
                post.nms_threshold,
                post.min_size,
                device=self.device,
            )
        if self.target == "flows":
            return flow_instances(
                probs[0],
                probs[1:],
                post.threshold,
                post.flow_steps,
                post.min_size,
                post.flow_threshold,
                device=self.device,
            )
        if self.target == "boundaries":
            foreground, boundary = np.ones_like(probs[0]), probs[0]
        else:
            foreground, boundary = probs[0], probs[1] if self.target == "foreground_boundaries" else None
        seeds = "maxima" if self.target == "distance" else post.seeds
        return watershed_from_seeds(foreground, boundary, post.threshold, seeds, post.min_distance, post.min_size)


def score_image(
    predictor: Predictor, item: SegItem, class_values: list[int] | None, ignore_label: int | None
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(record, probabilities, predicted labels) of one image; the record holds instance scores and a pixel confusion."""
    probs = predictor.probabilities(item.channels_first(predictor.channels))
    record, pred = score_output(predictor, item, probs, class_values, ignore_label)
    return record, probs, pred


def score_output(
    predictor: Predictor,
    item: SegItem,
    probs: np.ndarray,
    class_values: list[int] | None,
    ignore_label: int | None,
    post: PostConfig | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """(record, predicted labels) of one image's network output ``probs``, post-processed with ``post`` (default:
    the predictor's settings), as :func:`score_image` scores it."""
    truth = np.asarray(item.labels[...])
    if predictor.target == "semantic":
        pred = predictor.labels(probs)
        classes = batch_class_map(torch.from_numpy(truth.astype(np.int64))[None], class_values, ignore_label)[0].numpy()
        return {"name": item.name, "confusion": confusion(classes, pred, predictor.out_channels).tolist()}, pred
    pred = predictor.instances(np.asarray(probs), post)
    record = image_scores(item.name, truth, pred)
    record["confusion"] = confusion(truth > 0, pred > 0, 2).tolist()
    return record, pred


def summarize_records(
    records: Sequence[dict[str, Any]], target: str, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Data-set metrics: summed pixel confusion (IoU, Dice) and, for instance targets, the instance report."""
    matrix = np.sum([np.array(r["confusion"]) for r in records], axis=0)
    if target == "semantic":
        pixel = confusion_scores(matrix, class_names)
        return {**pixel, "confusion": matrix.tolist(), "images": len(records)}
    fg = confusion_scores(matrix)["per_class"]["1"]
    instances = summarize([{k: v for k, v in r.items() if k != "confusion"} for r in records])
    at = instances["thresholds"]
    flat = {
        "score_0.5": at["0.5"]["score"],
        "f1_0.5": at["0.5"]["f1"],
        "precision_0.5": at["0.5"]["precision"],
        "recall_0.5": at["0.5"]["recall"],
        "score_0.75": at["0.75"]["score"],
    }
    return {
        "mean_score": instances["mean_score"],
        **flat,
        "kaggle_score": instances["kaggle_score"],
        "pq": instances["pq"],
        "sq": instances["sq"],
        "rq": instances["rq"],
        "voi_split": instances["voi_split"],
        "voi_merge": instances["voi_merge"],
        "arand": instances["arand"],
        "iou": fg["iou"],
        "dice": fg["dice"],
        "images": len(records),
        "thresholds": instances["thresholds"],
        "per_image": instances["per_image"],
    }


# ---- from a checkpoint -------------------------------------------------------------------------------------------


def _build_from_checkpoint(config: dict[str, Any], info: dict[str, Any]) -> nn.Module:
    return build_unet(info["channels"], info["out_channels"], info["ndim"], **config.get("model_args", {}))


def load_predictor(
    path: str | Path,
    device: torch.device,
    tile: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    batch_size: int | None = None,
    **overrides: Any,
) -> tuple[Predictor, SegmentConfig]:
    """A Predictor from a segmentation checkpoint; ``overrides`` replace inference settings (blend, flip_tta)."""
    model, state = load_trained_model(path, "segment", device, _build_from_checkpoint)
    cfg = from_dict(SegmentConfig, state["config"], f"{path}: config")
    if cfg.target is None:  # every checkpoint names its target: the plan sets it before the first is written
        raise CheckpointError(f"{path}: its settings name no target")
    info = state["task_state"]
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.inference, key, value)
    if cfg.inference.flip_tta and cfg.target in VECTOR_TARGETS:
        raise DeepscopeError(
            f"--tta does not apply to {cfg.target} models: flipping would also have to turn their vectors"
        )
    tile_t, halo_t = tile_and_halo(tile, halo, info["tile"], info["halo"], info["divisor"])
    predictor = Predictor(
        fastest(model, path, tuple(info["divisor"])),
        cfg.target,
        info["channels"],
        info["out_channels"],
        tile_t,
        halo_t,
        tuple(info["divisor"]),
        cfg.inference,
        cfg.post,
        device,
        batch_size or cfg.eval_batch_size,
        cfg.dist_scale or 1.0,
    )
    return predictor, cfg


def evaluate_checkpoint(
    path: str | Path,
    data_path: str | Path,
    split: str,
    device: torch.device,
    save_dir: str | Path | None = None,
    labels: str | None = None,
) -> dict[str, Any]:
    """Scores of a segmentation checkpoint on one split of a data set (all of it when it has no split folders);
    ``save_dir`` receives the predicted labels; ``labels`` names the label folder (default: the one trained on)."""
    predictor, cfg = load_predictor(path, device)
    found = find_items(data_path, cfg.raw_key, cfg.label_key, cfg.labels if labels is None else labels)
    entries = found.get(split, found.get("all"))
    if entries is None:
        raise DataError(f"{data_path}: has no {split} split (found {', '.join(sorted(found))})")
    low, high = cfg.normalize  # SegmentConfig checks that it holds two percentiles
    items = load_items(entries, None, low, high, require_objects=cfg.target != "semantic", invert=cfg.invert or "never")
    for item in items:
        if item.labels.ndim != len(predictor.tile):
            raise DataError(f"{item.name}: labels are {item.labels.ndim}D but the model is {len(predictor.tile)}D")
    records = []
    out_dir = Path(save_dir) if save_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for item in items:
            record, _, pred = score_image(predictor, item, cfg.class_values, cfg.ignore_label)
            records.append(record)
            if out_dir:
                write_tiff(out_dir / f"{item.name}.tif", pred, "prediction", compression="zlib")
    class_names = [str(v) for v in cfg.class_values] if cfg.class_values else None
    return {
        "checkpoint": str(path),
        "data": str(data_path),
        "split": split,
        **summarize_records(records, cfg.target_name, class_names),
    }


def predict_files(
    path: str | Path,
    inputs: Sequence[Path],
    out: str | Path,
    device: torch.device,
    key: str | None = None,
    instances: bool = False,
    tile: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    blend: str | None = None,
    flip_tta: bool | None = None,
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Probabilities of every input written block by block (and instances or classes when asked), one record per input.

    Instances of images larger than ``inference.instance_block`` per axis are found block by block with the
    prediction halo as context (``postprocess.tiled``), so objects smaller than the halo are never cut.
    """
    predictor, cfg = load_predictor(path, device, tile, halo, batch_size, blend=blend, flip_tta=flip_tta)
    if instances and cfg.target == "semantic":
        raise DeepscopeError("--instances: this model predicts classes, not instances; use the class map it writes")
    labels_name = "classes" if cfg.target == "semantic" else "instances"
    records = []
    for source in inputs:
        image = open_input(source, key)
        view = input_view(
            image, len(predictor.tile), predictor.channels, str(source), cfg.normalize, invert=cfg.invert or "never"
        )
        (prob_path, prob_key), (label_path, label_key) = output_paths(
            out, Path(source).stem, len(inputs) == 1, labels_name
        )
        with Output(
            prob_path, prob_key, (predictor.out_channels, *view.shape[1:]), np.float32, (1, *predictor.tile)
        ) as probs:
            predictor.probabilities(view, out=probs.array)
            record: dict[str, Any] = {
                "input": str(source),
                "probabilities": f"{prob_path}" + (f":{prob_key}" if prob_key else ""),
                "shape": list(view.shape),
                **runtime_of(predictor.model),
            }
            if instances or cfg.target == "semantic":
                with Output(label_path, label_key, view.shape[1:], np.int32, predictor.tile) as labels:
                    if cfg.target == "semantic":
                        labels.array[...] = predictor.labels(np.asarray(probs.array[...]))
                    else:  # block by block with the prediction halo as context, so memory follows the block
                        tiled_instances(
                            predictor.instances,
                            probs.array,
                            cfg.inference.instance_block,
                            predictor.halo,
                            out=labels.array,
                        )
                    record[labels_name] = f"{label_path}" + (f":{label_key}" if label_key else "")
                    if instances:
                        record["objects"] = len(np.unique(np.asarray(labels.array[...]))) - 1
        records.append(record)
    return records
