"""Tasks: what a sample asks, how it is prompted, rewarded and scored (``tasks.base.Task``).

Layer: above ``data``, ``rewards`` and ``eval`` (a task's evaluation delegates to ``eval``'s scorers), below ``rl``
(the trainer asks each sample's task for its prompt mode, reward and ground truth). ``eval`` never imports it.

Adding a task: a module here defining ``TASK = Task(...)`` (its prompt mode, its rewards registered in
``rewards.REWARDS``, its ground truth, its scorer), and one line in ``_MODULES`` below.
"""
from __future__ import annotations

from megatron_tr1.errors import ConfigError
from megatron_tr1.tasks import temporal_grounding, videoqa_mc
from megatron_tr1.tasks.base import Task

_MODULES = (temporal_grounding, videoqa_mc)
TASKS: dict[str, Task] = {m.TASK.name: m.TASK for m in _MODULES}
DEFAULT = temporal_grounding.TASK.name


def get_task(name: str, where: str = "task") -> Task:
    """The task called ``name``; ``ConfigError`` naming ``where`` and the choices otherwise."""
    if name not in TASKS:
        raise ConfigError(f"{where}: unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def task_for_format(fmt: str) -> str:
    """The default task (``task: auto``) of an annotation format."""
    for task in TASKS.values():
        if fmt in task.formats:
            return task.name
    return DEFAULT


def check_tasks(samples, where: str = "data config") -> dict[str, int]:
    """Samples per task; ``ConfigError`` naming ``where``, the sample and the choices for an unknown task (a data
    config's ``task:``)."""
    counts: dict[str, int] = {}
    for s in samples:
        if s.task not in TASKS:
            raise ConfigError(f"{where}: sample {s.id} has task {s.task!r}, which is not one of {', '.join(TASKS)} "
                              "(datasets[].task)")
        counts[s.task] = counts.get(s.task, 0) + 1
    return counts


__all__ = ["TASKS", "DEFAULT", "Task", "check_tasks", "get_task", "task_for_format"]
