"""The interface every task implements (see pgf/tasks/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import types
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from pgf.models import get_model_module


class Task:
  """One training objective: its data, model inputs, loss and evaluation.

  Class attributes:
    name: the `config.task` value.
    pipeline: the data module or namespace (`pgf.data.images`,
      `pgf.data.text`, ...) with
      check_available(config), dataset_info(config), published_info(config,
      num_train, num_eval, num_classes), make_train_iterator(config, *,
      global_batch_size, process_index, process_count) and
      make_eval_iterable(...).
  """

  name: str = ''
  pipeline: types.ModuleType = None

  def __init__(self, config, info):
    self.config = config
    self.info = info
    self.module = get_model_module(config.model.name)

  @classmethod
  def validate(cls, config) -> None:
    """Checks the task's own settings; no data, no devices."""
    module = get_model_module(config.model.name)
    tasks = getattr(module, 'TASKS', ())
    if cls.name not in tasks:
      raise ValueError(
          f'task={cls.name!r} cannot train model.name={config.model.name!r}, '
          f'which does {tasks}.')

  # -- the model -------------------------------------------------------------

  def build_model(self, sparsity) -> nn.Module:
    """The model with the static SparsityPlan `sparsity` (None: dense)."""
    raise NotImplementedError

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of zeros with the shapes of the model's training inputs."""
    raise NotImplementedError

  def model_inputs(self, batch: Mapping) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of model.apply for `batch`."""
    raise NotImplementedError

  def init(self, model: nn.Module, rng: jax.Array, batch: Mapping):
    args, kwargs = self.model_inputs(batch)
    return model.init(rng, *args, train=False, **kwargs)

  def apply(self, model: nn.Module, variables, batch: Mapping, *,
            train: bool, rngs=None, mutable=False):
    args, kwargs = self.model_inputs(batch)
    return model.apply(variables, *args, train=train, rngs=rngs,
                       mutable=mutable, **kwargs)

  # -- training and evaluation (inside jit) ----------------------------------

  def augment(self, batch: Mapping, rng: jax.Array) -> Mapping:
    """Batch-level augmentation on the device (global batch), e.g. mixup;
    the identity by default."""
    del rng
    return batch

  def loss(self, outputs, batch: Mapping) -> tuple[jax.Array, dict]:
    """(mean loss, {metric name: value}) of a training batch; metric names
    are written as 'train/<name>'."""
    raise NotImplementedError

  def eval_sums(self, outputs, batch: Mapping) -> dict[str, jax.Array]:
    """Sums over the real examples of an evaluation batch ('mask' drops the
    padding); one of them is 'count'. Means are written as 'eval/<name>'."""
    raise NotImplementedError

  # -- host side ---------------------------------------------------------------

  def eval_metrics(self, means: dict[str, float]) -> dict[str, float]:
    """Evaluation metrics from the means of `eval_sums` (e.g. perplexity from
    the loss); the means themselves by default."""
    return means

  def eval_examples(self, model: nn.Module,
                    hard_params: Callable[[], Any], batch: Mapping,
                    workdir: str, step: int) -> None:
    """Writes examples of the model's outputs (e.g. decoded text) after an
    evaluation; `hard_params()` returns the hard-masked parameters (fetched
    only if called). Nothing by default."""
    del model, hard_params, batch, workdir, step


def mean_of_sums(sums: Mapping[str, float]) -> dict[str, float]:
  """Evaluation means from accumulated `eval_sums`: each sum divided by its
  own '<name>_count' if the task gives one, else by 'count'."""
  out = {}
  for k, v in sums.items():
    if k == 'count' or k.endswith('_count'):
      continue
    count = max(float(sums.get(f'{k}_count', sums['count'])), 1.0)
    out[k] = float(v) / count
  return out
