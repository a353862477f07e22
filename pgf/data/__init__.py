"""Input pipelines: TFDS datasets (array_record) read by grain.

Two pipelines with the same four functions: `pgf.data.images` for the vision
models and `pgf.data.text` for T5. The functions here forward to the one that
`config.model.name` selects; `pgf.data.text` is imported only for T5.

  check_available(config)      fails fast, naming the dataset and how to
                               prepare it (pgf's own datasets are prepared
                               on the spot);
  dataset_info(config)         -> DataInfo, before any data is read;
  make_train_iterator(config, *, global_batch_size, process_index,
                      process_count)
                               infinite, sharded per process, with
                               get_state()/set_state() for checkpoints;
  make_eval_iterable(config, *, global_batch_size, process_index,
                     process_count)
                               one pass over the eval split, padded, with a
                               'mask'.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Iterable

import numpy as np

Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the trainer needs to know about the data before reading any.

  train_spec / eval_spec: feature name -> (shape, dtype) of one processed
  example; batches add a leading batch axis.
  """
  num_train_examples: int
  num_eval_examples: int
  num_classes: int
  train_spec: Spec
  eval_spec: Spec
  vocab_size: int = 0  # Text datasets: ids of the vocabulary.


class DatasetNotPreparedError(ValueError):
  """The dataset is not prepared in data.data_dir (the message says how)."""


# Published sizes, so a dry run can describe a run whose data is not
# prepared on this machine: (train, eval) examples and classes (TFDS catalog).
PUBLISHED = {
    'imagenet2012': (1_281_167, 50_000, 1000),
    'cifar10': (50_000, 10_000, 10),
    'cifar100': (50_000, 10_000, 100),
    'c4/en': (364_868_892, 364_608, 0),
}


def published_info(config) -> DataInfo | None:
  """DataInfo from published sizes, without the data (None if unknown)."""
  name = config.data.name.split(':')[0]
  if name not in PUBLISHED:
    return None
  return _module(config).published_info(config, *PUBLISHED[name])


def _module(config) -> ModuleType:
  name = 'pgf.data.text' if config.model.name == 't5' else 'pgf.data.images'
  return importlib.import_module(name)


def check_available(config) -> None:
  """Raises DatasetNotPreparedError (a ValueError) when data is missing."""
  _module(config).check_available(config)


def dataset_info(config) -> DataInfo:
  return _module(config).dataset_info(config)


def make_train_iterator(config, *, global_batch_size: int, process_index: int,
                        process_count: int) -> Any:
  return _module(config).make_train_iterator(
      config, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count)


def make_eval_iterable(config, *, global_batch_size: int, process_index: int,
                       process_count: int) -> Iterable[dict[str, np.ndarray]]:
  return _module(config).make_eval_iterable(
      config, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count)
