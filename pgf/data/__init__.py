"""Input pipelines: TFDS datasets (array_record) read by grain.

Each task names its pipeline module (`pgf.tasks.<task>.TASK.pipeline`):
`pgf.data.images` for classification, `pgf.data.text` for T5 span
corruption. Every pipeline module has the same functions:

  check_available(config)      fails fast, naming the dataset and how to
                               prepare it (pgf's own datasets are prepared
                               on the spot);
  dataset_info(config)         -> DataInfo, before any data is read;
  published_info(config, num_train, num_eval, num_classes)
                               -> DataInfo from published sizes (dry runs);
  make_train_iterator(config, *, global_batch_size, process_index,
                      process_count)
                               infinite, with get_state()/set_state() (JSON-
                               able dicts) for checkpoints; the global batch
                               of every step is the same for any number of
                               processes (pgf.data.order);
  make_eval_iterable(config, *, global_batch_size, process_index,
                     process_count)
                               one pass over the eval split, padded, with a
                               'mask'.
"""

from __future__ import annotations

import dataclasses

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


def published_counts(name: str) -> tuple[int, int, int] | None:
  """(train, eval, classes) of a dataset from published sizes, or None."""
  return PUBLISHED.get(name.split(':')[0])


def data_seed(config) -> int:
  """The seed of the data order: data.shuffle_seed, or config.seed if -1."""
  return config.data.shuffle_seed if config.data.shuffle_seed >= 0 else (
      config.seed)
