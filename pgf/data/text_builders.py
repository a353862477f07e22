"""pgf_pydoc: English text that ships with Python, as a TFDS dataset.

The source is `pydoc_data.topics.topics`, the language reference topics that
`help('if')` prints (79 topics, about 465,000 characters on Python 3.11). No
download, no TensorFlow: a real text corpus for tests and laptop runs of T5.

Documents: each topic's paragraphs (separated by blank lines) are grouped, in
order, into documents of at most MAX_DOCUMENT_CHARS characters (a longer
paragraph stands alone); example key '<topic>/<index>'.
Splits (deterministic, no RNG): a whole topic goes to 'validation' when
crc32(topic name) % 10 == 0, else to 'train', so no topic is in both. On
Python 3.11.7: 263 train and 25 validation documents (5 topics, 42,706
characters); other Python versions ship slightly different text.

Feature: 'text', a scalar string (tfds.features.Tensor of np.str_, which
TFDS encodes without TensorFlow); reading yields UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
import zlib

import numpy as np
import tensorflow_datasets as tfds

from pgf.data import builders

NAME = 'pgf_pydoc'
MAX_DOCUMENT_CHARS = 2000
VALIDATION_BUCKETS = 10  # crc32 % 10 == 0: about a tenth of the topics.


def split_of(topic: str) -> str:
  return ('validation' if zlib.crc32(topic.encode()) % VALIDATION_BUCKETS == 0
          else 'train')


def documents(split: str) -> Iterator[tuple[str, str]]:
  """(key, text) of the split's documents, in topic and paragraph order."""
  from pydoc_data.topics import topics
  for topic in sorted(topics):
    if split_of(topic) != split:
      continue
    paragraphs = [p for p in topics[topic].split('\n\n') if p.strip()]
    groups, size = [[]], 0
    for p in paragraphs:
      if groups[-1] and size + len(p) > MAX_DOCUMENT_CHARS:
        groups.append([])
        size = 0
      groups[-1].append(p)
      size += len(p) + 2
    for i, group in enumerate(groups):
      if group:
        yield f'{topic}/{i}', '\n\n'.join(group)


class PgfPydoc(tfds.core.GeneratorBasedBuilder):
  """Python's pydoc topics: English prose about Python (see module doc)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` needs the builder to live in
    # a TFDS dataset package directory.
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Python's pydoc topic help (pydoc_data.topics), split "
                     'into paragraph groups.'),
        # tfds.features.Text needs TensorFlow to encode; a string Tensor not.
        features=tfds.features.FeaturesDict(
            {'text': tfds.features.Tensor(shape=(), dtype=np.str_)}),
        homepage='https://docs.python.org/3/reference/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split)
            for split in ('train', 'validation')}

  def _generate_examples(self, split):
    for key, text in documents(split):
      yield key, {'text': text}


def ensure_prepared(data_dir: str | None) -> None:
  """Prepares pgf_pydoc in `data_dir` (None: TFDS's default) if needed."""
  builders.ensure_prepared(NAME, data_dir)
