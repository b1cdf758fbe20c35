"""Training a pixel classifier the ilastik way: filter-bank features of the scribbled images, a random forest fitted on
their labelled pixels, then predictions of those images and a report.

Features of each training image are cached on disk (keyed by the file, its size and modification time, the feature
spec and the normalization), so training again after new labels costs only reading the labelled pixels and fitting
the forest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from deepscope.atomic import temporary, write_text
from deepscope.config import save_yaml
from deepscope.data.io.views import channel_count, input_view
from deepscope.engine.distributed import pick_device
from deepscope.errors import DataError, DeepscopeError
from deepscope.tasks.pixel.classifier import CLASSIFIER_FILE, PixelClassifier, versions, write_prediction
from deepscope.tasks.pixel.config import PixelConfig
from deepscope.tasks.pixel.features import FeatureSpec, compute_features
from deepscope.tasks.pixel.labelled import labelled_images, training_pixels
from deepscope.tasks.pixel.report import write_pixel_report

if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestClassifier


class FeatureCache:
    """Features of whole images as ``.npy`` files, memory-mapped when read back; written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, source: Path, key: str | None, spec: FeatureSpec, normalize: list[float] | None) -> Path:
        stat = source.stat()
        ident = {
            "file": str(source.resolve()),
            "size": stat.st_size,
            "mtime": stat.st_mtime_ns,
            "key": key,
            "spec": spec.to_dict(),
            "normalize": normalize,
        }
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"{source.stem}-{digest}.npy"

    def features(
        self,
        source: Path,
        key: str | None,
        view: Any,
        spec: FeatureSpec,
        normalize: list[float] | None,
        tile: Sequence[int] | None,
        device: torch.device,
    ) -> tuple[np.ndarray, bool]:
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


def fit_forest(x: np.ndarray, y: np.ndarray, config: PixelConfig) -> RandomForestClassifier:
    # imported when the features are ready, not before the work
    from sklearn.ensemble import RandomForestClassifier

    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(f"only class {classes[0]} is labelled; label pixels of at least two classes")
    forest = RandomForestClassifier(
        config.forest.trees,
        max_depth=config.forest.max_depth,
        min_samples_leaf=config.forest.min_samples_leaf,
        class_weight=config.forest.class_weight,
        n_jobs=config.forest.jobs,
        random_state=config.seed,
        oob_score=True,
    )
    # few samples: some have no out-of-bag trees, which only lowers the estimate's support
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return forest.fit(x, y)


def train_pixel(config: PixelConfig) -> dict[str, Any]:
    """Fit the forest on the labelled pixels of ``config``'s images; save the classifier, config, predictions and
    report in ``config.out``; return the run's figures."""
    out = Path(config.out or f"runs/pixel-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    items = labelled_images(config)
    ndim = items[0].labels.ndim
    spec = config.spec(ndim, channel_count(items[0].image.shape, ndim))
    device = pick_device(config.device)
    # PixelConfig.__post_init__ turns False into "off" and refuses True, so a set cache is a folder name
    folder = cast(str | None, config.cache)
    cache = None if folder == "off" else FeatureCache(Path(folder) if folder else out / "feature_cache")
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
            raise DeepscopeError(
                f"class_names lists {len(config.class_names)} names but labels go up to class {max(classes)}"
            )
        names = [config.class_names[c - 1] for c in classes]
    classifier = PixelClassifier(spec, forest, config.normalize, names, versions())
    classifier.save(out / CLASSIFIER_FILE)
    save_yaml(config, out / "config.yaml")
    metrics: dict[str, Any] = {
        "images": len(items),
        "features": spec.count,
        "labelled_pixels": len(y),
        "labelled_per_class": {name: int(np.count_nonzero(y == c)) for name, c in zip(names, classes)},
        "feature_s": round(feature_s, 3),
        "features_from_cache": cached,
        "fit_s": round(fit_s, 3),
        "oob_accuracy": round(float(forest.oob_score_), 4),
        "classifier": str(out / CLASSIFIER_FILE),
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
