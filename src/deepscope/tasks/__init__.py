"""Tasks: each wires data, model, loss, metrics and post-processing for one kind of problem."""

from __future__ import annotations

from deepscope.config import TrainConfig
from deepscope.engine.task import Task
from deepscope.errors import DeepscopeError
from deepscope.tasks.classify import ClassifyConfig, ClassifyTask
from deepscope.tasks.denoise import DenoiseTask
from deepscope.tasks.denoise_config import DenoiseConfig
from deepscope.tasks.segment import SegmentConfig, SegmentTask

TASKS: dict[str, tuple[type[TrainConfig], type[Task]]] = {
    "classify": (ClassifyConfig, ClassifyTask),
    "denoise": (DenoiseConfig, DenoiseTask),
    "segment": (SegmentConfig, SegmentTask),
}


def get_task(name: str) -> tuple[type[TrainConfig], type[Task]]:
    if name not in TASKS:
        raise DeepscopeError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
