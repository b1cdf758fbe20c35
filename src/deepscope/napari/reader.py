"""napari reader for what deepscope writes: probabilities and instance or class labels (HDF5/zarr datasets, or the
``_probabilities``/``_instances``/``_classes`` TIFFs of a folder), COCO JSON and Pascal VOC XML boxes as Shapes, and a
run folder (its training curves).

napari gets None for anything else, so its own readers take other files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deepscope.errors import DeepscopeError

LayerData = tuple[Any, dict[str, Any], str]  # napari's (data, layer settings, layer type), as readers return them
LABEL_NAMES = ("instances", "classes")
CONTAINERS = (".h5", ".hdf5", ".zarr")


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader contribution: a function reading ``path``, or None when it is not a deepscope result."""
    if isinstance(path, list):
        return None if not path or any(read_one(Path(p), probe=True) is None for p in path) else read_all
    return read_all if read_one(Path(path), probe=True) is not None else None


def read_all(path: str | list[str]) -> list[LayerData]:
    layers: list[LayerData] = []
    for one in path if isinstance(path, list) else [path]:
        layers += read_one(Path(one)) or []
    return layers


def read_one(path: Path, probe: bool = False) -> list[LayerData] | None:
    """The layers of one deepscope result; with ``probe``, only whether it is one (an empty list: yes)."""
    if path.is_dir() and path.suffix.lower() != ".zarr":
        return run_layers(path, probe)
    suffix = path.suffix.lower()
    if suffix in CONTAINERS:
        return container_layers(path, probe)
    if suffix in (".tif", ".tiff"):
        return tiff_layers(path, probe)
    if suffix == ".json":
        return box_layers(path, probe)
    if suffix == ".xml":
        return voc_layers(path, probe)
    return None


def container_layers(path: Path, probe: bool) -> list[LayerData] | None:
    from deepscope.data.io.volumes import open_volume

    names = ("probabilities", "denoised", *LABEL_NAMES)
    found = []
    for name in names:
        try:
            array = open_volume(path, name)
        except DeepscopeError:
            continue
        found.append((name, array))
    if not found:
        return None
    if probe:
        return []
    return [image_or_labels(np.asarray(array[...]), name, path) for name, array in found]


def image_or_labels(array: np.ndarray, name: str, path: Path) -> LayerData:
    if name in LABEL_NAMES:
        return array.astype(np.int32), {"name": f"{path.stem} {name}"}, "labels"
    channel_axis = 0 if array.ndim >= 3 and array.shape[0] <= 8 else None
    return array, {"name": f"{path.stem} {name}", "channel_axis": channel_axis}, "image"


def tiff_layers(path: Path, probe: bool) -> list[LayerData] | None:
    import tifffile

    kind = next((name for name in ("probabilities", *LABEL_NAMES) if path.stem.endswith(f"_{name}")), None)
    if kind is None:
        return None
    return [] if probe else [image_or_labels(tifffile.imread(path), kind, path)]


def box_layers(path: Path, probe: bool) -> list[LayerData] | None:
    """The boxes of a COCO JSON file (``deepscope predict`` of a detector writes one) as a Shapes layer per image:
    rectangles with the class name and score as properties and text."""
    from deepscope.metrics.coco_files import load_coco_predictions

    try:
        found = load_coco_predictions(path)
    except (DeepscopeError, OSError):
        return None
    if probe:
        return []
    per_image: dict[Any, list[dict[str, Any]]] = {}
    for detection in found.detections:
        per_image.setdefault(detection["image_id"], []).append(detection)
    layers: list[LayerData] = []
    for image_id, detections in per_image.items():
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in detections)]
        labels = [(found.category_names or {}).get(d["category_id"], str(d["category_id"])) for d in detections]
        name = (found.file_names or {}).get(image_id, f"image {image_id}")
        layers.append(shapes_layer(f"{name} boxes", boxes, labels, [float(d["score"]) for d in detections]))
    return layers


def voc_layers(path: Path, probe: bool) -> list[LayerData] | None:
    """The boxes of a Pascal VOC XML file (``deepscope predict --format voc`` writes one per image, with scores; an
    annotation's objects have none and show as 1) as a Shapes layer."""
    from deepscope.data.detection.annotations import read_voc_file

    try:
        image, objects = read_voc_file(path)
    except DeepscopeError:
        return None
    if probe:
        return []
    scores = [1.0 if o.score is None else o.score for o in objects]
    return [shapes_layer(f"{image} boxes", [o.box for o in objects], [o.name for o in objects], scores)]


def shapes_layer(name: str, boxes: list[list[float]], labels: list[str], scores: list[float]) -> LayerData:
    """Boxes (x1 y1 x2 y2 in pixels) of one image as a napari Shapes layer ``name`` of rectangles with the class name
    and score as properties and text."""
    settings = {
        "name": name,
        "shape_type": "rectangle",
        "properties": {"label": labels, "score": scores},
        "edge_color": "yellow",
        "face_color": "transparent",
        "text": {"string": "{label} {score:.2f}", "size": 8},
    }
    return [np.array([[y1, x1], [y2, x2]]) for x1, y1, x2, y2 in boxes], settings, "shapes"


def run_layers(path: Path, probe: bool) -> list[LayerData] | None:
    """A run folder (metrics.json and config.yaml): its pictures (curves and the task's own) as image layers."""
    if not ((path / "metrics.json").is_file() and (path / "config.yaml").is_file()):
        return None
    if probe:
        return []
    from deepscope.data.io.images import read_image

    return [(read_image(p), {"name": f"{path.name} {p.stem}", "rgb": True}, "image") for p in run_pictures(path)]


def run_pictures(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*.png"))


def run_summary(path: Path) -> str:
    """The run's task, model and scalar metrics, a line each."""
    metrics = json.loads((path / "metrics.json").read_text())
    lines = [
        f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
        for k, v in metrics.items()
        if isinstance(v, (str, int, float)) and not isinstance(v, bool)
    ]
    return "\n".join(lines)
