"""Model zoo: build a network by name (see :func:`build_model`)."""

from deepscope.models.registry import build_model, build_unet, count_parameters, eval_mode, model_names

__all__ = ["build_model", "build_unet", "count_parameters", "eval_mode", "model_names"]
