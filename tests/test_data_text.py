"""T5 span corruption, vocabularies and the text pipeline on pgf_pydoc."""

import json
import pickle
import sys

import grain.python as grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pgf.configs import base
from pgf.data import text
from pgf.data import text_builders
from pgf.data import vocab as vocab_lib

BYTES = vocab_lib.ByteVocabulary()


def t5_config(data_dir, **data):
  c = base.get_base_config()
  c.model.name = 't5'
  c.model.vocab_size = 384
  c.data.name = 'pgf_pydoc'
  c.data.data_dir = data_dir
  c.data.eval_split = 'validation'
  c.data.inputs_length = 64
  c.data.targets_length = 16
  c.data.update(data)
  return c


def reconstruct(inputs, targets, first_sentinel):
  """The original tokens: each input sentinel replaced by the target tokens
  that follow the same sentinel; EOS and padding dropped."""
  inputs, targets = list(inputs), list(targets)
  inputs = inputs[:inputs.index(BYTES.eos_id)]
  targets = targets[:targets.index(BYTES.eos_id)]
  spans, current = {}, None
  for t in targets:
    if t > first_sentinel - BYTES.extra_ids:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  out = []
  for t in inputs:
    out.extend(spans[t] if t > first_sentinel - BYTES.extra_ids else [t])
  return out


def runs(mask):
  """Lengths of the runs of True."""
  edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
  return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


# ---- Span corruption ---------------------------------------------------------

def test_random_spans_helper_t5_base():
  # T5's span_corruption defaults: inputs 512 -> 568 raw tokens, targets 114.
  assert text.random_spans_helper(
      inputs_length=512, noise_density=0.15,
      mean_noise_span_length=3.0) == (568, 114)
  assert text.random_spans_helper(
      inputs_length=64, noise_density=0.15,
      mean_noise_span_length=3.0) == (70, 14)


@pytest.mark.parametrize('length', [568, 100, 71, 37, 11])
def test_noise_mask_counts(length):
  for seed in range(5):
    mask = text.random_spans_noise_mask(
        length, noise_density=0.15, mean_noise_span_length=3.0,
        rng=np.random.default_rng(seed))
    num_noise = max(round(length * 0.15), 1)  # No .5 ties at these lengths.
    assert mask.shape == (length,) and mask.sum() == num_noise
    assert len(runs(mask)) == max(round(num_noise / 3.0), 1)
    assert not mask[0] and mask[-1]  # Non-noise first, noise last (T5).


def test_noise_mask_hand_computed_degenerate_cases():
  rng = np.random.default_rng(0)
  # One token: T5 pads to two, one noise token, then cuts back to one.
  assert text.random_spans_noise_mask(
      1, noise_density=0.15, mean_noise_span_length=3.0,
      rng=rng).tolist() == [False]
  assert text.random_spans_noise_mask(
      4, noise_density=0.15, mean_noise_span_length=3.0,
      rng=rng).tolist() == [False, False, False, True]
  assert not text.random_spans_noise_mask(
      5, noise_density=0.0, mean_noise_span_length=3.0, rng=rng).any()


def test_sentinels_hand_made():
  tokens = np.array([10, 11, 12, 13, 14, 15, 16])
  mask = np.array([0, 1, 1, 0, 0, 1, 0], bool)
  first = BYTES.sentinel_id(0)
  assert first == 358 and BYTES.sentinel_id(1) == 357
  assert text.noise_span_to_unique_sentinel(
      tokens, mask, first_sentinel=first).tolist() == [10, 358, 13, 14, 357,
                                                       16]
  assert text.nonnoise_span_to_unique_sentinel(
      tokens, mask, first_sentinel=first).tolist() == [358, 11, 12, 357, 15,
                                                       356]


def test_span_corruption_reconstructs_and_fits():
  raw, targets_length = text.random_spans_helper(
      inputs_length=512, noise_density=0.15, mean_noise_span_length=3.0)
  tokens = np.random.default_rng(0).integers(3, 259, raw)
  for seed in range(3):
    out = text.span_corruption(
        tokens, np.random.default_rng(seed), vocab=BYTES, noise_density=0.15,
        mean_noise_span_length=3.0, inputs_length=512,
        targets_length=targets_length)
    inputs, targets = out['inputs'], out['targets']
    # A raw-length chunk fills both exactly, EOS last.
    assert (len(inputs), len(targets)) == (512, 114)
    assert inputs[-1] == targets[-1] == BYTES.eos_id
    sentinels = [t for t in targets if t >= 259]
    num_spans = round(round(raw * 0.15) / 3.0)
    assert sentinels == [358 - i for i in range(num_spans)]
    assert [t for t in inputs if t >= 259] == sentinels
    assert targets[0] == 358  # Targets open with <extra_id_0>.
    assert len(targets) - 1 - num_spans == round(raw * 0.15)
    assert reconstruct(inputs, targets, 358) == tokens.tolist()


# ---- Vocabularies ------------------------------------------------------------

def test_byte_vocabulary():
  s = 'Grüße, 世界 ☃ 😀\n\ttab'
  ids = BYTES.encode(s)
  assert len(ids) == len(s.encode()) and min(ids) >= 3
  assert BYTES.decode(ids) == s
  assert (BYTES.vocab_size, BYTES.pad_id, BYTES.eos_id, BYTES.unk_id) == (
      359, 0, 1, 2)
  assert BYTES.encode('A') == [ord('A') + 3]
  assert BYTES.decode([0, 1, 2, *BYTES.encode('hi'), 358, 259, 400]) == (
      'hi<extra_id_0><extra_id_99>')


def _pydoc_text(n_chars):
  texts, size = [], 0
  for _, t in text_builders.documents('train'):
    texts.append(t)
    size += len(t)
    if size > n_chars:
      return texts


def test_sentencepiece_vocabulary(tmp_path, data_dir):
  texts = _pydoc_text(6000)
  path = vocab_lib.train_sentencepiece(
      texts, vocab_size=300, model_prefix=str(tmp_path / 'sp'))
  sp = vocab_lib.SentencePieceVocabulary(path)
  assert (sp.base_vocab_size, sp.vocab_size, sp.sentinel_id(0)) == (
      300, 400, 399)
  for t in texts:
    ids = sp.encode(t)
    assert len(ids) < len(t) and max(ids) < 300
    assert sp.decode(ids) == t
  assert pickle.loads(pickle.dumps(sp)).encode(texts[0]) == sp.encode(
      texts[0])
  assert sp.decode(sp.encode('if') + [399]) == 'if<extra_id_0>'
  # Through the config, end to end: ids stay inside the vocabulary.
  c = t5_config(data_dir, vocab='sentencepiece', vocab_path=path)
  assert text.dataset_info(c).vocab_size == 400
  batch = next(text.make_train_iterator(
      c, global_batch_size=2, process_index=0, process_count=1))
  assert batch['encoder_input_tokens'].max() < 400
  assert batch['decoder_target_tokens'][:, 0].tolist() == [399, 399]


def test_vocabulary_config_errors(tmp_path):
  c = t5_config(str(tmp_path), vocab='sentencepiece', vocab_path='')
  with pytest.raises(ValueError, match='data.vocab_path'):
    vocab_lib.get_vocabulary(c)
  c.data.vocab_path = str(tmp_path / 'missing.model')
  with pytest.raises(ValueError, match='data.vocab_path'):
    vocab_lib.get_vocabulary(c)


# ---- pgf_pydoc and the pipeline ---------------------------------------------

def test_pydoc_builder_prepares_offline(data_dir):
  text_builders.ensure_prepared(data_dir)
  builder = tfds.builder('pgf_pydoc', data_dir=data_dir)
  docs = {s: dict(text_builders.documents(s)) for s in ('train', 'validation')}
  splits = builder.info.splits
  assert splits['train'].num_examples == len(docs['train'])
  assert splits['validation'].num_examples == len(docs['validation'])
  # The topics' text shifts a little between Python versions.
  if sys.version_info[:3] == (3, 11, 7):
    assert (len(docs['train']), len(docs['validation'])) == (263, 25)
  assert 200 < len(docs['train']) < 350
  assert 0.05 < len(docs['validation']) / len(docs['train']) < 0.2
  assert {k.split('/')[0] for k in docs['train']}.isdisjoint(
      k.split('/')[0] for k in docs['validation'])
  source = tfds.data_source('pgf_pydoc', split='validation', data_dir=data_dir)
  stored = sorted(source[i]['text'].decode() for i in range(len(source)))
  assert stored == sorted(docs['validation'].values())


def test_unprepared_dataset_clear_error(tmp_path):
  c = t5_config(str(tmp_path), name='c4/en')
  for fn in (text.check_available, text.dataset_info):
    with pytest.raises(ValueError, match=r"data.name='c4/en'.*data.data_dir"
                       r".*pgf.data.prepare --dataset=c4/en"):
      fn(c)


def test_length_errors(data_dir):
  with pytest.raises(ValueError, match='data.targets_length=13'):
    text.check_available(t5_config(data_dir, targets_length=13))
  # T5's helper says 38 targets for inputs 172, but its float32 mask makes
  # chunks with 40.
  with pytest.raises(ValueError, match='set data.targets_length=40'):
    text.check_available(t5_config(data_dir, inputs_length=172,
                                   targets_length=38))
  with pytest.raises(ValueError, match='data.mean_noise_span_length=0.5'):
    text.check_available(t5_config(data_dir, mean_noise_span_length=0.5))


def test_train_batches(data_dir):
  c = t5_config(data_dir)
  info = text.dataset_info(c)
  assert (info.num_train_examples, info.num_classes, info.vocab_size) == (
      len(list(text_builders.documents('train'))), 0, 359)
  it = text.make_train_iterator(c, global_batch_size=8, process_index=0,
                                process_count=1)
  for _ in range(3):
    batch = next(it)
    assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == (
        info.train_spec)
    assert all(v.shape[0] == 8 for v in batch.values())
    targets = batch['decoder_target_tokens']
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:],
                                  targets[:, :-1])
    assert (batch['decoder_input_tokens'][:, 0] == 0).all()
    np.testing.assert_array_equal(batch['decoder_loss_weights'], targets > 0)
    for inputs, tgt in zip(batch['encoder_input_tokens'], targets):
      # Concat-then-split: every row is a full 70-token chunk.
      assert len(reconstruct(inputs, tgt, 358)) == 70


def test_train_is_sharded_and_seeded(data_dir):
  def batches(n=3, seed=0, **kw):
    c = t5_config(data_dir, **kw.pop('data', {}))
    c.seed = seed
    it = text.make_train_iterator(c, global_batch_size=4, **kw)
    return [next(it)['encoder_input_tokens'] for _ in range(n)]
  a = batches(process_index=0, process_count=1)
  np.testing.assert_array_equal(a, batches(process_index=0, process_count=1))
  # Two processes read the same global batches, one half each.
  halves = [batches(process_index=p, process_count=2) for p in range(2)]
  assert halves[0][0].shape == (2, 64)
  for step in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step], halves[1][step]]), a[step])
  # config.seed seeds the order; data.shuffle_seed overrides it.
  assert not np.array_equal(a[0], batches(seed=1, process_index=0,
                                          process_count=1)[0])
  np.testing.assert_array_equal(
      batches(seed=1, process_index=0, process_count=1),
      batches(seed=7, process_index=0, process_count=1,
              data={'shuffle_seed': 1}))


def test_iterator_state_restores_exactly(data_dir):
  c = t5_config(data_dir)
  make = lambda: text.make_train_iterator(
      c, global_batch_size=4, process_index=0, process_count=1)
  it = make()
  states, batches = [], []
  for _ in range(40):
    # Through JSON, as the checkpoint stores it.
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  for step in (0, 1, 17, 39):
    restored = make()
    restored.set_state(states[step])
    for want in batches[step:step + 2]:
      got = next(restored)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_packing_segments_positions_and_decoder_inputs():
  examples = [{'inputs': np.array([5, 6, 1]), 'targets': np.array([7, 1])},
              {'inputs': np.array([8, 1]), 'targets': np.array([9, 9, 1])},
              {'inputs': np.array([4, 4, 4, 1]), 'targets': np.array([3, 1])}]
  n = text.Lengths(raw=0, inputs=6, targets=5)
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  rows = list(text.pack_or_pad(ds, n, pack=True, num_packing_bins=2))
  assert len(rows) == 2
  r = rows[0]
  assert r['encoder_input_tokens'].tolist() == [5, 6, 1, 8, 1, 0]
  assert r['encoder_segment_ids'].tolist() == [1, 1, 1, 2, 2, 0]
  assert r['encoder_positions'].tolist() == [0, 1, 2, 0, 1, 0]
  assert r['decoder_target_tokens'].tolist() == [7, 1, 9, 9, 1]
  assert r['decoder_segment_ids'].tolist() == [1, 1, 2, 2, 2]
  assert r['decoder_positions'].tolist() == [0, 1, 0, 1, 2]
  # Shifted right, restarting from 0 where the second example begins.
  assert r['decoder_input_tokens'].tolist() == [0, 7, 0, 9, 9]
  assert r['decoder_loss_weights'].tolist() == [1, 1, 1, 1, 1]
  assert rows[1]['encoder_segment_ids'].tolist() == [1, 1, 1, 1, 0, 0]
  assert rows[1]['decoder_input_tokens'].tolist() == [0, 3, 0, 0, 0]
  assert rows[1]['decoder_loss_weights'].tolist() == [1, 1, 0, 0, 0]
  unpacked = list(text.pack_or_pad(ds, n, pack=False, num_packing_bins=2))
  assert unpacked[1]['decoder_input_tokens'].tolist() == [0, 9, 9, 1, 0]
  assert 'encoder_segment_ids' not in unpacked[1]


def test_packed_train_batches(data_dir):
  c = t5_config(data_dir, pack=True)
  spec = text.dataset_info(c).train_spec
  batch = next(text.make_train_iterator(c, global_batch_size=4,
                                        process_index=0, process_count=1))
  assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == spec
  assert (batch['encoder_segment_ids'][:, 0] == 1).all()


def test_eval_covers_validation_once(data_dir):
  c = t5_config(data_dir)
  source = tfds.data_source('pgf_pydoc', split='validation', data_dir=data_dir)
  expected = BYTES.encode(''.join(source[i]['text'].decode()
                                  for i in range(len(source))))
  one = list(text.make_eval_iterable(c, global_batch_size=32,
                                     process_index=0, process_count=1))
  two = [list(text.make_eval_iterable(c, global_batch_size=32,
                                      process_index=p, process_count=2))
         for p in range(2)]
  assert len(two[0]) == len(two[1]) == len(one)
  spec = text.dataset_info(c).eval_spec
  tokens, rows = [], 0
  for j, batch in enumerate(one):
    assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == spec
    # Two processes hold the two halves of every global batch.
    for k in batch:
      np.testing.assert_array_equal(
          np.concatenate([two[0][j][k], two[1][j][k]]), batch[k])
    for inputs, targets, m, w in zip(
        batch['encoder_input_tokens'], batch['decoder_target_tokens'],
        batch['mask'], batch['decoder_loss_weights']):
      if m:
        tokens += reconstruct(inputs, targets, 358)
        rows += 1
      else:
        assert not w.any() and not inputs.any()
  assert tokens == expected
  assert rows == -(-len(expected) // 70)
  assert sum(b['mask'].sum() for b in one) == rows
  assert len(one) == -(-rows // 32)
