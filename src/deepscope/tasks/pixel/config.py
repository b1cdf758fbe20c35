"""Settings of shallow pixel classification: which features, which forest, where the data and the cache are."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from deepscope.errors import DeepscopeError
from deepscope.tasks.pixel.features import FeatureSpec


@dataclass
class ForestConfig:
    """scikit-learn ``RandomForestClassifier`` settings (ilastik uses 100 trees)."""

    trees: int = 100
    max_depth: int | None = None
    min_samples_leaf: int = 1
    class_weight: str | None = None  # None | balanced (weights classes by their inverse labelled-pixel count)
    jobs: int = -1  # threads for fitting and prediction; -1: all cores


@dataclass
class PixelConfig:
    task: str = "pixel"
    images: str = ""  # image file, or folder of images
    labels: str = ""  # sparse label file (0 unlabelled, 1..K classes), or folder matched to the images by file name
    out: str = ""  # run folder; empty: runs/pixel-<date-time>
    features: dict[str, list[float]] | None = None  # filter -> scales; None: ilastik's full set (FeatureSpec.default)
    normalize: list[float] | None = field(default_factory=lambda: [1.0, 99.8])  # percentiles to 0 and 1; None: raw
    raw_key: str | None = None  # image array in HDF5/zarr/NPZ containers
    label_key: str | None = None  # label array in HDF5/zarr/NPZ containers
    class_names: list[str] | None = None  # names of classes 1..K, for reports
    tile: list[int] | None = None  # feature and prediction tile per spatial axis; None: whole image when it fits
    device: str = "auto"  # where features are computed: auto | cpu | cuda | cuda:N
    cache: str | bool | None = None  # feature cache folder; None: <out>/feature_cache; off (or false): no cache
    predict: bool = True  # write probabilities and classes of the labelled images
    seed: int = 0
    forest: ForestConfig = field(default_factory=ForestConfig)

    def __post_init__(self) -> None:
        if self.cache is False:  # YAML reads a bare ``off`` as false
            self.cache = "off"
        if self.cache is True:
            raise DeepscopeError("cache must be a folder, off, or null (the run folder's feature_cache)")
        if self.features is not None:
            # unknown filters and bad scales fail here, not after reading images; the cast: create only reads the
            # dict, whose lists of scales are sequences (a dict is invariant in its value type)
            FeatureSpec.create(cast("dict[str, Sequence[float]]", self.features))
        if self.normalize is not None and (
            len(self.normalize) != 2 or not 0 <= self.normalize[0] < self.normalize[1] <= 100
        ):
            raise DeepscopeError(
                f"normalize must be two percentiles low < high in [0, 100], or null, got {self.normalize}"
            )
        if self.forest.trees < 1:
            raise DeepscopeError(f"forest.trees must be at least 1, got {self.forest.trees}")
        if self.forest.class_weight not in (None, "balanced"):
            raise DeepscopeError(f"forest.class_weight must be null or balanced, got {self.forest.class_weight!r}")

    def spec(self, ndim: int, channels: int) -> FeatureSpec:
        if self.features is None:
            return FeatureSpec.default(ndim, channels)
        return FeatureSpec.create(cast("dict[str, Sequence[float]]", self.features), ndim, channels)
