"""Vocabularies for T5: T5's byte-level one and SentencePiece models.

Both follow T5's id conventions (seqio): 0 pad, 1 eos, 2 unk, and 100 extra
ids ("sentinels") at the top of the id range, counting down: <extra_id_0> is
the highest id, `vocab_size - 1`, <extra_id_1> the one below, and so on. Span
corruption replaces the i-th noise span with `sentinel_id(i)`.

  ByteVocabulary        259 + 100 = 359 ids (the model pads its embedding
                        to 384, a multiple of 128).
  SentencePieceVocabulary(path)
                        the model's pieces + 100; T5's standard vocabulary
                        (gs://t5-data/vocabs/cc_all.32000/sentencepiece.model)
                        gives 32000 + 100 = 32100 ids, embedding 32128.
                        pgf downloads nothing: `path` is a local file.

`train_sentencepiece` trains a small model offline with T5's special ids
(scripts/train_sentencepiece.py does it on pgf_pydoc).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import functools
import os

import numpy as np

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_EXTRA_IDS = 100  # T5's sentinels.


class Vocabulary:
  """Common interface: encode/decode, sizes, special and sentinel ids.

  Subclasses define `base_vocab_size` (ids below the sentinels) and the
  `_decode_base` of a run of such ids.
  """

  pad_id = PAD_ID
  eos_id = EOS_ID
  unk_id = UNK_ID

  def __init__(self, extra_ids: int):
    self.extra_ids = extra_ids

  @property
  def base_vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    return self.base_vocab_size + self.extra_ids

  def sentinel_id(self, i: int) -> int:
    """Id of <extra_id_i>: the highest id for i = 0, counting down."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f'Sentinel {i} outside the {self.extra_ids} extra ids.')
    return self.vocab_size - 1 - i

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_base(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; sentinels read '<extra_id_i>', ids past the
    vocabulary (the embedding's padding rows) are dropped."""
    out, run = [], []
    for i in map(int, ids):
      if i < self.base_vocab_size:
        run.append(i)
        continue
      out.append(self._decode_base(run))
      run = []
      if i < self.vocab_size:
        out.append(f'<extra_id_{self.vocab_size - 1 - i}>')
    out.append(self._decode_base(run))
    return ''.join(out)


class ByteVocabulary(Vocabulary):
  """T5's ByteVocabulary: UTF-8 bytes at ids 3..258, sentinels 259..358."""

  OFFSET = 3  # pad, eos, unk come first.

  def __init__(self, extra_ids: int = NUM_EXTRA_IDS):
    super().__init__(extra_ids)

  @property
  def base_vocab_size(self) -> int:
    return self.OFFSET + 256

  def encode(self, text: str) -> list[int]:
    data = np.frombuffer(text.encode('utf-8'), np.uint8)
    return (data.astype(np.int32) + self.OFFSET).tolist()

  def _decode_base(self, ids: Sequence[int]) -> str:
    data = bytes(i - self.OFFSET for i in ids if i >= self.OFFSET)
    return data.decode('utf-8', errors='ignore')


class SentencePieceVocabulary(Vocabulary):
  """A SentencePiece model file plus `extra_ids` sentinels above its pieces.

  The model must use T5's ids (pad 0, eos 1, unk 2), as T5's own vocabulary
  and models from `train_sentencepiece` do: the pipeline pads with 0 and ends
  sequences with 1.
  """

  def __init__(self, path: str, extra_ids: int = NUM_EXTRA_IDS):
    super().__init__(extra_ids)
    self.path = path
    with open(path, 'rb') as f:
      self._proto = f.read()
    self._load()

  def _load(self) -> None:
    import sentencepiece as spm  # Only SentencePiece users need it.
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(
          f'SentencePiece model {self.path} has (pad, eos, unk) ids {ids}; '
          f'T5 needs {(PAD_ID, EOS_ID, UNK_ID)}. Use T5\'s vocabulary or '
          'train one with scripts/train_sentencepiece.py.')

  # Grain worker processes receive the vocabulary pickled: send the model
  # bytes, not the C++ processor.
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_sp'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  @property
  def base_vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def _decode_base(self, ids: Sequence[int]) -> str:
    return self._sp.decode(list(ids))


@functools.cache
def _cached_vocabulary(kind: str, path: str) -> Vocabulary:
  if kind == 'byte':
    return ByteVocabulary()
  return SentencePieceVocabulary(path)


def get_vocabulary(config) -> Vocabulary:
  """The vocabulary `config.data.vocab` names ('byte' | 'sentencepiece')."""
  d = config.data
  if d.vocab == 'sentencepiece':
    if not d.vocab_path:
      raise ValueError(
          "data.vocab='sentencepiece' needs data.vocab_path, a local "
          "SentencePiece .model file (T5's is gs://t5-data/vocabs/"
          'cc_all.32000/sentencepiece.model; scripts/train_sentencepiece.py '
          'trains a small one).')
    if not os.path.isfile(d.vocab_path):
      raise ValueError(f'data.vocab_path={d.vocab_path!r} is not a file.')
    return _cached_vocabulary('sentencepiece', os.path.abspath(d.vocab_path))
  if d.vocab == 'byte':
    return _cached_vocabulary('byte', '')
  raise ValueError(f"data.vocab={d.vocab!r}: valid choices are 'byte', "
                   "'sentencepiece'.")


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int,
                        model_prefix: str) -> str:
  """Trains a unigram SentencePiece model with T5's ids; returns its path.

  Writes `model_prefix`.model and .vocab. Unlike T5's vocabulary, text is
  not normalised and newlines are a piece of their own, so
  decode(encode(text)) == text for every character seen in training.
  `vocab_size` counts the pieces (without the extra ids).
  """
  import sentencepiece as spm  # Only SentencePiece users need it.
  # SentencePiece skips "sentences" over max_sentence_length bytes; feed
  # lines (the newlines come back through the '\n' piece).
  lines = (line for text in texts for line in text.splitlines() if line)
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_prefix=model_prefix,
      vocab_size=vocab_size, model_type='unigram', character_coverage=1.0,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      normalization_rule_name='identity', remove_extra_whitespaces=False,
      user_defined_symbols=['\n'], minloglevel=2)
  return model_prefix + '.model'
