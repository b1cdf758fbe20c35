"""Model construction by name, with a clear error for unknown names or arguments."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, cast

from torch import nn

from deepscope.errors import DeepscopeError
from deepscope.models import classifiers
from deepscope.models.resnet import resnet18
from deepscope.models.unet import UNet

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": classifiers.LogisticRegression,
    "mlp": classifiers.MLP,
    "cnn": classifiers.SmallCNN,
    "resnet18": resnet18,
    "fastnet": classifiers.FastNet,
}


def model_names() -> list[str]:
    return sorted(_MODELS)


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The class or function :func:`build_model` builds model ``name`` with (called ``(in_shape, num_classes,
    **kwargs)``), for an export's architecture description."""
    if name not in _MODELS:
        raise DeepscopeError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    return _MODELS[name]


def construct_model(
    name: str, factory: Callable[..., nn.Module], args: tuple, positional: set[str], kwargs: dict[str, Any]
) -> nn.Module:
    """``factory(*args, **kwargs)`` with unknown keyword names and invalid values reported as one-line errors."""
    allowed = set(inspect.signature(factory).parameters) - positional
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise DeepscopeError(
            f"model {name!r} has no argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(allowed)) or 'none'}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return factory(*args, **kwargs)
    except ValueError as exc:
        raise DeepscopeError(f"model {name!r}: {exc}") from None


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate classifier ``name`` for inputs of ``in_shape`` (C, H, W) and ``num_classes`` outputs."""
    if name not in _MODELS:
        raise DeepscopeError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    return construct_model(name, _MODELS[name], (tuple(in_shape), num_classes), {"in_shape", "num_classes"}, kwargs)


def build_unet(in_channels: int, out_channels: int, dim: int, **kwargs: Any) -> UNet:
    """A 2D or 3D U-Net; ``kwargs`` are UNet's settings (depth, features, norm, upsample, pool)."""
    return cast(
        UNet,
        construct_model(
            "unet",
            UNet,
            (in_channels, out_channels, dim),
            {"in_channels", "out_channels", "dim", "final_activation"},
            kwargs,
        ),
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then every submodule back in the mode it had (a wrapper built just for
    inference, e.g. ``nn.Sequential(model, activation)``, must not switch a frozen inner model back to training)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.train(training)
