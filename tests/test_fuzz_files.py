"""Checkpoints and classifiers damaged or crafted at random: every case is refused in one line naming the file, or
loads into something that works; nothing crashes the process (a crafted tree could make scikit-learn read out of
bounds), raises another exception, or runs code."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.ensemble import RandomForestClassifier

from deepscope.engine.checkpoint import header_task, load_checkpoint, save_checkpoint
from deepscope.errors import CheckpointError
from deepscope.safefile import FORMAT_KEY, STATE_KEY, read_state, state_bytes, write_state
from deepscope.tasks.pixel.classifier import FORMAT, PixelClassifier, versions
from deepscope.tasks.pixel.features import FeatureSpec

FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NODE_FIELDS = [
    "left_child",
    "right_child",
    "feature",
    "threshold",
    "impurity",
    "n_node_samples",
    "weighted_n_node_samples",
]


@pytest.fixture(scope="module")
def classifier_state(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The stored state of a small real classifier: 4 trees on 3 features, classes 1, 2 and 5."""
    rng = np.random.default_rng(0)
    x = rng.random((400, 3)).astype(np.float32)
    y = np.where(x[:, 0] > 0.6, 5, np.where(x[:, 1] > 0.5, 2, 1))
    spec = FeatureSpec.create({"gaussian": (1.0,), "log": (1.0, 2.0)})
    forest = RandomForestClassifier(4, max_depth=6, random_state=0).fit(x, y)
    path = tmp_path_factory.mktemp("classifier") / "classifier.safetensors"
    PixelClassifier(spec, forest, None, ["a", "b", "c"], versions()).save(path)
    return read_state(path, FORMAT)


def one_line_naming(exc: BaseException, path: Path) -> None:
    message = str(exc)
    assert "\n" not in message and str(path) in message, message


@given(data=st.data())
@FUZZ
def test_crafted_forests_are_refused_or_predict_safely(classifier_state, tmp_path, data):
    state = json.loads(json.dumps({k: v for k, v in classifier_state.items() if k != "forest"}))
    forest = classifier_state["forest"]
    trees = [
        {
            "max_features": t["max_features"],
            "values": t["values"].copy(),
            "nodes": {k: v.copy() for k, v in t["nodes"].items()},
        }
        for t in forest["trees"]
    ]
    state["forest"] = {**forest, "trees": trees, "classes": forest["classes"].copy()}
    for _ in range(data.draw(st.integers(1, 4))):
        tree = trees[data.draw(st.integers(0, len(trees) - 1))]
        field = data.draw(st.sampled_from([*NODE_FIELDS, "values", "max_features", "classes", "n_features"]))
        if field in NODE_FIELDS:
            array = tree["nodes"][field]
            at = data.draw(st.integers(0, len(array) - 1))
            array[at] = data.draw(
                st.sampled_from([-3, -2, -1, 0, 1, len(array) - 1, len(array), 2**62, 7])
                if array.dtype.kind == "i"
                else st.floats(allow_nan=True, allow_infinity=True, width=64)
            )
        elif field == "values":
            tree["values"] = data.draw(
                st.sampled_from(
                    [tree["values"][:-1], -tree["values"], tree["values"] * np.nan, tree["values"][:, :, :2]]
                )
            )
        elif field == "max_features":
            tree["max_features"] = data.draw(st.sampled_from([0, -1, 99, "3", None, 2.5]))
        elif field == "classes":
            state["forest"]["classes"] = data.draw(
                st.sampled_from([np.array([1, 1, 2]), np.array([1.5, 2, 3]), np.array([1]), np.zeros((3, 1), int)])
            )
        else:
            state["forest"]["n_features"] = data.draw(st.sampled_from([0, 2, 4, 2**40, "3", None]))
    path = tmp_path / "crafted.safetensors"
    write_state(path, state, FORMAT, "classifier")
    try:
        loaded = PixelClassifier.load(path)
    except CheckpointError as exc:
        one_line_naming(exc, path)
        return
    probabilities = loaded.probabilities(np.random.default_rng(1).normal(size=(3, 8, 8)).astype(np.float32) * 10)
    assert probabilities.shape == (3, 8, 8) and np.all(np.isfinite(probabilities))


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(
        {
            "model": {"w": torch.arange(6.0).view(2, 3)},
            "config": {"task": "classify", "model": "cnn"},
            "history": [{"epoch": 1, "loss": 0.5}],
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}},
        },
        path,
    )
    return path.read_bytes()


@given(cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6))
@FUZZ
def test_damaged_checkpoints_are_refused_in_one_line(checkpoint_bytes, tmp_path, cut, flips):
    damaged = bytearray(checkpoint_bytes[: max(cut, 0)] if cut < len(checkpoint_bytes) else checkpoint_bytes)
    for at, value in flips:
        if at < len(damaged):
            damaged[at] = value
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(damaged))
    for read in (load_checkpoint, header_task):
        try:
            read(path)
        except CheckpointError as exc:
            one_line_naming(exc, path)


SKELETON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["__tensor__", "__ndarray__", "__tuple__", "__items__", "model", "config", "x"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)


@given(
    skeleton=SKELETON,
    header=st.dictionaries(st.sampled_from([FORMAT_KEY, STATE_KEY, "task"]), st.text(max_size=30), max_size=3),
)
@FUZZ
def test_crafted_headers_are_refused_in_one_line(tmp_path, skeleton, header):
    """A header holding any JSON (tags pointing nowhere, tags with other keys, items that are not pairs) or any text."""
    path = tmp_path / "crafted.pt"
    data = bytearray(state_bytes({"w": torch.ones(2)}, "deepscope-checkpoint", {"task": "classify"}))
    size = struct.unpack("<Q", data[:8])[0]
    metadata = {
        "__metadata__": {
            "format": "deepscope-checkpoint",
            "task": "classify",
            STATE_KEY: json.dumps(skeleton),
            **header,
        }
    }
    tensors = json.loads(data[8 : 8 + size])
    tensors.pop("__metadata__")
    text = json.dumps({**metadata, **tensors}).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[8 + size :]))
    for read in (load_checkpoint, header_task):
        try:
            read(path)
        except CheckpointError as exc:
            one_line_naming(exc, path)
