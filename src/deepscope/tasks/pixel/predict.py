"""Applying a pixel classifier to new images tile by tile: probabilities, class maps and (optionally) instances."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from deepscope.errors import DeepscopeError
from deepscope.inference.blockio import Output, open_input, output_paths
from deepscope.postprocess.watershed import watershed_from_seeds
from deepscope.tasks.pixel.classifier import PixelClassifier, class_map
from deepscope.tasks.pixel.features import feature_tiles


@dataclass
class InstanceSettings:
    """From class probabilities to objects (see ``deepscope.postprocess.watershed.watershed_from_seeds``)."""

    foreground: Sequence[int] | None = None  # classes that make objects; None: all but the first (and the boundary)
    boundary: int | None = None  # class of object boundaries, which separates touching objects
    threshold: float = 0.5
    seeds: str = "components"  # components | maxima (of the distance transform, for touching round objects)
    min_distance: int = 3  # between maxima seeds
    min_size: int = 0


class ClassValues(Protocol):
    """What ``instances_from`` reads of a classifier: the label value of each probability channel."""

    @property
    def classes(self) -> list[int]: ...


def instances_from(classifier: ClassValues, probs: np.ndarray, settings: InstanceSettings) -> np.ndarray:
    """Instances: a seeded watershed on the summed probability of the foreground classes, cut apart along the
    boundary class when there is one."""
    foreground, boundary = settings.foreground, settings.boundary
    classes = classifier.classes
    chosen = [c for c in classes[1:] if c != boundary] if foreground is None else list(foreground)
    for c in [*chosen, *([boundary] if boundary is not None else [])]:
        if c not in classes:
            raise DeepscopeError(f"class {c} is not one the classifier predicts ({', '.join(map(str, classes))})")
    fg = sum(probs[classes.index(c)] for c in chosen)
    if boundary is not None:
        fg = fg + probs[classes.index(boundary)]
    edges = probs[classes.index(boundary)] if boundary is not None else None
    return watershed_from_seeds(fg, edges, settings.threshold, settings.seeds, settings.min_distance, settings.min_size)


def predict_files(
    path: str | Path,
    inputs: Sequence[Path],
    out: str | Path,
    device: torch.device,
    key: str | None = None,
    tile: Sequence[int] | None = None,
    instances: InstanceSettings | None = None,
) -> list[dict[str, Any]]:
    """Probabilities (float32, one channel per class) and class maps of every input, features and forest applied tile
    by tile so only one tile's features are in memory; with ``instances``, also instance labels (computed on the
    whole probability map)."""
    classifier = PixelClassifier.load(path)
    records = []
    for source in inputs:
        view = classifier.view(open_input(source, key), str(source))
        spatial = tuple(view.shape[1:])
        single = len(inputs) == 1
        (prob_path, prob_key), (class_path, class_key) = output_paths(out, Path(source).stem, single, "classes")
        start = time.perf_counter()
        with (
            Output(prob_path, prob_key, (len(classifier.classes), *spatial), np.float32, (1, *spatial)) as probs,
            Output(class_path, class_key, spatial, np.uint8, spatial) as classes,
        ):
            for region, features in feature_tiles(view, classifier.spec, tile, device):
                p = classifier.probabilities(features)
                probs.array[(slice(None),) + region] = p
                classes.array[region] = class_map(classifier, p)
            record = {
                "input": str(source),
                "shape": list(spatial),
                "seconds": round(time.perf_counter() - start, 3),
                "probabilities": f"{prob_path}" + (f":{prob_key}" if prob_key else ""),
                "classes": f"{class_path}" + (f":{class_key}" if class_key else ""),
            }
            if instances is not None:
                labels = instances_from(classifier, np.asarray(probs.array[...]), instances)
                (_, _), (inst_path, inst_key) = output_paths(out, Path(source).stem, single, "instances")
                with Output(inst_path, inst_key, labels.shape, np.int32, spatial) as written:
                    written.array[...] = labels
                record |= {
                    "instances": f"{inst_path}" + (f":{inst_key}" if inst_key else ""),
                    "objects": int(labels.max()),
                }
        records.append(record)
    return records
