"""T5 span-corruption pretraining (T5X feature names; pgf.data.text)."""

from __future__ import annotations

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgf.data import text
from pgf.tasks import base


class SpanCorruption(base.Task):
  """T5 span-corruption pretraining: T5X feature names (pgf.data.text)."""

  name = 'span_corruption'
  pipeline = text

  SEGMENT_KEYS = ('encoder_segment_ids', 'decoder_segment_ids',
                  'encoder_positions', 'decoder_positions')

  @classmethod
  def validate(cls, config) -> None:
    super().validate(config)
    d = config.data
    if d.vocab not in ('byte', 'sentencepiece'):
      raise ValueError(f'data.vocab={d.vocab!r} is not allowed; choose one '
                       "of ('byte', 'sentencepiece').")
    for key in ('inputs_length', 'targets_length'):
      if not isinstance(d[key], int) or d[key] < 1:
        raise ValueError(f'data.{key}={d[key]!r} must be a positive integer.')
    if not 0 < d.noise_density < 1:
      raise ValueError(f'data.noise_density={d.noise_density} must lie in '
                       '(0, 1).')
    if not d.mean_noise_span_length > 0:
      raise ValueError(f'data.mean_noise_span_length='
                       f'{d.mean_noise_span_length} must be > 0.')
    if config.z_loss < 0:
      raise ValueError(f'z_loss={config.z_loss} must be >= 0.')

  def __init__(self, config, info):
    super().__init__(config, info)
    if config.model.vocab_size < info.vocab_size:
      raise ValueError(
          f'model.vocab_size={config.model.vocab_size} is smaller than the '
          f'vocabulary of data.vocab={config.data.vocab!r} '
          f'({info.vocab_size} ids).')

  def build_model(self, sparsity):
    return self.module.build(self.config.model,
                             vocab_size=self.config.model.vocab_size,
                             sparsity=sparsity)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    d = self.config.data
    return {'encoder_input_tokens': np.ones((batch_size, d.inputs_length),
                                            np.int32),
            'decoder_input_tokens': np.ones((batch_size, d.targets_length),
                                            np.int32)}

  def model_inputs(self, batch):
    extra = {k: batch[k] for k in self.SEGMENT_KEYS if k in batch}
    return (batch['encoder_input_tokens'], batch['decoder_input_tokens']), extra

  def _token_terms(self, logits, batch):
    logits = logits.astype(jnp.float32)
    targets = batch['decoder_target_tokens']
    weights = batch['decoder_loss_weights']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if self.config.z_loss:
      # T5X's auxiliary z-loss keeps the softmax normaliser near 1.
      log_z = jax.nn.logsumexp(logits, axis=-1)
      loss = loss + self.config.z_loss * jnp.square(log_z)
    correct = logits.argmax(-1) == targets
    return loss, correct, weights

  def loss(self, logits, batch):
    loss, correct, w = self._token_terms(logits, batch)
    denom = jnp.maximum(w.sum(), 1.0)
    mean = (loss * w).sum() / denom
    return mean, {'loss': mean, 'accuracy': (correct * w).sum() / denom}

  @functools.cached_property
  def base_vocab_size(self) -> int:
    """Ids below this are text; the sentinels sit above it (read when first
    needed, so a dry run needs no vocabulary file)."""
    from pgf.data import vocab as vocab_lib  # Text-only dependency.
    return vocab_lib.get_vocabulary(self.config).base_vocab_size

  def eval_sums(self, logits, batch):
    """Sums over target tokens; 'text_accuracy' counts only the tokens of
    the masked text (not sentinels, EOS or padding), the part a model can
    only predict by modelling language."""
    loss, correct, w = self._token_terms(logits, batch)
    w = w * batch['mask'][:, None]
    targets = batch['decoder_target_tokens']
    text = w * ((targets > 1) & (targets < self.base_vocab_size))
    return {'loss': (loss * w).sum(), 'accuracy': (correct * w).sum(),
            'count': w.sum(), 'text_accuracy': (correct * text).sum(),
            'text_accuracy_count': text.sum()}

  def eval_examples(self, model, hard_params, batch, workdir: str,
                    step: int) -> None:
    """Greedy-decodes a few validation inputs into workdir/eval_examples."""
    n = self.config.num_eval_examples
    if not n:
      return
    variables = {'params': hard_params()}
    from pgf.data import vocab as vocab_lib  # Text-only dependency.
    vocab = vocab_lib.get_vocabulary(self.config)
    inputs = np.asarray(batch['encoder_input_tokens'])[:n]
    targets = np.asarray(batch['decoder_target_tokens'])[:n]
    decoded = np.asarray(self.module.greedy_decode(
        model, variables, jnp.asarray(inputs),
        max_length=self.config.data.targets_length, eos_id=vocab.eos_id))
    path = os.path.join(workdir, 'eval_examples', f'step_{step}.txt')
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def text(ids):
      ids = [int(i) for i in ids]
      if vocab.eos_id in ids:
        ids = ids[:ids.index(vocab.eos_id)]
      return vocab.decode([i for i in ids if i > 0])

    with open(path, 'w') as f:
      for i in range(len(inputs)):
        f.write(f'input:      {text(inputs[i])!r}\n'
                f'target:     {text(targets[i])!r}\n'
                f'prediction: {text(decoded[i])!r}\n\n')
    logging.info('Wrote %d decoded examples to %s', len(inputs), path)


TASK = SpanCorruption
