"""The labelling project of a served folder: class names and colours, the live feature set, the saved classifier, the
labelled images and the models trained from the page.

Kept in ``FOLDER/deepscope-project.yaml`` so that reopening the folder restores what the user set up (the labels,
masks and models themselves are files of the folder; the project says which). The feature
selection uses the shape of ``PixelConfig.features`` (filter -> scales), so it can be copied into a ``deepscope pixel
train`` config unchanged.
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import PurePosixPath

import yaml

from deepscope.atomic import atomic_write
from deepscope.data.scribbles import MAX_CLASSES
from deepscope.errors import DataError, DeepscopeError
from deepscope.serve.folder import ServedFolder
from deepscope.tasks.pixel.features import FILTERS, FeatureSpec

PROJECT_FILE = "deepscope-project.yaml"  # in the served folder
COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
SAVING = threading.RLock()  # one change and save at a time: the page, the label changes and the jobs all record here
PATH_LISTS = ("labelled", "models")
LIVE_SCALES = [1.0, 1.6, 3.5]  # a light set for live updates: ilastik's small and medium scales, no 5.0 and 10.0


@dataclass
class LabelClass:
    value: int  # 1..255, the value painted into the label images
    name: str
    colour: str  # CSS "#rrggbb"


def _default_classes() -> list[LabelClass]:
    return [LabelClass(1, "background", "#1f77b4"), LabelClass(2, "foreground", "#ff7f0e")]  # blue and orange


def _default_features() -> dict[str, list[float]]:
    """Every filter at the live scales, Gaussian smoothing also at 0.3 (as ilastik's defaults)."""
    return {name: ([0.3] if name == "gaussian" else []) + LIVE_SCALES for name in FILTERS}


@dataclass
class Project:
    classes: list[LabelClass] = field(default_factory=_default_classes)
    features: dict[str, list[float]] = field(default_factory=_default_features)  # filter -> scales
    normalize: list[float] | None = field(default_factory=lambda: [1.0, 99.8])  # percentiles to 0 and 1; None: raw
    classifier: str | None = None  # path, relative to the folder, of the last saved classifier file
    labelled: list[str] = field(default_factory=list)  # images painted in the page (served names)
    models: list[str] = field(default_factory=list)  # checkpoints trained from the page, relative to the folder

    @classmethod
    def load(cls, folder: ServedFolder) -> Project:
        """The folder's project, or the defaults when it has none; DataError naming the file when it is bad."""
        path = folder.root / PROJECT_FILE
        if not path.exists():
            return cls()
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{path}: not a readable YAML file ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise DataError(f"{path}: expected a mapping of {', '.join(f.name for f in fields(cls))}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"{path}: unknown setting(s) {', '.join(map(str, unknown))}")
        classes = values.get("classes", [])
        if not isinstance(classes, list) or not all(
            isinstance(c, dict) and set(c) == {"value", "name", "colour"} for c in classes
        ):
            raise DataError(f"{path}: classes must be a list of {{value, name, colour}}")
        defaults = cls()
        project = cls(
            classes=[LabelClass(**c) for c in classes] if "classes" in values else defaults.classes,
            features=values.get("features", defaults.features),
            normalize=values.get("normalize", defaults.normalize),
            classifier=values.get("classifier"),
            labelled=values.get("labelled", []),
            models=values.get("models", []),
        )
        project.check(folder)
        return project

    def check(self, folder: ServedFolder) -> None:
        """DataError naming the project file when a value is bad (the app checks changes with it before saving)."""
        problem = self._problem()
        if problem is not None:
            raise DataError(f"{folder.root / PROJECT_FILE}: {problem}")

    def _problem(self) -> str | None:
        """What is wrong with the settings, in a few words, or None."""
        if not self.classes:
            return "at least one class is needed"
        for c in self.classes:
            if not isinstance(c.value, int) or isinstance(c.value, bool) or not 1 <= c.value <= MAX_CLASSES:
                return f"class value {c.value!r} must be an integer 1..{MAX_CLASSES}"
            if not isinstance(c.name, str) or not c.name.strip():
                return f"class {c.value} needs a name"
            if not isinstance(c.colour, str) or not COLOUR.fullmatch(c.colour):
                return f"class {c.value} colour {c.colour!r} is not #rrggbb"
        values = [c.value for c in self.classes]
        if len(set(values)) < len(values):
            return f"duplicate class values in {values}"
        if (
            not isinstance(self.features, dict)
            or not self.features
            or not all(
                isinstance(v, list) and all(isinstance(s, int | float) and not isinstance(s, bool) for s in v)
                for v in self.features.values()
            )
        ):
            return "features must map filter names to lists of scales"
        try:
            FeatureSpec.create(self.features)
        except (DeepscopeError, OverflowError) as exc:  # OverflowError: an integer scale beyond any float
            return f"features: {exc}"
        if self.normalize is not None and (
            not isinstance(self.normalize, list)
            or len(self.normalize) != 2
            or not all(isinstance(p, int | float) and not isinstance(p, bool) for p in self.normalize)
            or not 0 <= self.normalize[0] < self.normalize[1] <= 100
        ):
            return f"normalize must be two percentiles low < high in [0, 100], or null, got {self.normalize!r}"
        if self.classifier is not None and not _inside(self.classifier):
            return f"classifier must be a path inside the folder, got {self.classifier!r}"
        for name in PATH_LISTS:
            paths = getattr(self, name)
            if not isinstance(paths, list) or not all(map(_inside, paths)):
                return f"{name} must be a list of paths inside the folder, got {paths!r}"
        return None

    def save(self, folder: ServedFolder) -> None:
        """Write the project file atomically, so a crash never leaves it half written."""
        with SAVING:
            self.check(folder)
            text = yaml.safe_dump(asdict(self), sort_keys=False).encode()
            atomic_write(folder.root / PROJECT_FILE, lambda handle: handle.write(text), "project file")

    def record(self, folder: ServedFolder, kind: str, path: str) -> None:
        """Add ``path`` to the ``kind`` list (``labelled`` images, trained ``models``) and save, when it is new."""
        with SAVING:
            paths = getattr(self, kind)
            if path not in paths:
                paths.append(path)
                self.save(folder)

    def class_by_value(self, value: int) -> LabelClass:
        for label_class in self.classes:
            if label_class.value == value:
                return label_class
        raise DeepscopeError(
            f"label {value} is not a class of the project; classes are {', '.join(str(c.value) for c in self.classes)}"
        )


def _inside(path: object) -> bool:
    """Whether ``path`` is a relative path that stays inside the folder."""
    return (
        isinstance(path, str)
        and bool(path)
        and not PurePosixPath(path).is_absolute()
        and ".." not in PurePosixPath(path).parts
    )
