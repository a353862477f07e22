"""What differs between vision and language: the model's inputs, the loss
and the evaluation sums. Everything else (the loop, sharding, sparsity,
checkpoints, metrics) is shared in pgf.train.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgf.models import get_model_module

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class Classification:
  """Image classification (ViT, SwinV2): batches {'image', 'label'}."""

  def __init__(self, config, info):
    self.config = config
    self.info = info
    self.module = get_model_module(config.model.name)

  def build_model(self, sparsity) -> nn.Module:
    return self.module.build(self.config.model,
                             num_classes=self.config.model.num_classes,
                             sparsity=sparsity)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    shape, _ = self.info.train_spec['image']
    return {'image': np.zeros((batch_size, *shape), np.float32)}

  def apply(self, model, variables, batch, *, train, rngs=None,
            mutable=False):
    return model.apply(variables, batch['image'], train=train, rngs=rngs,
                       mutable=mutable)

  def loss(self, logits: jax.Array, batch) -> tuple[jax.Array, dict]:
    """Mean loss over the batch and its metrics; labels [B, C] (soft)."""
    labels = batch['label']
    c = self.config
    smooth = labels * (1 - c.label_smoothing) + (
        c.label_smoothing / labels.shape[-1])
    logits = logits.astype(jnp.float32)
    if c.loss == 'sigmoid_xent':
      # timm's BinaryCrossEntropy (the authors' recipe): mean over B x C.
      loss = optax.sigmoid_binary_cross_entropy(logits, smooth).mean()
    else:
      loss = optax.softmax_cross_entropy(logits, smooth).mean()
    acc = (logits.argmax(-1) == labels.argmax(-1)).mean()
    return loss, {'loss': loss, 'accuracy': acc}

  def eval_sums(self, logits, batch) -> dict[str, jax.Array]:
    """Per-batch sums; `mask` drops the padding of the last batch."""
    mask = batch['mask']
    logits = logits.astype(jnp.float32)
    labels = batch['label']
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if self.config.loss == 'sigmoid_xent':
      loss = optax.sigmoid_binary_cross_entropy(logits, onehot).mean(-1)
    else:
      loss = optax.softmax_cross_entropy(logits, onehot)
    correct = logits.argmax(-1) == labels
    k = min(5, logits.shape[-1])
    top5 = (jax.lax.top_k(logits, k)[1] == labels[:, None]).any(-1)
    return {'loss': (loss * mask).sum(), 'accuracy': (correct * mask).sum(),
            'top5_accuracy': (top5 * mask).sum(), 'count': mask.sum()}

  def eval_examples(self, model, variables, batch, workdir: str,
                    step: int) -> None:
    del model, variables, batch, workdir, step


class SpanCorruption:
  """T5 span-corruption pretraining: T5X feature names."""

  SEGMENT_KEYS = ('encoder_segment_ids', 'decoder_segment_ids',
                  'encoder_positions', 'decoder_positions')

  def __init__(self, config, info):
    self.config = config
    self.info = info
    self.module = get_model_module(config.model.name)
    if config.model.vocab_size < info.vocab_size:
      raise ValueError(
          f'model.vocab_size={config.model.vocab_size} is smaller than the '
          f'vocabulary of data.vocab={config.data.vocab!r} '
          f'({info.vocab_size} ids).')

  def build_model(self, sparsity) -> nn.Module:
    return self.module.build(self.config.model,
                             vocab_size=self.config.model.vocab_size,
                             sparsity=sparsity)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    d = self.config.data
    return {'encoder_input_tokens': np.ones((batch_size, d.inputs_length),
                                            np.int32),
            'decoder_input_tokens': np.ones((batch_size, d.targets_length),
                                            np.int32)}

  def apply(self, model, variables, batch, *, train, rngs=None,
            mutable=False):
    extra = {k: batch[k] for k in self.SEGMENT_KEYS if k in batch}
    return model.apply(variables, batch['encoder_input_tokens'],
                       batch['decoder_input_tokens'], train=train, rngs=rngs,
                       mutable=mutable, **extra)

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

  def eval_sums(self, logits, batch):
    loss, correct, w = self._token_terms(logits, batch)
    w = w * batch['mask'][:, None]
    return {'loss': (loss * w).sum(), 'accuracy': (correct * w).sum(),
            'count': w.sum()}

  def eval_examples(self, model, variables, batch, workdir: str,
                    step: int) -> None:
    """Greedy-decodes a few validation inputs into workdir/eval_examples."""
    n = self.config.num_eval_examples
    if not n:
      return
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


def get_task(config, info) -> Classification | SpanCorruption:
  return (SpanCorruption if config.model.name == 't5' else Classification)(
      config, info)


def mean_of_sums(sums: Mapping[str, float]) -> dict[str, float]:
  count = max(float(sums['count']), 1.0)
  return {k: float(v) / count for k, v in sums.items() if k != 'count'}
