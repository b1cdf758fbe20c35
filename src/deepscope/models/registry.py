"""Model construction by name, with a clear error for unknown names or arguments."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from deepscope.errors import DeepscopeError
from deepscope.models import classifiers

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": classifiers.LogisticRegression,
    "mlp": classifiers.MLP,
    "cnn": classifiers.SmallCNN,
    "resnet18": classifiers.resnet18,
    "fastnet": classifiers.FastNet,
}


def model_names() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate model ``name`` for inputs of ``in_shape`` (C, H, W) and ``num_classes`` outputs."""
    if name not in _MODELS:
        raise DeepscopeError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    factory = _MODELS[name]
    allowed = set(inspect.signature(factory).parameters) - {"in_shape", "num_classes"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise DeepscopeError(f"model {name!r} has no argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(allowed)) or 'none'}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return factory(tuple(in_shape), num_classes, **kwargs)
    except ValueError as exc:
        raise DeepscopeError(f"model {name!r}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
