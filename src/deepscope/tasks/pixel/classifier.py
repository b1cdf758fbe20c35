"""A fitted pixel classifier (feature spec, normalisation, classes, random forest, library versions) and its file.

The classifier is one safetensors file (``classifier.safetensors``): the forest's node arrays plus a JSON header,
checked before use, so a classifier received with someone's folder cannot run code or crash the process
(:mod:`deepscope.models.forest`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import deepscope
from deepscope.data.io.views import input_view
from deepscope.errors import CheckpointError, DeepscopeError
from deepscope.inference.blockio import Output, output_paths
from deepscope.safefile import is_safetensors, read_state, write_state
from deepscope.tasks.pixel.features import FeatureSpec

if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestClassifier

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
        # scikit-learn is imported when a forest is saved or read
        from deepscope.models.forest import forest_state

        state = {
            "spec": self.spec.to_dict(),
            "feature_names": self.spec.names(),
            "forest": forest_state(self.forest),
            "normalize": self.normalize,
            "class_names": self.class_names,
            "versions": self.versions,
        }
        write_state(path, state, FORMAT, "classifier")

    @classmethod
    def load(cls, path: str | Path) -> PixelClassifier:
        """Read a saved classifier (nothing in it can run code), check its forest and that it fits its feature spec."""
        from deepscope.models.forest import rebuild_forest

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: classifier file not found")
        try:
            if not is_safetensors(path):
                raise ValueError(
                    "it is not a safetensors file; a classifier.pkl of deepscope 0.1 is a pickle, "
                    "which could run code when opened and is refused: train it again with deepscope pixel train"
                )
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
            raise CheckpointError(
                f"{path}: the feature spec ({spec.count} features) does not match the forest, which "
                f"was fitted on {forest.n_features_in_}; train the classifier again"
            )
        normalize, names, saved = state.get("normalize"), state.get("class_names"), state.get("versions")
        if normalize is not None and not (
            isinstance(normalize, list) and all(isinstance(v, int | float) for v in normalize)
        ):
            raise CheckpointError(f"{path}: its normalisation is not a list of numbers")
        if not (
            isinstance(names, list) and len(names) == len(forest.classes_) and all(isinstance(n, str) for n in names)
        ):
            raise CheckpointError(f"{path}: its class names do not match its {len(forest.classes_)} classes")
        if not (isinstance(saved, dict) and all(isinstance(v, str) for v in saved.values())):
            raise CheckpointError(f"{path}: its library versions are not readable")
        if saved.get("scikit-learn") != version("scikit-learn"):
            warnings.warn(
                f"{path}: saved with scikit-learn {saved.get('scikit-learn')}, loaded with {version('scikit-learn')}",
                stacklevel=2,
            )
        return cls(spec, forest, normalize, names, saved)


def versions() -> dict[str, str]:
    return {
        "deepscope": deepscope.__version__,
        "scikit-learn": version("scikit-learn"),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


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
