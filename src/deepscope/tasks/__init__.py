"""Tasks: each wires data, model, loss, metrics and post-processing for one kind of problem.

Tasks are imported when asked for, so a command pays only for its own task's imports (detection pulls in
torchvision's detection models, which take seconds to import).
"""

from __future__ import annotations

import importlib

from deepscope.config import TrainConfig
from deepscope.engine.task import Task
from deepscope.errors import DeepscopeError

# task name -> (module, config class, task class)
TASKS: dict[str, tuple[str, str, str]] = {
    "classify": ("deepscope.tasks.classify", "ClassifyConfig", "ClassifyTask"),
    "denoise": ("deepscope.tasks.denoise", "DenoiseConfig", "DenoiseTask"),
    "detect": ("deepscope.tasks.detect.task", "DetectConfig", "DetectTask"),
    "segment": ("deepscope.tasks.segment.task", "SegmentConfig", "SegmentTask"),
    "ssl": ("deepscope.tasks.ssl.task", "SSLConfig", "SSLTask"),
}


def get_task(name: str) -> tuple[type[TrainConfig], type[Task]]:
    if name not in TASKS:
        raise DeepscopeError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    module_name, config_name, task_name = TASKS[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, task_name)
