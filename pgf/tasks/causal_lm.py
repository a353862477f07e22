"""Causal language modelling: next-token prediction (GPT-2; pgf.models.gpt).

Data: the documents of `data.name` (data.text_key, any TFDS text dataset in
array_record format; pgf_pydoc and pgf_python_docs built in), tokenized with
data.vocab ('byte' by default, or 'sentencepiece'), concatenated with EOS
after each document and split into rows of data.targets_length + 1 tokens
(pgf.data.text, the causal-LM section): 'decoder_input_tokens' [L],
'decoder_target_tokens' [L] (the next tokens), 'decoder_loss_weights' [L].

Loss: mean next-token cross-entropy over the weighted targets (float32
logits), plus T5X's z-loss `z_loss * log(Z)^2` when z_loss > 0 (PaLM uses it
for decoder-only models; GPT-2 does not). Metrics: train/loss (the
objective), train/accuracy; eval/loss (cross-entropy alone, nats per token),
eval/accuracy (arg-max equals the target) and eval/perplexity =
exp(eval/loss), which `eval_metrics` adds to the evaluation means (a mean of
per-token sums cannot give it).

Examples: after each evaluation, the first data.targets_length // 2 tokens
of `num_eval_examples` validation rows are continued greedily (no KV cache)
for the rest of the row; workdir/eval_examples/step_<n>.txt holds prompt,
target and prediction, EOS shown as '<eos>'.
"""

from __future__ import annotations

import math
import os
import types

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgf.data import text
from pgf.data import vocab as vocab_lib
from pgf.models import get_model_module
from pgf.tasks import base

# The pipeline interface of pgf/data/__init__.py, served by the causal-LM
# functions of pgf.data.text.
PIPELINE = types.SimpleNamespace(
    check_available=text.lm_check_available,
    dataset_info=text.lm_dataset_info,
    published_info=text.lm_published_info,
    make_train_iterator=text.make_lm_train_iterator,
    make_eval_iterable=text.make_lm_eval_iterable)

EOS_MARK = '<eos>'


class CausalLM(base.Task):
  """Next-token prediction on concatenated documents (module docstring)."""

  name = 'causal_lm'
  pipeline = PIPELINE

  VOCABS = ('byte', 'sentencepiece')

  @classmethod
  def validate(cls, config) -> None:
    super().validate(config)
    d = config.data
    if d.vocab not in cls.VOCABS:
      raise ValueError(f'data.vocab={d.vocab!r} is not allowed; choose one '
                       f'of {cls.VOCABS}.')
    length = d.targets_length
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
      raise ValueError(f'data.targets_length={length!r} (the causal-LM row '
                       'length) must be a positive integer.')
    max_len = get_model_module(config.model.name).decode_variant(
        config.model.variant).get('max_len')
    if max_len is not None and length > max_len:
      raise ValueError(
          f'data.targets_length={length} exceeds the {max_len} positions of '
          f'model.variant={config.model.variant!r}; allowed: 1..{max_len}.')
    if d.pack:
      raise ValueError('data.pack=True is not allowed for task='
                       "'causal_lm': its rows are concatenated documents, "
                       'already full; set data.pack=False.')
    if config.z_loss < 0:
      raise ValueError(f'z_loss={config.z_loss} must be >= 0.')
    n = config.num_eval_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise ValueError(f'num_eval_examples={n!r} must be an integer >= 0.')

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
    return {'decoder_input_tokens': np.ones(
        (batch_size, self.config.data.targets_length), np.int32)}

  def model_inputs(self, batch):
    return (batch['decoder_input_tokens'],), {}

  def _token_terms(self, logits, batch):
    """Per-token cross-entropy, z-loss, correctness and weights [B, L]."""
    logits = logits.astype(jnp.float32)
    targets = batch['decoder_target_tokens']
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    z = jnp.zeros_like(xent)
    if self.config.z_loss:
      z = self.config.z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    correct = logits.argmax(-1) == targets
    return xent, z, correct, batch['decoder_loss_weights']

  def loss(self, logits, batch):
    xent, z, correct, w = self._token_terms(logits, batch)
    denom = jnp.maximum(w.sum(), 1.0)
    mean = ((xent + z) * w).sum() / denom
    return mean, {'loss': mean, 'accuracy': (correct * w).sum() / denom}

  def eval_sums(self, logits, batch):
    """Sums over the weighted target tokens of the real rows."""
    xent, _, correct, w = self._token_terms(logits, batch)
    w = w * batch['mask'][:, None]
    return {'loss': (xent * w).sum(), 'accuracy': (correct * w).sum(),
            'count': w.sum()}

  def eval_metrics(self, means: dict[str, float]) -> dict[str, float]:
    """The evaluation means plus perplexity = exp(mean cross-entropy)."""
    return {**means, 'perplexity': math.exp(means['loss'])}

  def eval_examples(self, model, hard_params, batch, workdir: str,
                    step: int) -> None:
    """Greedy continuations of validation rows into workdir/eval_examples."""
    n = self.config.num_eval_examples
    if not n:
      return
    inputs = np.asarray(batch['decoder_input_tokens'])
    prompt_len = max(inputs.shape[1] // 2, 1)
    if prompt_len == inputs.shape[1]:
      return  # Rows of one token leave nothing to continue.
    # Rows whose prompt is all text (not the padded last row of the split).
    rows = np.flatnonzero((np.asarray(batch['mask']) > 0)
                          & (inputs[:, :prompt_len] > 0).all(1))[:n]
    if not len(rows):
      return
    prompts = inputs[rows, :prompt_len]
    truth = inputs[rows, prompt_len:]
    decoded = np.asarray(self.module.greedy_decode(
        model, {'params': hard_params()}, jnp.asarray(prompts),
        max_new_tokens=truth.shape[1], eos_id=vocab_lib.EOS_ID))
    vocab = vocab_lib.get_vocabulary(self.config)
    path = os.path.join(workdir, 'eval_examples', f'step_{step}.txt')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      for i in range(len(rows)):
        f.write(f'prompt:     {render(vocab, prompts[i])!r}\n'
                f'target:     {render(vocab, truth[i])!r}\n'
                f'prediction: {render(vocab, decoded[i])!r}\n\n')
    logging.info('Wrote %d greedy continuations to %s', len(rows), path)


def render(vocab: vocab_lib.Vocabulary, ids) -> str:
  """Text of token ids, EOS shown as '<eos>', padding (0) dropped."""
  ids = [int(i) for i in ids if int(i) != vocab.pad_id]
  pieces, run = [], []
  for i in ids + [vocab.eos_id]:
    if i == vocab.eos_id:
      pieces.append(vocab.decode(run))
      run = []
    else:
      run.append(i)
  return EOS_MARK.join(pieces)


TASK = CausalLM
