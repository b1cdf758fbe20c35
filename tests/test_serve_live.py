"""The live classifier of `deepscope serve`: refit on painted labels, visible region first, background pass, exact
probabilities, feature sets, 3D stacks, and a saved forest that `deepscope pixel predict` applies identically."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from deepscope.cli import main
from deepscope.errors import DeepscopeError
from deepscope.inference.blockio import open_input
from deepscope.serve import live as live_module
from deepscope.serve.folder import ServedFolder
from deepscope.serve.labels import LabelStore, Stroke
from deepscope.serve.live import LiveClassifier
from deepscope.serve.project import Project
from deepscope.tasks.pixel.features import compute_features

SHAPE = (48, 96)  # left half dark, right half bright
LIGHT = {"gaussian": [1.0, 3.5], "ggm": [1.6]}  # fewer features than the default live set: faster tests


def two_regions(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 noisy image (2D or a (Z, Y, X) stack): mean 50 left of the middle column, 200 right of it."""
    rng = np.random.default_rng(seed)
    values = np.where(np.arange(shape[-1]) < shape[-1] // 2, 50.0, 200.0) + rng.normal(0, 12, shape)
    return np.clip(values, 0, 255).astype(np.uint8)


class Live:
    """A served folder with its label store and live classifier, closed after the test."""

    def __init__(self, root: Path, features: dict[str, list[float]] | None = None) -> None:
        self.folder = ServedFolder(root)
        self.store = LabelStore(self.folder)
        project = Project() if features is None else Project(features=features)
        self.live = LiveClassifier(self.folder, self.store, project)

    def paint(self, name: str, label: int, column: float, z: int | None = None) -> None:
        """A vertical stroke of ``label`` down ``column``."""
        height = self.folder.open(name).spatial[-2]
        self.store.apply(name, Stroke([(4.0, column), (height - 5.0, column)], 2.0, label, z))

    def paint_both(self, name: str, z: int | None = None) -> None:
        width = self.folder.open(name).spatial[-1]
        self.paint(name, 1, width * 0.2, z)
        self.paint(name, 2, width * 0.8, z)

    def wait(self, name: str, timeout: float = 30.0) -> dict:
        """The status once the background pass is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.live.status(name)
            if not status["busy"] and status["predicted"] == 1.0:
                return status
            time.sleep(0.02)
        raise AssertionError(f"background pass of {name} not done: {self.live.status(name)}")

    def reference(self, name: str) -> np.ndarray:
        """(K, Y, X) float64 sklearn predict_proba of the current forest on features computed here from the file,
        normalized the way the saved classifier says."""
        classifier = self.live.classifier()
        assert classifier is not None
        image = self.folder.open(name)
        features = compute_features(classifier.view(open_input(image.path), name), classifier.spec, device="cpu")
        flat = features.reshape(len(features), -1).T
        return classifier.forest.predict_proba(flat).T.reshape((-1, *features.shape[1:]))

    def close(self) -> None:
        self.live.close()
        self.store.close()


@pytest.fixture
def open_live(tmp_path: Path) -> Iterator[Callable[..., Live]]:
    """Opens the live classifier of ``tmp_path`` (with LIGHT features unless told); closes it after the test."""
    opened: list[Live] = []

    def open_with(features: dict[str, list[float]] | None = LIGHT) -> Live:
        opened.append(Live(tmp_path, features))
        return opened[-1]

    yield open_with
    for live in opened:
        live.close()


@pytest.fixture
def served(tmp_path: Path, open_live: Callable[..., Live]) -> Live:
    tifffile.imwrite(tmp_path / "halves.tif", two_regions(SHAPE))
    return open_live()


def assert_quantised(probs: np.ndarray, reference: np.ndarray) -> None:
    """uint8 probabilities are the reference rounded to 1/255: no pixel off by more than half a step."""
    assert probs.shape == reference.shape
    assert np.abs(probs / 255.0 - reference).max() <= 0.5 / 255 + 1e-6


def test_two_regions_are_told_apart_and_equal_sklearn(tmp_path: Path, open_live: Callable[..., Live]) -> None:
    tifffile.imwrite(tmp_path / "halves.tif", two_regions(SHAPE))
    served = open_live(None)  # the project's default live features
    served.paint_both("halves.tif")
    version = served.live.refit()
    assert version == 1 and served.live.classifier().spec.count == 25
    assert served.live.predict("halves.tif", None) == 1
    status = served.wait("halves.tif")
    assert status == {"model": 1, "classes": [1, 2], "predicted": 1.0, "busy": False}
    probs = served.live.probabilities("halves.tif")
    assert probs is not None and probs.dtype == np.uint8 and probs.shape == (2, *SHAPE)
    assert (probs[0, :, :40] > 127).all() and (probs[0, :, 56:] < 128).all()
    assert_quantised(probs, served.reference("halves.tif"))
    uncertainty = served.live.uncertainty("halves.tif")
    top, second = probs.max(axis=0).astype(int), probs.min(axis=0).astype(int)  # two classes
    assert np.array_equal(uncertainty, 255 - (top - second))


def test_predict_computes_exactly_the_visible_pixels(served: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_module, "BLOCK", 8)  # regions are predicted in several blocks
    served.paint_both("halves.tif")
    served.live.refit()
    served.live.close()  # no background pass: only what predict itself computes
    region = (slice(10, 30), slice(20, 70))
    served.live.predict("halves.tif", region)
    probs = served.live.probabilities("halves.tif")
    reference = served.reference("halves.tif")
    assert_quantised(probs[(slice(None), *region)], reference[(slice(None), *region)])
    outside = np.ones(SHAPE, bool)
    outside[region] = False
    assert not probs[:, outside].any()
    assert served.live.status("halves.tif")["predicted"] == 20 * 50 / (48 * 96)
    # a zoomed-out view (level 2): every 4th pixel from a multiple of 4, as the overlay tiles show them
    served.live.predict("halves.tif", (slice(0, 48, 4), slice(3, 96, 4)))
    shown = np.zeros(SHAPE, bool)
    shown[::4, ::4] = True
    assert_quantised(probs[:, shown], reference[:, shown])
    assert not probs[:, ~(shown | ~outside)].any()


def test_the_background_pass_completes_the_plane(served: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_module, "BLOCK", 16)
    served.paint_both("halves.tif")
    served.live.refit()
    served.live.predict("halves.tif", (slice(10, 30), slice(20, 70)))
    served.wait("halves.tif")
    assert_quantised(served.live.probabilities("halves.tif"), served.reference("halves.tif"))


def test_a_new_model_keeps_the_old_values_until_it_predicts(served: Live) -> None:
    served.paint_both("halves.tif")
    served.live.refit()
    served.live.predict("halves.tif", None)
    served.wait("halves.tif")
    before = served.live.probabilities("halves.tif").copy()
    served.paint("halves.tif", 2, 70.0)
    assert served.live.refit() == 2
    status = served.live.status("halves.tif")
    assert status["model"] == 2 and status["predicted"] == 0.0
    assert np.array_equal(served.live.probabilities("halves.tif"), before)
    served.live.predict("halves.tif", (slice(0, 8), slice(0, 8)))
    served.wait("halves.tif")
    assert_quantised(served.live.probabilities("halves.tif"), served.reference("halves.tif"))


def test_one_class_gives_no_model_but_its_features_are_computed_in_the_background(served: Live) -> None:
    served.paint("halves.tif", 1, 20.0)
    assert served.live.refit() is None
    assert served.live.classifier() is None and served.live.probabilities("halves.tif") is None
    assert served.live.status("halves.tif") == {"model": None, "classes": [], "predicted": 0.0, "busy": False}
    with pytest.raises(DeepscopeError, match="at least two classes"):
        served.live.predict("halves.tif", None)
    cache = served.folder.root / ".deepscope" / "features"
    deadline = time.monotonic() + 30
    while not list(cache.glob("halves-*.npy")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(cache.glob("halves-*.npy"))) == 1
    served.store.apply("halves.tif", Stroke([(10.0, 20.0)], 3.0, 0))  # erased: nothing labelled at all
    assert served.live.refit() is None


def test_set_features_changes_the_feature_count(served: Live) -> None:
    served.paint_both("halves.tif")
    served.live.refit()
    assert served.live.classifier().spec.count == 3
    served.live.predict("halves.tif", None)
    served.live.set_features({"gaussian": [1.0], "hessian": [2.0]})  # two eigenvalues per Hessian scale
    assert served.live.classifier() is None and served.live.probabilities("halves.tif") is None
    assert served.live.refit() == 2
    classifier = served.live.classifier()
    assert classifier.spec.count == 3 and classifier.forest.n_features_in_ == 3
    assert classifier.spec.names() == ["gaussian_1", "hessian_2_ev0", "hessian_2_ev1"]
    with pytest.raises(DeepscopeError, match="unknown filter"):
        served.live.set_features({"sobel": [1.0]})


def test_label_files_painted_elsewhere_are_fitted(tmp_path: Path, open_live: Callable[..., Live]) -> None:
    tifffile.imwrite(tmp_path / "halves.tif", two_regions(SHAPE))
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:40, 10:14], labels[5:40, 80:84] = 1, 2
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "halves.tif", labels)
    live = open_live({"gaussian": [1.0, 3.0]})
    assert live.live.refit() == 1
    live.live.predict("halves.tif", None)
    live.wait("halves.tif")
    probs = live.live.probabilities("halves.tif")
    assert (probs[0, :, :40] > 127).all() and (probs[0, :, 56:] < 128).all()


def test_a_slice_of_a_stack_is_predicted_with_3d_features(tmp_path: Path, open_live: Callable[..., Live]) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", two_regions((5, 32, 48)))
    live = open_live({"gaussian": [1.0], "hessian": [1.0]})
    live.paint_both("stack.tif", z=1)
    assert live.live.refit() == 1
    assert live.live.classifier().spec.ndim == 3
    live.live.predict("stack.tif", (slice(0, 16), slice(None)), z=3)
    live.wait("stack.tif")
    probs = live.live.probabilities("stack.tif", 3)
    assert probs.shape == (2, 32, 48) and live.live.probabilities("stack.tif", 0) is None
    assert_quantised(probs, live.reference("stack.tif")[:, 3])
    assert (probs[0, :, :20] > 127).all() and (probs[0, :, 28:] < 128).all()
    with pytest.raises(DeepscopeError, match="slice 5 is out of range"):
        live.live.predict("stack.tif", None, z=5)


def test_the_forest_fits_the_kind_of_the_most_recently_labelled_image(
    tmp_path: Path, open_live: Callable[..., Live]
) -> None:
    tifffile.imwrite(tmp_path / "grey.tif", two_regions(SHAPE))
    tifffile.imwrite(tmp_path / "colour.tif", np.stack([two_regions(SHAPE, seed)[:, ::-1] for seed in range(3)], -1))
    live = open_live({"gaussian": [1.0]})
    live.paint_both("grey.tif")
    live.live.refit()
    assert live.live.classifier().spec.channels == 1
    live.paint_both("colour.tif")
    version = live.live.refit()
    assert live.live.classifier().spec.channels == 3
    assert live.live.predict("grey.tif", None) == version  # another kind: nothing predicted
    assert live.live.probabilities("grey.tif") is None
    live.live.predict("colour.tif", None)
    live.wait("colour.tif")
    probs = live.live.probabilities("colour.tif")  # mirrored (bright left): class 1 is still the left
    assert (probs[0, :, :40] > 127).all() and (probs[0, :, 56:] < 128).all()


def test_the_saved_forest_predicts_the_same_with_pixel_predict(served: Live, tmp_path: Path) -> None:
    served.paint_both("halves.tif")
    served.live.refit()
    served.live.predict("halves.tif", None)
    served.wait("halves.tif")
    path = tmp_path / "out" / "classifier.safetensors"
    served.live.classifier().save(path)
    assert (
        main(
            [
                "pixel",
                "predict",
                str(path),
                str(served.folder.root / "halves.tif"),
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    predicted = tifffile.imread(tmp_path / "out" / "halves_probabilities.tif")
    assert_quantised(served.live.probabilities("halves.tif"), predicted)
