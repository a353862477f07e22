"""T5 span-corruption input pipeline: TFDS text datasets read by grain.

Reads `data.text_key` of any TFDS dataset prepared in array_record format
(pgf_pydoc, prepared on the spot, or e.g. c4/en prepared by the user) and
does what T5's `span_corruption` task does (t5.data.preprocessors):

  1. tokenize each document with the vocabulary (pgf.data.vocab) and keep a
     random aligned chunk of at most 65,536 tokens (select_random_chunk);
  2. concatenate the documents of the stream and split the result into
     chunks of `raw` tokens (reduce_concat_tokens + split_tokens; grain's
     ConcatThenSplit, so only the stream's very last chunk is shorter);
  3. mark noise spans with `random_spans_noise_mask` (noise_density, mean
     span length) and build inputs with each noise span replaced by a
     sentinel (noise_span_to_unique_sentinel) and targets with each
     non-noise span replaced (nonnoise_span_to_unique_sentinel); append EOS.

`raw` comes from T5's `random_spans_helper`: the longest chunk whose
corrupted inputs, EOS included, fit data.inputs_length; e.g. inputs 512,
density 0.15, mean span 3 -> raw 568 tokens and targets of 114.

Rows are padded with 0, or with data.pack several examples share a row
(grain's first-fit packing). Batches carry T5X's feature names:
  'encoder_input_tokens'  int32 [b, inputs_length]
  'decoder_target_tokens' int32 [b, targets_length]
  'decoder_input_tokens'  int32 [b, targets_length]: targets shifted right,
                          0 at position 0 (and at every segment start when
                          packed)
  'decoder_loss_weights'  float32 [b, targets_length]: 1 on target tokens
and when packed 'encoder_segment_ids', 'decoder_segment_ids' (1, 2, ... per
example, 0 on padding), 'encoder_positions', 'decoder_positions' int32.

Train: an infinite grain dataset iterator. Every process reads every
document, reshuffled each epoch from the data seed (`data.shuffle_seed`, or
`config.seed` when -1), which also seeds the per-document and per-chunk
randomness (grain derives an rng from the seed and the position in the
stream), builds the rows of each global batch and keeps its slice; so
`get_state()` / `set_state()` resume bit-exactly and the global batch of a
step does not depend on the number of processes.

Eval: one deterministic pass over the eval split, in the main process. Every
process computes all the split's rows (streamed, not held in memory), so the
rows do not depend on the number of processes or workers; global batch j
holds rows j*G .. j*G+G-1 and process p takes its slice [p*b, (p+1)*b). The
last batch is padded with rows of zeros, and 'mask' float32 [b] is 1 on real
rows. Every process tokenizes the whole split for each evaluation: slice
big splits, e.g. data.eval_split='validation[:20000]' for c4/en.

DataInfo counts documents: num_train_examples / num_eval_examples are the
splits' document counts (from TFDS metadata), so durations in epochs
('5ep') mean passes over the documents.
"""

from __future__ import annotations

import dataclasses
import os

from grain import experimental as grain_experimental
import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds

from pgf.data import DataInfo
from pgf.data import DatasetNotPreparedError
from pgf.data import builders
from pgf.data import data_seed
from pgf.data import vocab as vocab_lib
from pgf.data.order import local_batch_size

MAX_DOCUMENT_TOKENS = 65536  # T5's select_random_chunk(max_length=65536).
EVAL_SEED = 0  # Eval noise masks: the same for every run and config seed.


# ---- Span corruption (NumPy ports of t5.data.preprocessors) -----------------

def random_spans_helper(*, inputs_length: int, noise_density: float,
                        mean_noise_span_length: float,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1
                        ) -> tuple[int, int]:
  """(raw tokens per example, targets length) so that span corruption of
  `raw` tokens gives inputs of exactly `inputs_length` (EOS included).

  T5's random_spans_helper: (512, 0.15, 3.0) -> (568, 114).
  """

  def corrupted_lengths(tokens_length: int) -> tuple[int, int]:
    num_noise = int(round(tokens_length * noise_density))
    num_nonnoise = tokens_length - num_noise
    num_spans = int(round(num_noise / mean_noise_span_length))
    # Inputs: non-noise tokens, a sentinel per span and EOS; targets: noise
    # tokens, a sentinel per span and EOS.
    return (num_nonnoise + num_spans * extra_tokens_per_span_inputs + 1,
            num_noise + num_spans * extra_tokens_per_span_targets + 1)

  tokens_length = inputs_length - 1
  while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = corrupted_lengths(tokens_length)
  # T5's hack: with density 0.5 make targets no longer than inputs.
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _noise_counts(length: int, noise_density: float,
                  mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a mask over `length` >= 2 tokens."""
  f32 = np.float32  # T5 computes these in float32 (rounding half to even).
  num_noise = int(np.round(f32(length) * f32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = int(np.round(f32(num_noise) / f32(mean_noise_span_length)))
  return num_noise, max(num_spans, 1)


def random_spans_noise_mask(length: int, *, noise_density: float,
                            mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """bool [length]: noise spans alternating with non-noise spans.

  round(length * noise_density) noise tokens (at least 1, at most
  length - 1; float32 arithmetic as T5) in round(noise / mean span) spans
  (at least 1); the sequence starts with non-noise and ends with noise. Span
  lengths are a uniformly random composition (T5's _random_segmentation).
  """
  if noise_density == 0.0:
    return np.zeros(length, bool)
  orig_length, length = length, max(length, 2)
  num_noise, num_spans = _noise_counts(length, noise_density,
                                       mean_noise_span_length)
  num_nonnoise = length - num_noise

  def random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
    """Lengths of a random split of num_items into num_segments (>= 1)."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(
        np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)

  span_lengths = np.stack([random_segmentation(num_nonnoise, num_spans),
                           random_segmentation(num_noise, num_spans)], axis=1)
  span_starts = np.cumsum(span_lengths.reshape(-1))[:-1]
  span_start_indicator = np.zeros(length, np.int64)
  span_start_indicator[span_starts] = 1
  is_noise = np.cumsum(span_start_indicator) % 2 == 1
  return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  *, first_sentinel: int) -> np.ndarray:
  """Replaces each noise span by one sentinel: first_sentinel, then the ids
  below it (<extra_id_0>, <extra_id_1>, ...)."""
  prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
  first_noise = noise_mask & ~prev_is_noise
  subsequent_noise = noise_mask & prev_is_noise
  sentinels = first_sentinel + 1 - np.cumsum(first_noise)
  return np.where(first_noise, sentinels, tokens)[~subsequent_noise]


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray,
                                     noise_mask: np.ndarray, *,
                                     first_sentinel: int) -> np.ndarray:
  return noise_span_to_unique_sentinel(tokens, ~noise_mask,
                                       first_sentinel=first_sentinel)


def _append_eos_after_trim(x: np.ndarray, length: int, eos_id: int
                           ) -> np.ndarray:
  return np.append(x[:length - 1], eos_id).astype(np.int32)


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, *,
                    vocab: vocab_lib.Vocabulary, noise_density: float,
                    mean_noise_span_length: float, inputs_length: int,
                    targets_length: int) -> dict[str, np.ndarray]:
  """tokens int [n] -> {'inputs': int32 [<= inputs_length], 'targets': int32
  [<= targets_length]}, both ending with EOS (T5's denoise +
  append_eos_after_trim)."""
  mask = random_spans_noise_mask(
      len(tokens), noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length, rng=rng)
  first = vocab.sentinel_id(0)
  inputs = noise_span_to_unique_sentinel(tokens, mask, first_sentinel=first)
  targets = nonnoise_span_to_unique_sentinel(tokens, mask,
                                             first_sentinel=first)
  return {'inputs': _append_eos_after_trim(inputs, inputs_length,
                                           vocab.eos_id),
          'targets': _append_eos_after_trim(targets, targets_length,
                                            vocab.eos_id)}


@dataclasses.dataclass(frozen=True)
class Lengths:
  raw: int  # Tokens per example before corruption.
  inputs: int
  targets: int


def lengths(config, vocab: vocab_lib.Vocabulary) -> Lengths:
  """Checked sequence lengths of `config.data`."""
  d = config.data
  raw, _ = random_spans_helper(
      inputs_length=d.inputs_length, noise_density=d.noise_density,
      mean_noise_span_length=d.mean_noise_span_length)
  # The helper's targets length rounds in float64, the mask in float32: take
  # the longest targets of any chunk (the stream's last one is shorter).
  sizes = [max(n, 2) for n in range(1, raw + 1)]
  counts = [_noise_counts(n, d.noise_density, d.mean_noise_span_length)
            for n in sizes]
  if any(spans > n - noise for n, (noise, spans) in zip(sizes, counts)):
    raise ValueError(
        f'data.noise_density={d.noise_density} with data.mean_noise_span_'
        f'length={d.mean_noise_span_length} leaves fewer non-noise tokens '
        'than noise spans; use a longer mean span or a lower density.')
  needed = max(noise + spans + 1 for noise, spans in counts)
  if d.targets_length < needed:
    raise ValueError(
        f'data.targets_length={d.targets_length} is shorter than the '
        f'span-corruption targets ({needed} tokens) of data.inputs_length='
        f'{d.inputs_length}; set data.targets_length={needed}.')
  num_spans = max(spans for _, spans in counts)
  if num_spans > vocab.extra_ids:
    raise ValueError(
        f'data.inputs_length={d.inputs_length} gives {num_spans} noise spans '
        f'but the vocabulary has {vocab.extra_ids} sentinels.')
  return Lengths(raw=raw, inputs=d.inputs_length, targets=d.targets_length)


# ---- Availability and shapes -------------------------------------------------

def _prepared_builder(config) -> tfds.core.DatasetBuilder:
  """The builder of data.name, checked against the config; pgf's own
  datasets are prepared here if missing. Reads metadata only."""
  d = config.data
  builder, where = builders.open_builder(config)
  prepare = (
      f'Prepare it once with `python -m pgf.data.prepare --dataset={d.name}'
      + (f' --data_dir={d.data_dir}' if d.data_dir else '') + '` (array_record '
      "files; TFDS's own text builders need TensorFlow, c4 also Apache Beam "
      "and days of processing), or use data.name='pgf_pydoc', which pgf "
      'prepares offline.')
  if builder is None:
    # Without TensorFlow, TFDS cannot even load the builder code of its own
    # datasets, but finds prepared ones by their files.
    raise DatasetNotPreparedError(
        f'data.name={d.name!r} is not prepared in {where}. {prepare}')
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f'data.name={d.name!r} is not prepared in {where} (expected at '
        f'{builder.data_dir}). {prepare}')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f'data.name={d.name!r} in {builder.data_dir} is stored as '
        f'{builder.info.file_format.value}; grain needs random access. '
        f'{prepare}')
  if d.text_key not in builder.info.features.keys():
    raise ValueError(
        f'data.text_key={d.text_key!r} is not a feature of {d.name!r} '
        f'(features: {list(builder.info.features.keys())}).')
  for key in ('train_split', 'eval_split'):
    try:
      builder.info.splits[d[key]]
    except (KeyError, ValueError) as e:
      raise ValueError(
          f'data.{key}={d[key]!r} is not a split of {d.name!r} (splits: '
          f'{list(builder.info.splits.keys())}).') from e
  return builder


def check_available(config) -> None:
  """Raises ValueError naming data.name, data.data_dir and how to prepare the
  dataset unless it is ready (pgf_pydoc is prepared on the spot), or naming
  the data.* length or vocabulary setting that cannot work."""
  _prepared_builder(config)
  lengths(config, vocab_lib.get_vocabulary(config))


def _info(config, num_train: int, num_eval: int, vocab_size: int,
          inputs_length: int, targets_length: int) -> DataInfo:
  spec = {'encoder_input_tokens': ((inputs_length,), np.dtype(np.int32)),
          'decoder_target_tokens': ((targets_length,), np.dtype(np.int32)),
          'decoder_input_tokens': ((targets_length,), np.dtype(np.int32)),
          'decoder_loss_weights': ((targets_length,), np.dtype(np.float32))}
  if config.data.pack:
    for side, length in (('encoder', inputs_length),
                         ('decoder', targets_length)):
      spec[f'{side}_segment_ids'] = ((length,), np.dtype(np.int32))
      spec[f'{side}_positions'] = ((length,), np.dtype(np.int32))
  return DataInfo(
      num_train_examples=num_train, num_eval_examples=num_eval,
      num_classes=0, train_spec=spec,
      eval_spec={**spec, 'mask': ((), np.dtype(np.float32))},
      vocab_size=vocab_size)


def dataset_info(config) -> DataInfo:
  """DataInfo with the vocabulary size; examples count documents."""
  builder = _prepared_builder(config)
  vocab = vocab_lib.get_vocabulary(config)
  n = lengths(config, vocab)
  splits, d = builder.info.splits, config.data
  return _info(config, splits[d.train_split].num_examples,
               splits[d.eval_split].num_examples, vocab.vocab_size,
               n.inputs, n.targets)


# The standard T5 vocabulary: 32,000 SentencePiece pieces + 100 sentinels.
T5_VOCAB_SIZE = 32_100


def published_info(config, num_train: int, num_eval: int,
                   num_classes: int) -> DataInfo:
  """DataInfo from published sizes, for dry runs without the data; the
  vocabulary is read if present, else taken as the standard T5 one."""
  del num_classes
  d = config.data
  if d.vocab == 'byte' or (d.vocab_path and os.path.exists(d.vocab_path)):
    vocab_size = vocab_lib.get_vocabulary(config).vocab_size
  else:
    vocab_size = T5_VOCAB_SIZE
  return _info(config, num_train, num_eval, vocab_size, d.inputs_length,
               d.targets_length)


# ---- grain stages ------------------------------------------------------------

class _Tokenize(grain.RandomMapTransform):
  """Document -> {'tokens': int32 [n]}: tokenize, then T5's
  select_random_chunk (a random aligned chunk of <= 65536 tokens)."""

  def __init__(self, vocab: vocab_lib.Vocabulary, text_key: str):
    self.vocab = vocab
    self.text_key = text_key

  def random_map(self, element, rng: np.random.Generator):
    text = element[self.text_key]
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    tokens = np.asarray(self.vocab.encode(text), np.int32)
    num_chunks = -(-len(tokens) // MAX_DOCUMENT_TOKENS)
    if num_chunks > 1:
      start = MAX_DOCUMENT_TOKENS * int(rng.integers(num_chunks))
      tokens = tokens[start:start + MAX_DOCUMENT_TOKENS]
    return {'tokens': tokens}


def _not_empty(element) -> bool:
  return len(element['tokens']) > 0


class _ConcatThenSplit(grain.IterDataset):
  """grain's ConcatThenSplit whose state survives JSON, as checkpoints
  store it: grain 0.2.18 tells 'no remainder' by comparing a slice with the
  tuple (-1, -1), which the list that JSON gives back never equals."""

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(grain_experimental.ConcatThenSplitIterDataset(
        parent, length_struct={'tokens': length},
        split_full_length_features=True))

  def __iter__(self):
    return _TupleSlicesIterator(self._parent.__iter__())


class _TupleSlicesIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state({**state, 'remainder_slices': slices})


class _SpanCorrupt(grain.RandomMapTransform):
  """Concatenated chunk -> {'inputs', 'targets'} (variable lengths)."""

  def __init__(self, vocab: vocab_lib.Vocabulary, n: Lengths,
               noise_density: float, mean_noise_span_length: float):
    self.vocab = vocab
    self.n = n
    self.noise_density = noise_density
    self.mean_noise_span_length = mean_noise_span_length

  def random_map(self, element, rng: np.random.Generator):
    # ConcatThenSplit pads the stream's last chunk; its segment ids say how
    # many tokens are real.
    length = int(np.count_nonzero(element['tokens_segment_ids']))
    return span_corruption(
        element['tokens'][:length], rng, vocab=self.vocab,
        noise_density=self.noise_density,
        mean_noise_span_length=self.mean_noise_span_length,
        inputs_length=self.n.inputs, targets_length=self.n.targets)


class _Pad(grain.MapTransform):

  def __init__(self, n: Lengths):
    self.n = n

  def map(self, element):
    return {'inputs': np.pad(element['inputs'],
                             (0, self.n.inputs - len(element['inputs']))),
            'targets': np.pad(element['targets'],
                              (0, self.n.targets - len(element['targets'])))}


def _shift_right(x: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros_like(x[:1]), x[:-1]])


def t5x_features(element) -> dict[str, np.ndarray]:
  """Padded {'inputs', 'targets'} (+ grain's packing '*_segment_ids',
  '*_positions') -> T5X's encoder-decoder features (EncDecFeatureConverter).
  """
  targets = element['targets'].astype(np.int32)
  decoder_inputs = _shift_right(targets)
  out = {'encoder_input_tokens': element['inputs'].astype(np.int32),
         'decoder_target_tokens': targets}
  if 'targets_segment_ids' in element:
    segments = element['targets_segment_ids']
    # Each packed example's decoder starts from 0, not from the previous
    # example's last token.
    decoder_inputs = np.where(segments == _shift_right(segments),
                              decoder_inputs, 0)
    for side, key in (('encoder', 'inputs'), ('decoder', 'targets')):
      out[f'{side}_segment_ids'] = element[f'{key}_segment_ids'].astype(
          np.int32)
      out[f'{side}_positions'] = element[f'{key}_positions'].astype(np.int32)
  out['decoder_input_tokens'] = decoder_inputs.astype(np.int32)
  out['decoder_loss_weights'] = (targets > 0).astype(np.float32)
  return out


def pack_or_pad(ds: grain.IterDataset, n: Lengths, *, pack: bool,
                num_packing_bins: int) -> grain.IterDataset:
  """Variable-length {'inputs', 'targets'} -> fixed-length T5X rows."""
  if pack:
    ds = grain_experimental.FirstFitPackIterDataset(
        ds, length_struct={'inputs': n.inputs, 'targets': n.targets},
        num_packing_bins=num_packing_bins, shuffle_bins=False)
  else:
    ds = ds.map(_Pad(n))
  return ds.map(t5x_features)


def _rows(config, split: str, *, seed: int, train: bool,
          num_packing_bins: int) -> grain.IterDataset:
  """Span-corrupted, padded or packed rows of `split` (see module doc)."""
  d = config.data
  vocab = vocab_lib.get_vocabulary(config)
  n = lengths(config, vocab)
  source = tfds.data_source(d.name, split=split,
                            data_dir=builders.config_data_dir(config),
                            download=False)
  ds = grain.MapDataset.source(source).seed(seed)
  if train:
    ds = ds.shuffle().repeat(None)
  ds = ds.random_map(_Tokenize(vocab, d.text_key)).filter(_not_empty)
  ds = _ConcatThenSplit(ds.to_iter_dataset(), n.raw)
  ds = ds.random_map(_SpanCorrupt(vocab, n, d.noise_density,
                                  d.mean_noise_span_length))
  return pack_or_pad(ds, n, pack=d.pack, num_packing_bins=num_packing_bins)


def make_train_iterator(config, *, global_batch_size: int, process_index: int,
                        process_count: int) -> grain.DatasetIterator:
  """Infinite iterator of this process's batches of global_batch_size //
  process_count rows (see module docstring); save `get_state()` to resume
  exactly with `set_state()`. Every process computes the rows of the whole
  global batch and keeps its slice, so the global batch of every step is the
  same whatever the number of processes (at the price of every process
  tokenizing every document)."""
  check_available(config)
  local_batch_size(global_batch_size, process_count)
  ds = _rows(config, config.data.train_split, seed=data_seed(config),
             train=True, num_packing_bins=global_batch_size)
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.map(_ProcessSlice(global_batch_size, process_index, process_count))
  if config.data.num_workers:
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return iter(ds)


class _ProcessSlice(grain.MapTransform):
  """A global eval batch (the last one short) -> this process's rows, padded
  with zero rows (mask 0)."""

  def __init__(self, global_batch_size: int, process_index: int,
               process_count: int):
    self.size = global_batch_size
    self.local = local_batch_size(global_batch_size, process_count)
    self.start = process_index * self.local

  def map(self, batch):
    out = {}
    for k, v in batch.items():
      v = np.pad(v, [(0, self.size - len(v))] + [(0, 0)] * (v.ndim - 1))
      out[k] = v[self.start:self.start + self.local]
    return out


def _with_mask(row):
  return {**row, 'mask': np.float32(1)}


def make_eval_iterable(config, *, global_batch_size: int, process_index: int,
                       process_count: int) -> grain.IterDataset:
  """This process's batches of one pass over the eval split (see module
  docstring), with a 'mask' float32 [b]; every process computes all rows,
  so every process yields ceil(rows / global_batch_size) batches."""
  check_available(config)
  ds = _rows(config, config.data.eval_split, seed=EVAL_SEED, train=False,
             num_packing_bins=global_batch_size)
  ds = ds.map(_with_mask).batch(global_batch_size)
  return ds.map(_ProcessSlice(global_batch_size, process_index,
                              process_count))


# ---- Causal language modelling rows (pgf.tasks.causal_lm) --------------------
#
# GPT-2 / nanoGPT style: every document is tokenized whole and followed by
# EOS (GPT-2's <|endoftext|> between documents), the documents of the stream
# are concatenated and split into rows of L + 1 tokens (grain's
# ConcatThenSplit, as span corruption's), and each row gives
#   'decoder_input_tokens'  int32 [L]   row[:-1]
#   'decoder_target_tokens' int32 [L]   row[1:], the next token of each input
#   'decoder_loss_weights'  float32 [L] 1 on real targets (0 on the padding
#                           of the stream's last row)
# (the names of seqio's LMFeatureConverter; L = data.targets_length, as its
# task_feature_lengths={'targets': L}). Rows do not overlap, so the pair
# (row[L], next row[0]) is no target: 1 / (L + 1) of the stream's pairs.
# Train and eval order, seeding, process slices and resumption are those of
# span corruption (module docstring); rows with no target are dropped.


class _TokenizeDocument(grain.MapTransform):
  """Document -> {'tokens': int32 [n]}, the whole document (a language model
  keeps it all, unlike T5's random 65,536-token chunk)."""

  def __init__(self, vocab: vocab_lib.Vocabulary, text_key: str):
    self.vocab = vocab
    self.text_key = text_key

  def map(self, element):
    text = element[self.text_key]
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    return {'tokens': np.asarray(self.vocab.encode(text), np.int32)}


class _AppendEos(grain.MapTransform):

  def __init__(self, eos_id: int):
    self.eos_id = eos_id

  def map(self, element):
    return {'tokens': np.append(element['tokens'], self.eos_id).astype(
        np.int32)}


def _has_target(element) -> bool:
  return np.count_nonzero(element['tokens_segment_ids']) >= 2


def lm_features(element) -> dict[str, np.ndarray]:
  """A ConcatThenSplit row {'tokens', 'tokens_segment_ids'} of L + 1 tokens
  -> the inputs, next-token targets and loss weights of length L."""
  tokens = element['tokens'].astype(np.int32)
  real = element['tokens_segment_ids'] > 0
  return {'decoder_input_tokens': tokens[:-1],
          'decoder_target_tokens': tokens[1:],
          'decoder_loss_weights': real[1:].astype(np.float32)}


def lm_rows(documents: grain.MapDataset, vocab: vocab_lib.Vocabulary, *,
            text_key: str, length: int) -> grain.IterDataset:
  """Documents {text_key: str | bytes} -> causal-LM rows of `length` inputs
  (see the comment above); empty documents are skipped."""
  ds = documents.map(_TokenizeDocument(vocab, text_key)).filter(_not_empty)
  ds = ds.map(_AppendEos(vocab.eos_id))
  ds = _ConcatThenSplit(ds.to_iter_dataset(), length + 1)
  return ds.filter(_has_target).map(lm_features)


def _lm_length(config) -> int:
  length = config.data.targets_length
  if isinstance(length, bool) or not isinstance(length, int) or length < 1:
    raise ValueError(f'data.targets_length={length!r} (the causal-LM row '
                     'length) must be a positive integer.')
  return length


def lm_check_available(config) -> None:
  """check_available of the causal-LM rows: the dataset (pgf_pydoc prepared
  on the spot), its text feature and splits, the vocabulary and length."""
  _prepared_builder(config)
  vocab_lib.get_vocabulary(config)
  _lm_length(config)


def _lm_info(num_train: int, num_eval: int, vocab_size: int,
             length: int) -> DataInfo:
  spec = {'decoder_input_tokens': ((length,), np.dtype(np.int32)),
          'decoder_target_tokens': ((length,), np.dtype(np.int32)),
          'decoder_loss_weights': ((length,), np.dtype(np.float32))}
  return DataInfo(
      num_train_examples=num_train, num_eval_examples=num_eval,
      num_classes=0, train_spec=spec,
      eval_spec={**spec, 'mask': ((), np.dtype(np.float32))},
      vocab_size=vocab_size)


def lm_dataset_info(config) -> DataInfo:
  """DataInfo of the causal-LM rows; examples count documents."""
  builder = _prepared_builder(config)
  splits, d = builder.info.splits, config.data
  return _lm_info(splits[d.train_split].num_examples,
                  splits[d.eval_split].num_examples,
                  vocab_lib.get_vocabulary(config).vocab_size,
                  _lm_length(config))


def lm_published_info(config, num_train: int, num_eval: int,
                      num_classes: int) -> DataInfo:
  """DataInfo from published sizes (dry runs without the data), with the
  vocabulary size `published_info` finds."""
  vocab_size = published_info(config, num_train, num_eval,
                              num_classes).vocab_size
  return _lm_info(num_train, num_eval, vocab_size, _lm_length(config))


def _lm_split_rows(config, split: str, *, train: bool) -> grain.IterDataset:
  d = config.data
  source = tfds.data_source(d.name, split=split,
                            data_dir=builders.config_data_dir(config),
                            download=False)
  ds = grain.MapDataset.source(source)
  if train:
    ds = ds.seed(data_seed(config)).shuffle().repeat(None)
  return lm_rows(ds, vocab_lib.get_vocabulary(config), text_key=d.text_key,
                 length=_lm_length(config))


def make_lm_train_iterator(config, *, global_batch_size: int,
                           process_index: int, process_count: int
                           ) -> grain.DatasetIterator:
  """Infinite iterator of this process's causal-LM batches; the documents
  reshuffled each epoch from the data seed, every process computing the
  whole global batch and keeping its slice (as `make_train_iterator`), so
  `get_state()` / `set_state()` resume bit-exactly."""
  lm_check_available(config)
  local_batch_size(global_batch_size, process_count)
  ds = _lm_split_rows(config, config.data.train_split, train=True)
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.map(_ProcessSlice(global_batch_size, process_index, process_count))
  if config.data.num_workers:
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return iter(ds)


def make_lm_eval_iterable(config, *, global_batch_size: int,
                          process_index: int, process_count: int
                          ) -> grain.IterDataset:
  """This process's batches of one pass over the eval split's causal-LM
  rows, in document order, with a 'mask' float32 [b] (as
  `make_eval_iterable`)."""
  lm_check_available(config)
  ds = _lm_split_rows(config, config.data.eval_split, train=False)
  ds = ds.map(_with_mask).batch(global_batch_size)
  return ds.map(_ProcessSlice(global_batch_size, process_index,
                              process_count))
