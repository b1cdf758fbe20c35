"""A segmentation checkpoint as an :class:`~deepscope.export.exportable.Exportable`: the U-Net's raw outputs (the
target's activation and post-processing, with its tuned thresholds, travel in the metadata), checked on a tile of a
real image of the run's data."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from deepscope.config import from_dict
from deepscope.data.io.views import NORMALIZE_EPS, input_view, percentile_normalize
from deepscope.data.segmentation.dataset import find_items
from deepscope.errors import DataError
from deepscope.export.exportable import EXAMPLE_SPLITS, UNET_CITATIONS, Exportable, ZooParts, example_block, run_metrics
from deepscope.inference.blockio import open_input
from deepscope.inference.loading import load_trained_model
from deepscope.tasks.segment.config import VECTOR_TARGETS, SegmentConfig
from deepscope.tasks.segment.predict import _build_from_checkpoint


def sample_image(cfg: SegmentConfig, checkpoint: str | Path) -> tuple[Path, str | None]:
    """The first image of the run's data (test split first), with its key in a container."""
    try:
        found = find_items(cfg.data, cfg.raw_key, cfg.label_key, cfg.labels)
    except DataError as exc:
        raise DataError(
            f"{checkpoint}: no image of its training data to check the export on ({exc}); give --sample IMAGE"
        ) from None
    for split in EXAMPLE_SPLITS:
        if found.get(split):
            _, path, key, _, _ = found[split][0]
            return path, key
    raise DataError(f"{checkpoint}: its training data {cfg.data} holds no image; give --sample IMAGE")


CITATIONS = {
    "stardist": {"text": "Schmidt et al. 2018, StarDist", "doi": "10.1007/978-3-030-00934-2_30"},
    "flows": {"text": "Stringer et al. 2021, Cellpose", "doi": "10.1038/s41592-020-01018-x"},
}


def zoo_parts(cfg: SegmentConfig, info: dict[str, Any], raw: np.ndarray, checkpoint: str | Path) -> ZooParts:
    """The package's view of a segmentation network: percentile scale_range as deepscope normalises, and the
    target's activation where the spec can say it (all channels sigmoid or softmax); stardist and flows keep raw
    outputs, their first channel's sigmoid and post-processing being deepscope's."""
    ndim, low, high = info["ndim"], *cfg.normalize
    letters = "zyx"[3 - ndim :]
    preprocessing: list[dict[str, Any]] = [
        {
            "id": "scale_range",
            "kwargs": {"axes": list(letters), "min_percentile": low, "max_percentile": high, "eps": NORMALIZE_EPS},
        }
    ]
    if cfg.invert == "always":
        preprocessing.append({"id": "scale_linear", "kwargs": {"gain": -1.0, "offset": 1.0}})
    target = cast(str, cfg.target)
    activation: dict[str, Any] = (
        {"id": "softmax", "kwargs": {"axis": "channel"}} if target == "semantic" else {"id": "sigmoid"}
    )
    raw_outputs = target in VECTOR_TARGETS
    finish: Callable[[torch.Tensor], torch.Tensor] = (
        (lambda y: y) if raw_outputs else (lambda y: torch.softmax(y, 1)) if target == "semantic" else torch.sigmoid
    )
    outputs = (
        [re.sub(r"[^A-Za-z0-9_]", "_", str(n)) for n in info["class_names"]]
        if target == "semantic" and info.get("class_names")
        else [f"{target}{i}" for i in range(info["out_channels"])]
    )
    cite = [UNET_CITATIONS[ndim]] + ([CITATIONS[target]] if target in CITATIONS else [])
    post = cfg.post
    documentation = [
        f"Input: {info['channels']} channel(s), {ndim}D, any size that is a multiple of {info['divisor']} (larger "
        f"images tiled with halo {info['halo']}); each image is scaled between its {low} and {high} percentiles "
        "per channel (`scale_range`), as deepscope normalises a whole image"
        + (
            "; deepscope also inverted bright-background images (invert: auto), which the spec cannot express: "
            "invert such images before giving them to this model"
            if cfg.invert == "auto"
            else ""
        )
        + ".",
        f"Output: {info['out_channels']} channel(s) for the {target} target"
        + (
            ": raw network outputs; deepscope applies a sigmoid to the first channel and builds instances with "
            f"its {target} post-processing (threshold {post.threshold}, min size {post.min_size}; the full settings "
            "are in config.deepscope.config.post)"
            if raw_outputs
            else f" after a {activation['id']}"
            + (
                ""
                if target == "semantic"
                else f"; deepscope builds instances from them by watershed (threshold {post.threshold}, "
                f"min size {post.min_size}; settings in config.deepscope.config.post)"
            )
        )
        + ".",
    ]
    return ZooParts(
        raw=raw,
        preprocessing=preprocessing,
        postprocessing=[] if raw_outputs else [activation],
        finish=finish,
        halo=info["halo"],
        channel_names=[f"channel{i}" for i in range(info["channels"])],
        output_names=outputs,
        architecture=(
            "UNet",
            {"in_channels": info["channels"], "out_channels": info["out_channels"], "dim": ndim, **cfg.model_args},
        ),
        cite=cite,
        tags=["deepscope", "unet", "segmentation", f"{ndim}d", target, "pytorch"],
        description=f"deepscope {ndim}D U-Net for {target} segmentation, trained on {Path(cfg.data).name}",
        documentation=documentation,
        metrics=run_metrics(checkpoint),
    )


def exportable(checkpoint: str | Path, sample: str | None = None, key: str | None = None) -> Exportable:
    model, state = load_trained_model(checkpoint, "segment", torch.device("cpu"), _build_from_checkpoint)
    cfg = from_dict(SegmentConfig, state["config"], f"{checkpoint}: config")
    info = state["task_state"]
    source, key = (Path(sample), key) if sample else sample_image(cfg, checkpoint)
    view = input_view(open_input(source, key), info["ndim"], info["channels"], str(source), None)
    divisor = tuple(info["divisor"])
    raw = example_block(view, info["tile"], divisor).numpy()
    low, high = cfg.normalize
    prepared = percentile_normalize(raw[0], low, high, NORMALIZE_EPS, channel_axis=0)
    if cfg.invert == "always":
        prepared = 1 - prepared
    notes = [
        f"outputs: the U-Net's {info['out_channels']} raw channel(s) for target {cfg.target}; deepscope applies "
        + (
            "a softmax over them"
            if cfg.target == "semantic"
            else "a sigmoid to the first"
            if cfg.target in VECTOR_TARGETS
            else "a sigmoid to each"
        )
        + " and its post-processing (settings in the metadata's config.post)",
        f"inputs: each image scaled between its {cfg.normalize} percentiles per channel; sides multiples of "
        f"{list(divisor)}",
        f"example: {source}",
    ]
    example = torch.from_numpy(np.ascontiguousarray(prepared, np.float32))[None]
    zoo = zoo_parts(cfg, info, raw, checkpoint)
    return Exportable("segment", model, example, divisor, state, str(checkpoint), notes, zoo)
