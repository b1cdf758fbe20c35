"""Tasks: each wires data, model, loss, metrics and post-processing for one kind of problem.

Each task is a folder: ``config.py`` (its settings), ``task.py`` (its :class:`deepscope.engine.task.Task`), and where it
has them ``predict.py``, ``report.py`` and ``commands.py`` (its command-line flags). Tasks are imported when asked for,
by name, so a command pays only for its own task's imports (detection pulls in torchvision's detection models, which
take seconds to import), and a task that builds on another (``pixel deep`` trains segment's U-Net) asks for it here
instead of importing it: tasks do not import each other.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from deepscope.errors import DeepscopeError

if TYPE_CHECKING:
    from deepscope.config import TrainConfig
    from deepscope.engine.task import Task
    from deepscope.tasks.options import TaskCommands

# tasks trained by ``deepscope train TASK``: name -> (module, config class, task class)
TASKS: dict[str, tuple[str, str, str]] = {
    "classify": ("deepscope.tasks.classify.task", "ClassifyConfig", "ClassifyTask"),
    "denoise": ("deepscope.tasks.denoise.task", "DenoiseConfig", "DenoiseTask"),
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


def task_commands(name: str) -> TaskCommands:
    """The command-line declarations of task ``name`` (``tasks/<name>/commands.py``; imports neither torch nor the task)."""
    return importlib.import_module(f"deepscope.tasks.{name}.commands").COMMANDS
