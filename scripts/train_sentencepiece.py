r"""Trains a SentencePiece vocabulary with T5's ids on a TFDS text dataset.

  python scripts/train_sentencepiece.py --data_dir=/tmp/tfds \
      --vocab_size=2000 --output=/tmp/pydoc_sp2000.model

then train with --config.data.vocab=sentencepiece
--config.data.vocab_path=/tmp/pydoc_sp2000.model and model.vocab_size of at
least vocab_size + 100 (the sentinels), rounded up to a multiple of 128.
The default dataset, pgf_pydoc, is prepared offline on first use; any other
TFDS dataset must already be prepared in array_record format.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pgf.data import builders  # noqa: E402
from pgf.data import vocab as vocab_lib  # noqa: E402

_DATASET = flags.DEFINE_string('dataset', 'pgf_pydoc', 'TFDS dataset name.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Split to train on.')
_TEXT_KEY = flags.DEFINE_string('text_key', 'text', 'Feature with the text.')
_VOCAB_SIZE = flags.DEFINE_integer(
    'vocab_size', 2000, 'SentencePiece pieces (without the 100 extra ids).')
_MAX_DOCUMENTS = flags.DEFINE_integer(
    'max_documents', 100_000, 'Read at most this many documents.')
_OUTPUT = flags.DEFINE_string('output', None, 'Path of the .model to write.',
                              required=True)


def main(argv):
  del argv
  builders.ensure_prepared(_DATASET.value, _DATA_DIR.value)
  source = tfds.data_source(_DATASET.value, split=_SPLIT.value,
                            data_dir=_DATA_DIR.value, download=False)
  n = min(len(source), _MAX_DOCUMENTS.value)

  def texts():
    for i in range(n):
      text = source[i][_TEXT_KEY.value]
      yield text.decode('utf-8') if isinstance(text, bytes) else text

  prefix = _OUTPUT.value.removesuffix('.model')
  path = vocab_lib.train_sentencepiece(texts(), vocab_size=_VOCAB_SIZE.value,
                                       model_prefix=prefix)
  vocab = vocab_lib.SentencePieceVocabulary(path)
  logging.info('Wrote %s from %d documents of %s[%s]: %d pieces + %d extra '
               'ids = %d ids.', path, n, _DATASET.value, _SPLIT.value,
               vocab.base_vocab_size, vocab.extra_ids, vocab.vocab_size)


if __name__ == '__main__':
  app.run(main)
