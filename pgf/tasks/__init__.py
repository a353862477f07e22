"""Tasks: what a model is trained to do (`config.task`), one module each.

A task knows its data pipeline, how to build the model for it, the model's
inputs, the loss, the evaluation sums and the examples it writes; the train
loop (`pgf.train`, `pgf.step`) knows none of that. `config.task` names the
module `pgf.tasks.<task>`, which defines `TASK`, a `pgf.tasks.base.Task`
subclass: adding a task is adding its module.
"""

import importlib
import pkgutil

from pgf.tasks.base import Task
from pgf.tasks.base import mean_of_sums

_NOT_TASKS = ('base',)


def available() -> tuple[str, ...]:
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if m.name not in _NOT_TASKS and not
                      m.name.startswith('_')))


def task_class(name: str) -> type[Task]:
  """The Task class of `config.task`; ValueError naming the choices."""
  if name not in available():
    raise ValueError(f'task={name!r} is not a task; choose one of '
                     f'{available()}.')
  return importlib.import_module(f'pgf.tasks.{name}').TASK


def get_task(config, info) -> Task:
  """The task of `config`, for a dataset described by `info`."""
  return task_class(config.task)(config, info)
