"""A fitted scikit-learn random forest as plain arrays and values, and back: saved without pickle, checked on load.

A pickled forest can run code when it is unpickled, and even a forest rebuilt by a safe loader (skops) is unsafe to
use when it comes from someone else: scikit-learn follows each tree's child and feature indices without bounds
checks, so a crafted file crashes the process or reads outside its arrays. So each tree is stored as its node arrays
and, before scikit-learn sees them, checked to be a proper binary tree: every child index lies after its parent and
inside the tree, every node but the root has exactly one parent, every split names an existing feature at a finite
threshold, and the class counts are finite and non-negative. Rebuilding goes through scikit-learn's own ``Tree``
state (its pickle protocol), the same path its unpickling takes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier
from sklearn.tree._tree import TREE_LEAF, Tree

MAX_NODES = 1 << 26  # per tree: far beyond any forest fitted on labelled pixels, small enough to refuse absurd files


def forest_state(forest: RandomForestClassifier) -> dict[str, Any]:
    """The fitted ``forest`` as nested plain values and arrays (see :mod:`deepscope.safefile`)."""
    params = {k: v for k, v in forest.get_params().items() if v is None or isinstance(v, bool | int | float | str)}
    trees = []
    for estimator in forest.estimators_:
        state = estimator.tree_.__getstate__()
        nodes = state["nodes"]
        trees.append(
            {
                "max_features": int(estimator.max_features_),
                "nodes": {name: np.ascontiguousarray(nodes[name]) for name in nodes.dtype.names},
                "values": np.ascontiguousarray(state["values"]),
            }
        )
    return {
        "params": params,
        "classes": np.asarray(forest.classes_),
        "n_features": int(forest.n_features_in_),
        "trees": trees,
    }


def _node_dtype() -> np.dtype:
    """The structured dtype of scikit-learn's tree nodes in the installed version."""
    return Tree(1, np.array([2], dtype=np.intp), 1).__getstate__()["nodes"].dtype


def _array(value: Any, what: str, dtype: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    """``value`` as an array of ``dtype`` whose shape matches ``shape`` (None: any length); ValueError otherwise."""
    if (
        not isinstance(value, np.ndarray)
        or value.ndim != len(shape)
        or any(s is not None and s != n for s, n in zip(shape, value.shape))
    ):
        raise ValueError(f"{what} is not an array of shape {shape}")
    if not np.can_cast(value.dtype, dtype, casting="same_kind"):
        raise ValueError(f"{what} holds {value.dtype}, expected {np.dtype(dtype)}")
    return value.astype(dtype, copy=False)


def _depth(left: np.ndarray, right: np.ndarray) -> int:
    """Depth of a checked tree, level by level; also that every node is reached exactly once from the root."""
    frontier, depth, reached = np.array([0]), 0, 1
    while True:
        children = np.concatenate([left[frontier], right[frontier]])
        children = children[children != TREE_LEAF]
        if not len(children):
            break
        frontier, depth, reached = children, depth + 1, reached + len(children)
    if reached != len(left):
        raise ValueError("its nodes do not form one tree")
    return depth


def _checked_tree(tree: Any, n_features: int, n_classes: int, index: int) -> tuple[Tree, int]:
    """scikit-learn's ``Tree`` for one stored tree, after checking it is safe to traverse; and its max_features."""
    what = f"tree {index}"
    if not isinstance(tree, dict) or not isinstance(tree.get("nodes"), dict):
        raise ValueError(f"{what} has no node arrays")
    dtype = _node_dtype()
    names = dtype.names
    assert names is not None  # the nodes' dtype is structured: it always has field names
    if set(tree["nodes"]) != set(names):
        raise ValueError(
            f"{what} has node fields {sorted(tree['nodes'])}; this scikit-learn's trees have {list(names)}"
        )
    count = len(tree["nodes"]["left_child"]) if isinstance(tree["nodes"]["left_child"], np.ndarray) else 0
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"{what} has {count} nodes")
    fields = {name: _array(tree["nodes"][name], f"{what}'s {name}", dtype[name], (count,)) for name in names}
    left, right, feature = fields["left_child"], fields["right_child"], fields["feature"]
    leaf = left == TREE_LEAF
    index_of = np.arange(count)
    if not np.array_equal(leaf, right == TREE_LEAF):
        raise ValueError(f"{what} has a node with one child")
    split = ~leaf
    if np.any(
        (left[split] <= index_of[split])
        | (right[split] <= index_of[split])
        | (left[split] >= count)
        | (right[split] >= count)
    ):
        raise ValueError(f"{what} has a child index outside the tree or before its parent")
    if np.any((feature[split] < 0) | (feature[split] >= n_features)) or not np.all(
        np.isfinite(fields["threshold"][split])
    ):
        raise ValueError(f"{what} splits on a feature that does not exist or at a threshold that is not a number")
    if "missing_go_to_left" in fields and np.any(fields["missing_go_to_left"] > 1):
        raise ValueError(f"{what} has a missing-value direction other than left or right")
    values = _array(tree.get("values"), f"{what}'s values", np.float64, (count, 1, n_classes))
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{what} has class values that are negative or not numbers")
    max_features = tree.get("max_features")
    if not isinstance(max_features, int) or not 1 <= max_features <= n_features:
        raise ValueError(f"{what} has max_features {max_features!r}")
    nodes = np.empty(count, dtype)
    for name, array in fields.items():
        nodes[name] = array
    built = Tree(n_features, np.array([n_classes], dtype=np.intp), 1)
    built.__setstate__(
        {"max_depth": _depth(left, right), "node_count": count, "nodes": nodes, "values": np.ascontiguousarray(values)}
    )
    return built, max_features


def rebuild_forest(state: Any) -> RandomForestClassifier:
    """The forest :func:`forest_state` stored, checked first (see the module docstring); ValueError saying what is
    wrong with a damaged or crafted state."""
    if not isinstance(state, dict) or not isinstance(state.get("trees"), list) or not state["trees"]:
        raise ValueError("it holds no trees")
    n_features = state.get("n_features")
    if not isinstance(n_features, int) or not 1 <= n_features <= 1 << 20:
        raise ValueError(f"it has {n_features!r} features")
    classes = state.get("classes")
    if (
        not isinstance(classes, np.ndarray)
        or classes.ndim != 1
        or classes.dtype.kind not in "iu"
        or len(classes) < 2
        or len(np.unique(classes)) != len(classes)
    ):
        raise ValueError("its classes are not distinct integer labels")
    defaults = RandomForestClassifier().get_params()
    stored = state.get("params")
    given = stored if isinstance(stored, dict) else {}
    params = {
        k: v
        for k, v in given.items()
        if k in defaults and k != "verbose" and (v is None or isinstance(v, bool | int | float | str))
    }
    forest = RandomForestClassifier(**{**params, "n_estimators": len(state["trees"])})
    try:
        forest._validate_params()  # scikit-learn's own check of each setting's type and range
    except ValueError as exc:
        raise ValueError(f"its settings are invalid ({str(exc).splitlines()[0][:160]})") from None
    estimators = []
    for index, tree in enumerate(state["trees"]):
        built, max_features = _checked_tree(tree, n_features, len(classes), index)
        estimator = DecisionTreeClassifier(
            **{k: v for k, v in forest.get_params().items() if k in DecisionTreeClassifier().get_params()}
        )
        estimator.tree_, estimator.max_features_ = built, max_features
        estimator.n_features_in_, estimator.n_outputs_ = n_features, 1
        estimator.classes_, estimator.n_classes_ = np.arange(len(classes), dtype=np.float64), np.int64(len(classes))
        estimators.append(estimator)
    forest.estimators_, forest.estimator_ = estimators, DecisionTreeClassifier()
    forest.classes_, forest.n_classes_, forest.n_outputs_, forest.n_features_in_ = (
        classes.copy(),
        len(classes),
        1,
        n_features,
    )
    return forest
