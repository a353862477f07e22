"""Tasks: the registry, evaluation sums on hand-made batches."""

import jax
import numpy as np
import pytest

from pgf import tasks
from pgf.configs import t5_base
from pgf.data import DataInfo
from pgf.data import vocab as vocab_lib


def test_registry_lists_task_modules():
  assert {'classification', 'span_corruption'} <= set(tasks.available())
  assert tasks.task_class('classification').name == 'classification'
  with pytest.raises(ValueError, match=r"task='nope' is not a task; choose "
                     r"one of \("):
    tasks.task_class('nope')


def test_mean_of_sums_uses_each_metrics_own_count():
  sums = {'loss': 6.0, 'accuracy': 3.0, 'count': 4.0, 'text_accuracy': 1.0,
          'text_accuracy_count': 2.0}
  assert tasks.mean_of_sums(sums) == {'loss': 1.5, 'accuracy': 0.75,
                                      'text_accuracy': 0.5}


def test_span_corruption_text_accuracy_ignores_sentinels_and_eos():
  c = t5_base.get_config('dense,runlocal')
  vocab = vocab_lib.get_vocabulary(c)
  info = DataInfo(num_train_examples=1, num_eval_examples=1, num_classes=0,
                  train_spec={}, eval_spec={}, vocab_size=vocab.vocab_size)
  task = tasks.get_task(c, info)
  s0, s1 = vocab.sentinel_id(0), vocab.sentinel_id(1)
  a, b, d = (vocab.encode(ch)[0] for ch in 'abd')
  targets = np.array([[s0, a, b, s1, d, 1, 0, 0]], np.int32)
  # Predictions: both sentinels and EOS right (easy), one of the three text
  # bytes right; the two padding positions predicted wrong but weightless.
  pred = np.array([[s0, a, d, s1, a, 1, 5, 5]])
  logits = jax.nn.one_hot(pred, c.model.vocab_size) * 10.0
  batch = {'decoder_target_tokens': targets,
           'decoder_loss_weights': (targets > 0).astype(np.float32),
           'mask': np.ones(1, np.float32)}
  sums = jax.device_get(task.eval_sums(logits, batch))
  means = tasks.mean_of_sums(sums)
  assert sums['count'] == 6 and sums['text_accuracy_count'] == 3
  assert means['accuracy'] == pytest.approx(4 / 6)
  assert means['text_accuracy'] == pytest.approx(1 / 3)
