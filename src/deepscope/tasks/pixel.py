"""Shallow pixel classification (the ilastik way): filter-bank features, a random forest fitted on the labelled pixels
of sparse labels, probabilities for every pixel predicted tile by tile.

Features of each training image are cached on disk (keyed by the file, its size and modification time, the feature
spec and the normalization), so training again after new labels costs only reading the labelled pixels and fitting
the forest. The fitted pipeline (feature spec, normalization, classes, forest and library versions) is one safetensors
file (``classifier.safetensors``): the forest's node arrays plus a JSON header, checked before use, so a classifier
received with someone's folder cannot run code or crash the process (:mod:`deepscope.models.forest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.ensemble import RandomForestClassifier

import deepscope
from deepscope.atomic import temporary, write_text
from deepscope.blockio import Output, open_input, output_paths
from deepscope.config import save_yaml
from deepscope.data.scribbles import read_sparse_labels
from deepscope.data.seg_dataset import channel_count, input_view
from deepscope.data.segmentation import check_pair, files_by_stem
from deepscope.engine.distributed import pick_device
from deepscope.errors import CheckpointError, DataError, DeepscopeError
from deepscope.features import FeatureSpec, compute_features, feature_tiles
from deepscope.models.forest import forest_state, rebuild_forest
from deepscope.postprocess.watershed import watershed_from_seeds
from deepscope.safefile import is_safetensors, read_state, write_state
from deepscope.tasks.pixel_config import PixelConfig

FORMAT = "deepscope-pixel-classifier"
CLASSIFIER_FILE = "classifier.safetensors"  # in a pixel train run's folder
PREDICT_CHUNK = 1 << 18  # pixels per forest call: bounds the (pixels, features) copy sklearn needs


@dataclass
class PixelClassifier:
    """A fitted feature spec + forest, and what is needed to apply it to new images."""

    spec: FeatureSpec
    forest: RandomForestClassifier
    normalize: list[float] | None
    class_names: list[str]  # one per class in ``classes``
    versions: dict[str, str]

    @property
    def classes(self) -> list[int]:
        """Label values of the forest's outputs, in probability-channel order."""
        return [int(c) for c in self.forest.classes_]

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(K, *spatial) float32 class probabilities from (F, *spatial) features."""
        flat = features.reshape(features.shape[0], -1)
        out = np.empty((len(self.classes), flat.shape[1]), np.float32)
        for start in range(0, flat.shape[1], PREDICT_CHUNK):
            chunk = np.ascontiguousarray(flat[:, start : start + PREDICT_CHUNK].T)
            out[:, start : start + PREDICT_CHUNK] = self.forest.predict_proba(chunk).T
        return out.reshape((-1,) + features.shape[1:])

    def view(self, image: Any, name: str) -> Any:
        """The stored image as the features expect it: (C, *spatial), normalized as in training."""
        return input_view(image, self.spec.ndim, self.spec.channels, name, self.normalize)

    def save(self, path: Path) -> None:
        state = {"spec": self.spec.to_dict(), "feature_names": self.spec.names(), "forest": forest_state(self.forest),
                 "normalize": self.normalize, "class_names": self.class_names, "versions": self.versions}
        write_state(path, state, FORMAT, "classifier")

    @classmethod
    def load(cls, path: str | Path) -> PixelClassifier:
        """Read a saved classifier (nothing in it can run code), check its forest and that it fits its feature spec."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: classifier file not found")
        try:
            if not is_safetensors(path):
                raise ValueError("it is not a safetensors file; a classifier.pkl of deepscope 0.1 is a pickle, "
                                 "which could run code when opened and is refused: train it again with deepscope pixel train")
            state = read_state(path, FORMAT)
            if not isinstance(state, dict):
                raise ValueError("it holds no classifier")
            spec = FeatureSpec.from_dict(state.get("spec"))
            forest = rebuild_forest(state.get("forest"))
        except (ValueError, TypeError, KeyError, DeepscopeError) as exc:
            raise CheckpointError(f"{path}: not a usable pixel classifier: {str(exc).splitlines()[0]}") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if spec.names() != state.get("feature_names") or forest.n_features_in_ != spec.count:
            raise CheckpointError(f"{path}: the feature spec ({spec.count} features) does not match the forest, which "
                                  f"was fitted on {forest.n_features_in_}; train the classifier again")
        normalize, names, saved = state.get("normalize"), state.get("class_names"), state.get("versions")
        if normalize is not None and not (isinstance(normalize, list) and all(isinstance(v, int | float) for v in normalize)):
            raise CheckpointError(f"{path}: its normalisation is not a list of numbers")
        if not (isinstance(names, list) and len(names) == len(forest.classes_) and all(isinstance(n, str) for n in names)):
            raise CheckpointError(f"{path}: its class names do not match its {len(forest.classes_)} classes")
        if not (isinstance(saved, dict) and all(isinstance(v, str) for v in saved.values())):
            raise CheckpointError(f"{path}: its library versions are not readable")
        if saved.get("scikit-learn") != sklearn.__version__:
            warnings.warn(f"{path}: saved with scikit-learn {saved.get('scikit-learn')}, loaded with {sklearn.__version__}", stacklevel=2)
        return cls(spec, forest, normalize, names, saved)


def versions() -> dict[str, str]:
    return {"deepscope": deepscope.__version__, "scikit-learn": sklearn.__version__, "torch": torch.__version__,
            "numpy": np.__version__}


class FeatureCache:
    """Features of whole images as ``.npy`` files, memory-mapped when read back; written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, source: Path, key: str | None, spec: FeatureSpec, normalize: list[float] | None) -> Path:
        stat = source.stat()
        ident = {"file": str(source.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns, "key": key,
                 "spec": spec.to_dict(), "normalize": normalize}
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"{source.stem}-{digest}.npy"

    def features(self, source: Path, key: str | None, view: Any, spec: FeatureSpec, normalize: list[float] | None,
                 tile: Sequence[int] | None, device: torch.device) -> tuple[np.ndarray, bool]:
        """(F, *spatial) features of an image and whether they came from the cache."""
        path = self._path(source, key, spec, normalize)
        if path.is_file():
            try:
                return np.load(path, mmap_mode="r"), True
            except (OSError, ValueError):
                path.unlink(missing_ok=True)  # a damaged cache entry is recomputed
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = temporary(path)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(spec.count, *view.shape[1:]))
        compute_features(view, spec, tile, device, out=out)
        out.flush()
        del out
        os.replace(tmp, path)
        return np.load(path, mmap_mode="r"), False


@dataclass
class LabelledImage:
    name: str
    source: Path
    image: Any  # as stored
    labels: np.ndarray  # sparse, 0 = unlabelled


def _files(path: Path, role: str) -> dict[str, Path]:
    if path.is_dir():
        found = files_by_stem(path)
        if not found:
            raise DataError(f"{path}: folder holds no {role}")
        return found
    if path.exists():
        return {path.stem: path}
    raise DataError(f"{path}: {role} not found")


def labelled_images(config: PixelConfig) -> list[LabelledImage]:
    """Images paired with their sparse labels by file name; every label file needs its image."""
    if not config.images or not config.labels:
        raise DeepscopeError("pixel train needs --images (file or folder) and --labels (file or folder)")
    images, labels = _files(Path(config.images), "images"), _files(Path(config.labels), "label images")
    if len(images) == 1 and len(labels) == 1:  # one file each: paired whatever their names
        labels = {next(iter(images)): next(iter(labels.values()))}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError(f"{config.labels}: no image for the label file(s) {', '.join(orphans[:5])} in {config.images}")
    items = []
    for stem, label_path in sorted(labels.items()):
        image = open_input(images[stem], config.raw_key)
        sparse = read_sparse_labels(label_path, config.label_key)
        check_pair(image, sparse, str(images[stem]), str(label_path), sparse.ndim, require_objects=False)
        items.append(LabelledImage(stem, images[stem], image, sparse))
    ndims = {item.labels.ndim for item in items}
    channels = {channel_count(item.image.shape, item.labels.ndim) for item in items}
    if len(ndims) > 1 or len(channels) > 1:
        raise DataError(f"{config.images}: all images must be 2D or all 3D, with one channel count; got "
                        f"{sorted(ndims)}D and {sorted(channels)} channels")
    return items


def labelled_indices(labels: np.ndarray) -> np.ndarray:
    """Flat indices of the labelled (nonzero) pixels. Sparse uint8 labels are scanned 8 pixels at a time, as 64-bit
    words, and only the nonzero words are looked into: a plain scan of a 4096x4096 label image takes 50 ms, which
    the live classifier of ``deepscope serve`` would pay at every stroke."""
    flat = np.ascontiguousarray(labels).ravel()
    if flat.dtype != np.uint8:
        return np.flatnonzero(flat)
    whole = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    candidates = np.concatenate([(words[:, None] * 8 + np.arange(8)).ravel(), np.arange(whole, flat.size)])
    return candidates[flat[candidates] != 0]


def training_pixels(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    where = labelled_indices(labels)
    x = np.asarray(features.reshape(features.shape[0], -1)[:, where]).T
    return np.ascontiguousarray(x, np.float32), labels.ravel()[where]


def fit_forest(x: np.ndarray, y: np.ndarray, config: PixelConfig) -> RandomForestClassifier:
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(f"only class {classes[0]} is labelled; label pixels of at least two classes")
    forest = RandomForestClassifier(
        config.forest.trees, max_depth=config.forest.max_depth, min_samples_leaf=config.forest.min_samples_leaf,
        class_weight=config.forest.class_weight, n_jobs=config.forest.jobs, random_state=config.seed, oob_score=True)
    with warnings.catch_warnings():  # few samples: some have no out-of-bag trees, which only lowers the estimate's support
        warnings.simplefilter("ignore", UserWarning)
        return forest.fit(x, y)


def train_pixel(config: PixelConfig) -> dict[str, Any]:
    """Fit the forest on the labelled pixels of ``config``'s images; save the classifier, config, predictions and
    report in ``config.out``; return the run's figures."""
    from deepscope.tasks.pixel_report import write_pixel_report

    out = Path(config.out or f"runs/pixel-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    items = labelled_images(config)
    ndim = items[0].labels.ndim
    spec = config.spec(ndim, channel_count(items[0].image.shape, ndim))
    device = pick_device(config.device)
    cache = None if config.cache == "off" else FeatureCache(Path(config.cache) if config.cache else out / "feature_cache")
    start = time.perf_counter()
    xs, ys, features, cached = [], [], [], 0
    for item in items:
        view = input_view(item.image, ndim, spec.channels, str(item.source), config.normalize)
        if cache is None:  # features live only while their labelled pixels are taken
            f, hit = compute_features(view, spec, config.tile, device), False
        else:
            f, hit = cache.features(item.source, config.raw_key, view, spec, config.normalize, config.tile, device)
        x, y = training_pixels(f, item.labels)
        xs.append(x)
        ys.append(y)
        features.append(f if cache is not None else None)
        cached += hit
    feature_s = time.perf_counter() - start
    x, y = np.concatenate(xs), np.concatenate(ys)
    start = time.perf_counter()
    forest = fit_forest(x, y, config)
    fit_s = time.perf_counter() - start
    classes = [int(c) for c in forest.classes_]
    names = [f"class {c}" for c in classes]
    if config.class_names:
        if len(config.class_names) < max(classes):
            raise DeepscopeError(f"class_names lists {len(config.class_names)} names but labels go up to class {max(classes)}")
        names = [config.class_names[c - 1] for c in classes]
    classifier = PixelClassifier(spec, forest, config.normalize, names, versions())
    classifier.save(out / CLASSIFIER_FILE)
    save_yaml(config, out / "config.yaml")
    metrics: dict[str, Any] = {
        "images": len(items), "features": spec.count, "labelled_pixels": int(len(y)),
        "labelled_per_class": {name: int(np.count_nonzero(y == c)) for name, c in zip(names, classes)},
        "feature_s": round(feature_s, 3), "features_from_cache": cached, "fit_s": round(fit_s, 3),
        "oob_accuracy": round(float(forest.oob_score_), 4), "classifier": str(out / CLASSIFIER_FILE),
    }
    predictions = []
    if config.predict:
        start = time.perf_counter()
        for item, f in zip(items, features):
            if f is None:
                view = classifier.view(item.image, str(item.source))
                f = compute_features(view, spec, config.tile, device)
            probs = classifier.probabilities(np.asarray(f))
            predictions.append(write_prediction(classifier, probs, out / "predictions" / f"{item.name}.tif"))
        metrics["predict_s"] = round(time.perf_counter() - start, 3)
    importance = dict(zip(spec.names(), forest.feature_importances_.tolist()))
    metrics["report"] = str(write_pixel_report(out, classifier, items, predictions, metrics, importance))
    write_text(out / "metrics.json", json.dumps(metrics, indent=2), "metrics file")
    return metrics


def class_map(classifier: PixelClassifier, probs: np.ndarray) -> np.ndarray:
    """uint8 map of the most probable class's label value."""
    return np.asarray(classifier.classes, np.uint8)[np.argmax(probs, axis=0)]


def write_prediction(classifier: PixelClassifier, probs: np.ndarray, path: Path) -> dict[str, Any]:
    """Probabilities and the class map of one image as ``<stem>_probabilities.tif`` and ``<stem>_classes.tif``."""
    (prob_path, _), (class_path, _) = output_paths(path.parent, path.stem, False, "classes")
    for target, values in ((prob_path, probs), (class_path, class_map(classifier, probs))):
        with Output(target, "", values.shape, values.dtype, values.shape) as output:
            output.array[...] = values
    return {"probabilities": str(prob_path), "classes": str(class_path), "probs": probs}


@dataclass
class InstanceSettings:
    """From class probabilities to objects (see ``deepscope.postprocess.watershed_from_seeds``)."""

    foreground: Sequence[int] | None = None  # classes that make objects; None: all but the first (and the boundary)
    boundary: int | None = None  # class of object boundaries, which separates touching objects
    threshold: float = 0.5
    seeds: str = "components"  # components | maxima (of the distance transform, for touching round objects)
    min_distance: int = 3  # between maxima seeds
    min_size: int = 0


def instances_from(classifier: PixelClassifier, probs: np.ndarray, settings: InstanceSettings) -> np.ndarray:
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


def predict_files(path: str | Path, inputs: Sequence[Path], out: str | Path, device: torch.device, key: str | None = None,
                  tile: Sequence[int] | None = None, instances: InstanceSettings | None = None) -> list[dict[str, Any]]:
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
        with Output(prob_path, prob_key, (len(classifier.classes), *spatial), np.float32, (1, *spatial)) as probs, \
                Output(class_path, class_key, spatial, np.uint8, spatial) as classes:
            for region, features in feature_tiles(view, classifier.spec, tile, device):
                p = classifier.probabilities(features)
                probs.array[(slice(None),) + region] = p
                classes.array[region] = class_map(classifier, p)
            record = {"input": str(source), "shape": list(spatial), "seconds": round(time.perf_counter() - start, 3),
                      "probabilities": f"{prob_path}" + (f":{prob_key}" if prob_key else ""),
                      "classes": f"{class_path}" + (f":{class_key}" if class_key else "")}
            if instances is not None:
                labels = instances_from(classifier, np.asarray(probs.array[...]), instances)
                (_, _), (inst_path, inst_key) = output_paths(out, Path(source).stem, single, "instances")
                with Output(inst_path, inst_key, labels.shape, np.int32, spatial) as written:
                    written.array[...] = labels
                record |= {"instances": f"{inst_path}" + (f":{inst_key}" if inst_key else ""), "objects": int(labels.max())}
        records.append(record)
    return records
