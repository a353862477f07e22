"""Causal language modelling: the LM rows of pgf.data.text, the causal_lm
task, configs/gpt_small.py and training end to end on pgf_pydoc."""

import json
import math
import os
import subprocess
import sys

import grain.python as grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pgf import config_lib
from pgf import tasks
from pgf import train as train_lib
from pgf.configs import gpt_small
from pgf.data import DataInfo
from pgf.data import text
from pgf.data import text_builders
from pgf.data import vocab as vocab_lib
from pgf.sparsity import recipes
from pgf.tasks import causal_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = vocab_lib.ByteVocabulary()
EOS = BYTES.eos_id


def ids(s):
  return BYTES.encode(s)


def lm_config(data_dir, **data):
  c = gpt_small.get_config('dense,runlocal')
  c.data.data_dir = data_dir
  c.data.update(data)
  return c


def rows_of(documents, length):
  source = grain.MapDataset.source([{'text': d} for d in documents])
  return [{k: v.tolist() for k, v in r.items()}
          for r in text.lm_rows(source, BYTES, text_key='text',
                                length=length)]


def row_tokens(row):
  """The L + 1 real tokens a row was cut from: its first input, then its
  weighted targets."""
  inputs, targets = row['decoder_input_tokens'], row['decoder_target_tokens']
  weights = np.asarray(row['decoder_loss_weights']) > 0
  return [int(inputs[0])] + [int(t) for t in np.asarray(targets)[weights]]


# ---- LM rows -----------------------------------------------------------------

def test_lm_rows_hand_made_documents():
  a, b, c, d, e, f = ids('abcdef')
  # Stream: a b EOS c d e EOS f EOS (the empty document is skipped), cut
  # into rows of L + 1 = 4: [a b EOS c] [d e EOS f] [EOS]; the last row has
  # no target and is dropped.
  assert rows_of(['ab', 'cde', '', 'f'], 3) == [
      {'decoder_input_tokens': [a, b, EOS],
       'decoder_target_tokens': [b, EOS, c],
       'decoder_loss_weights': [1, 1, 1]},
      {'decoder_input_tokens': [d, e, EOS],
       'decoder_target_tokens': [e, EOS, f],
       'decoder_loss_weights': [1, 1, 1]}]
  # A document longer than a row runs on into the next; the stream's last
  # row is padded with 0, its padding weightless.
  g, h, i = ids('ghi')
  assert rows_of(['abcdefg', 'hi'], 3) == [
      {'decoder_input_tokens': [a, b, c],
       'decoder_target_tokens': [b, c, d],
       'decoder_loss_weights': [1, 1, 1]},
      {'decoder_input_tokens': [e, f, g],
       'decoder_target_tokens': [f, g, EOS],
       'decoder_loss_weights': [1, 1, 1]},
      {'decoder_input_tokens': [h, i, EOS],
       'decoder_target_tokens': [i, EOS, 0],
       'decoder_loss_weights': [1, 1, 0]}]


def test_lm_rows_take_documents_whole():
  # No 65,536-token chunking (span corruption's select_random_chunk): a
  # long document's rows hold all of it.
  doc = ''.join(chr(97 + k % 26) for k in range(70_000))
  rows = rows_of([doc], 1023)
  assert sum(map(row_tokens, rows), []) == ids(doc) + [EOS]


def test_lm_train_batches(data_dir):
  c = lm_config(data_dir)
  info = text.lm_dataset_info(c)
  assert (info.num_train_examples, info.num_classes, info.vocab_size) == (
      len(list(text_builders.documents('train'))), 0, 359)
  assert info.train_spec == {
      'decoder_input_tokens': ((128,), np.dtype(np.int32)),
      'decoder_target_tokens': ((128,), np.dtype(np.int32)),
      'decoder_loss_weights': ((128,), np.dtype(np.float32))}
  it = text.make_lm_train_iterator(c, global_batch_size=8, process_index=0,
                                   process_count=1)
  for _ in range(3):
    batch = next(it)
    assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == (
        info.train_spec)
    assert all(v.shape[0] == 8 for v in batch.values())
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:],
                                  batch['decoder_target_tokens'][:, :-1])
    # The train stream never ends: every row is full, every target counts.
    assert (batch['decoder_loss_weights'] == 1).all()
    assert (batch['decoder_input_tokens'] > 0).all()


def test_lm_train_is_sharded_and_seeded(data_dir):
  def batches(n=3, seed=0, **kw):
    c = lm_config(data_dir, **kw.pop('data', {}))
    c.seed = seed
    it = text.make_lm_train_iterator(c, global_batch_size=4, **kw)
    return [next(it)['decoder_input_tokens'] for _ in range(n)]
  a = batches(process_index=0, process_count=1)
  halves = [batches(process_index=p, process_count=2) for p in range(2)]
  assert halves[0][0].shape == (2, 128)
  for step in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step], halves[1][step]]), a[step])
  # config.seed seeds the document order; data.shuffle_seed overrides it.
  assert not np.array_equal(a[0], batches(seed=1, process_index=0,
                                          process_count=1)[0])
  np.testing.assert_array_equal(
      batches(seed=1, process_index=0, process_count=1),
      batches(seed=7, process_index=0, process_count=1,
              data={'shuffle_seed': 1}))


def test_lm_iterator_state_restores_exactly(data_dir):
  # Rows of 257 tokens, 32 a batch: the epoch (about 1,650 rows) ends
  # within the 60 batches, so a restore also crosses the reshuffle.
  c = lm_config(data_dir, targets_length=256)
  make = lambda: text.make_lm_train_iterator(
      c, global_batch_size=32, process_index=0, process_count=1)
  it = make()
  states, batches = [], []
  for _ in range(60):
    # Through JSON, as the checkpoint stores it.
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  for step in (0, 1, 17, 50, 58):
    restored = make()
    restored.set_state(states[step])
    for want in batches[step:step + 2]:
      got = next(restored)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_lm_eval_covers_validation_once(data_dir):
  c = lm_config(data_dir)
  text.lm_check_available(c)  # Prepares pgf_pydoc in data_dir.
  source = tfds.data_source('pgf_pydoc', split='validation', data_dir=data_dir)
  expected = []
  for k in range(len(source)):
    expected += ids(source[k]['text'].decode()) + [EOS]
  one = list(text.make_lm_eval_iterable(c, global_batch_size=32,
                                        process_index=0, process_count=1))
  two = [list(text.make_lm_eval_iterable(c, global_batch_size=32,
                                         process_index=p, process_count=2))
         for p in range(2)]
  assert len(two[0]) == len(two[1]) == len(one)
  spec = text.lm_dataset_info(c).eval_spec
  stream, rows = [], 0
  for j, batch in enumerate(one):
    assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == spec
    for k in batch:
      np.testing.assert_array_equal(
          np.concatenate([two[0][j][k], two[1][j][k]]), batch[k])
    for r in range(len(batch['mask'])):
      row = {k: v[r] for k, v in batch.items()}
      if row['mask']:
        stream += row_tokens(row)
        rows += 1
      else:
        assert not row['decoder_loss_weights'].any()
  # Every token of the split, in order, once.
  assert stream == expected
  assert rows == -(-len(expected) // 129)
  assert len(one) == -(-rows // 32)


# ---- The task ----------------------------------------------------------------

def _error(config):
  with pytest.raises(ValueError) as e:
    config_lib.validate_config(config)
  return str(e.value)


def test_validation_names_key_value_and_allowed(data_dir):
  c = lm_config(data_dir)
  config_lib.validate_config(c)
  bad = lm_config(data_dir, vocab='bpe')
  assert _error(bad) == ("data.vocab='bpe' is not allowed; choose one of "
                         "('byte', 'sentencepiece').")
  for value in (0, -5):
    msg = _error(lm_config(data_dir, targets_length=value))
    assert f'data.targets_length={value!r}' in msg
    assert 'positive integer' in msg
  msg = _error(lm_config(data_dir, targets_length=257))
  assert msg == ("data.targets_length=257 exceeds the 256 positions of "
                 "model.variant='nano'; allowed: 1..256.")
  assert 'data.pack=True is not allowed' in _error(lm_config(data_dir,
                                                             pack=True))
  c = lm_config(data_dir)
  c.z_loss = -1.0
  assert _error(c) == 'z_loss=-1.0 must be >= 0.'
  c = lm_config(data_dir)
  c.num_eval_examples = -2
  assert 'num_eval_examples=-2' in _error(c)
  c = lm_config(data_dir)
  c.model.name = 't5'
  c.model.variant = 'mu'
  assert _error(c) == ("task='causal_lm' cannot train model.name='t5', "
                       "which does ('span_corruption',).")
  c = lm_config(data_dir)
  c.model.vocab_size = 300
  info = text.lm_dataset_info(c)
  with pytest.raises(ValueError, match=r'model.vocab_size=300 is smaller '
                     r"than the vocabulary of data.vocab='byte' \(359 ids\)"):
    tasks.get_task(c, info)


def _task(z_loss=0.0):
  c = gpt_small.get_config('dense,runlocal')
  c.z_loss = z_loss
  info = DataInfo(num_train_examples=1, num_eval_examples=1, num_classes=0,
                  train_spec={}, eval_spec={}, vocab_size=359)
  return tasks.get_task(c, info)


def _hand_batch():
  # Targets 1, 2, 3 then padding. The model gives the targets
  # probabilities 1/2 (its arg-max), 1/4 and 1/8 (both not arg-max).
  probs = np.array([[[0.1, 0.5, 0.2, 0.2],
                     [0.5, 0.1, 0.25, 0.15],
                     [0.5, 0.3, 0.075, 0.125],
                     [0.25, 0.25, 0.25, 0.25]]])
  logits = np.log(np.concatenate([probs, probs]))  # log Z = 0.
  batch = {'decoder_target_tokens': np.array([[1, 2, 3, 0]] * 2, np.int32),
           'decoder_loss_weights': np.array([[1, 1, 1, 0]] * 2, np.float32),
           'mask': np.array([1, 0], np.float32)}
  return logits.astype(np.float32), batch


def test_loss_and_eval_sums_hand_computed():
  logits, batch = _hand_batch()
  task = _task()
  loss, metrics = jax.device_get(task.loss(logits, batch))
  # (ln 2 + ln 4 + ln 8) / 3 = 2 ln 2; one of three targets is the arg-max.
  assert loss == pytest.approx(2 * math.log(2), rel=1e-6)
  assert metrics['accuracy'] == pytest.approx(1 / 3)
  sums = jax.device_get(task.eval_sums(logits, batch))
  # Only the first row is real (mask): 3 weighted targets.
  assert sums['count'] == 3
  assert sums['loss'] == pytest.approx(6 * math.log(2), rel=1e-6)
  assert sums['accuracy'] == 1
  means = task.eval_metrics(tasks.mean_of_sums(sums))
  assert means['perplexity'] == pytest.approx(4.0, rel=1e-6)  # e^(2 ln 2)
  # z-loss: logits + 3 give log Z = 3, a term z 3^2 per token in the
  # training loss; evaluation reports the cross-entropy alone.
  task = _task(z_loss=0.01)
  shifted = logits + 3
  loss, _ = jax.device_get(task.loss(shifted, batch))
  assert loss == pytest.approx(2 * math.log(2) + 0.09, rel=1e-5)
  sums = jax.device_get(task.eval_sums(shifted, batch))
  assert sums['loss'] == pytest.approx(6 * math.log(2), rel=1e-5)


def test_render_marks_eos_and_drops_padding():
  assert causal_lm.render(BYTES, ids('ab') + [EOS] + ids('c') + [0, 0]) == (
      'ab<eos>c')
  assert causal_lm.render(BYTES, [EOS] + ids('x') + [EOS]) == '<eos>x<eos>'


def test_pipeline_has_the_data_interface():
  for name in ('check_available', 'dataset_info', 'published_info',
               'make_train_iterator', 'make_eval_iterable'):
    assert callable(getattr(causal_lm.TASK.pipeline, name)), name
  assert 'causal_lm' in tasks.available()


# ---- configs/gpt_small.py ----------------------------------------------------

def test_dry_run_gpt_small_prints_gpt2_parameter_count():
  r = subprocess.run(
      [sys.executable, '-m', 'pgf.train', '--config=configs/gpt_small.py',
       '--dry_run'], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'task=causal_lm, model=gpt gpt2, data=c4/en (not prepared' in (
      r.stdout)
  assert 'parameters: 124,439,808 total' in r.stdout
  assert 'ff=1:16' in r.stdout and 'FLOPs' in r.stdout


def test_config_argument():
  c = gpt_small.get_config('srste,2:4')
  assert (c.sparsity.ff.recipe, c.sparsity.ff.n, c.sparsity.ff.m) == (
      'srste', 2, 4)
  assert (c.model.variant, c.data.targets_length, c.batch_size) == (
      'gpt2', 1024, 480)
  local = gpt_small.get_config('mdgf_exp,runlocal')
  assert (local.model.variant, local.data.name, local.data.vocab) == (
      'nano', 'pgf_pydoc', 'byte')
  # alpha = exp(-c t) reaches 0.01 at 60 % of the run.
  assert math.exp(-local.sparsity.ff.decay * 0.6 * int(
      local.total_steps)) == pytest.approx(0.01)
  with pytest.raises(ValueError, match="'magic' is not a recipe"):
    gpt_small.get_config('magic')


# ---- End to end --------------------------------------------------------------

def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


ROLES = ('ff', 'q', 'k', 'v', 'o')


@pytest.mark.parametrize('recipe', list(recipes.RECIPES))
def test_every_recipe_trains_gpt_on_every_role(data_dir, tmp_path, recipe):
  # 1:4 on all five roles of a 'mu' GPT (contraction lengths 32 and 128);
  # 4 steps cover SdGf's frames (stepwise 3:4, 2:4, 1:4; geometric 4).
  c = gpt_small.get_config(f'{recipe},1:4,runlocal')
  c.data.data_dir = data_dir
  c.model.variant = 'mu'
  c.data.targets_length = 32
  c.batch_size = 8
  c.eval_batch_size = 256
  c.total_steps = '4'
  c.optimizer.warmup = '1'
  c.log_every = c.eval_every = c.checkpoint_every = '4'
  # Greedy decoding compiles once per evaluated plan: check the examples in
  # two runs, a dense and a hard-mask one.
  c.num_eval_examples = 2 if recipe in ('dense', 'ste') else 0
  for role in ROLES:
    c.sparsity[role].update(c.sparsity.ff.to_dict())
    c.sparsity[role].decay = 0.5
  workdir = str(tmp_path / recipe)
  final = train_lib.train_and_evaluate(c, workdir)
  assert np.isfinite(final['eval/loss'])
  assert 0 <= final['eval/accuracy'] <= 1
  assert final['eval/perplexity'] == pytest.approx(math.exp(final['eval/loss']))
  last = [r for r in read_jsonl(workdir) if 'train/loss' in r][-1]
  assert last['step'] == 4
  masked = recipes.RECIPES[recipe].masked
  for role in ROLES:
    if not masked:
      assert f'sparsity/{role}/n' not in last
      continue
    assert (last[f'sparsity/{role}/n'], last[f'sparsity/{role}/m']) == (1, 4)
    if recipe in ('ste', 'srste'):
      # Hard masks: a quarter of each role's kernels is non-zero.
      assert last[f'sparsity/{role}/density'] == pytest.approx(0.25)
  if c.num_eval_examples:
    with open(os.path.join(workdir, 'eval_examples', 'step_4.txt')) as f:
      examples = f.read()
    assert examples.count('prediction: ') == 2


def test_nano_loss_falls_below_the_unigram_baseline(data_dir, tmp_path):
  # A short runlocal run (the full 300 steps: configs/gpt_small.py's notes):
  # the validation loss must fall from about ln(384) to below the
  # cross-entropy of the best context-free model, the byte frequencies of
  # the training split: the model uses its context.
  c = gpt_small.get_config('dense,runlocal')
  c.data.data_dir = data_dir
  c.total_steps = '60'
  c.eval_every = c.checkpoint_every = c.log_every = '60'
  c.optimizer.warmup = '10'
  c.num_eval_examples = 0
  workdir = str(tmp_path / 'nano')
  final = train_lib.train_and_evaluate(c, workdir)
  first = [r for r in read_jsonl(workdir) if 'eval/loss' in r][0]
  assert first['step'] == 0
  assert first['eval/loss'] == pytest.approx(math.log(384), abs=0.3)

  train_bytes = ''.join(t + '\0' for _, t in text_builders.documents(
      'train')).encode()
  counts = np.bincount(np.frombuffer(train_bytes, np.uint8), minlength=256)
  source = tfds.data_source('pgf_pydoc', split='validation', data_dir=data_dir)
  val = np.frombuffer(b''.join(source[k]['text'] + b'\0'
                               for k in range(len(source))), np.uint8)
  unigram = -np.mean(np.log((counts[val] + 1) / (counts.sum() + 256)))
  assert 3.0 < unigram < 3.6
  assert final['eval/loss'] < unigram
