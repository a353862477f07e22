"""pgf's English text datasets, prepared offline: pgf_pydoc, pgf_python_docs.

pgf_pydoc: English text that ships with Python. The source is
`pydoc_data.topics.topics`, the language reference topics that `help('if')`
prints (79 topics, about 465,000 characters on Python 3.11). No download, no
TensorFlow: a real text corpus for tests and laptop runs of T5.

Documents: each topic's paragraphs (separated by blank lines) are grouped, in
order, into documents of at most MAX_DOCUMENT_CHARS characters (a longer
paragraph stands alone); example key '<topic>/<index>'.
Splits (deterministic, no RNG): a whole topic goes to 'validation' when
crc32(topic name) % 10 == 0, else to 'train', so no topic is in both. On
Python 3.11.7: 263 train and 25 validation documents (5 topics, 42,706
characters); other Python versions ship slightly different text.

pgf_python_docs: a larger corpus, the reST sources of the Python 3.11
documentation (PSF licence) that Debian/Ubuntu's `python3.11-doc` installs
in /usr/share/doc/python3.11/html/_sources (every `**/*.rst.txt`, about
11 MB); data.source_dir names another folder with the same layout. Each
file is cleaned (`clean_rest`: reST comments, hyperlink targets and the
directives that carry no prose, MARKUP_ONLY_DIRECTIVES such as `.. index::`,
are dropped with their indented bodies; everything else stays as written,
markup included), then its paragraphs (runs of non-blank lines) are grouped
as pgf_pydoc's; key '<path relative to the folder>/<index>'. Prepared in
about 0.5 s. A whole file goes to 'validation'
when crc32(its relative path) % 20 == 0, else to 'train'. From Debian's
python3.11-doc 3.11.2 (497 files, 11,047,501 characters): 5709 train
documents (480 files, 10,260,044 characters after cleaning) and 281
validation documents (17 files, 525,424 characters).

Feature of both: 'text', a scalar string (tfds.features.Tensor of np.str_,
which TFDS encodes without TensorFlow); reading yields UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import os
import pathlib
import re
import zlib

import numpy as np
import tensorflow_datasets as tfds

from pgf.data import builders

NAME = 'pgf_pydoc'
MAX_DOCUMENT_CHARS = 2000
VALIDATION_BUCKETS = 10  # crc32 % 10 == 0: about a tenth of the topics.


def split_of(topic: str, buckets: int = VALIDATION_BUCKETS) -> str:
  """'validation' when crc32(topic) % buckets == 0, else 'train'."""
  return 'validation' if zlib.crc32(topic.encode()) % buckets == 0 else 'train'


def group_paragraphs(paragraphs: Iterable[str],
                     max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
  """Consecutive paragraphs joined by blank lines into documents of at most
  `max_chars` characters, in order; a longer paragraph stands alone."""
  groups, size = [[]], 0
  for p in paragraphs:
    if groups[-1] and size + len(p) > max_chars:
      groups.append([])
      size = 0
    groups[-1].append(p)
    size += len(p) + 2
  return ['\n\n'.join(group) for group in groups if group]


def documents(split: str) -> Iterator[tuple[str, str]]:
  """(key, text) of the split's documents, in topic and paragraph order."""
  from pydoc_data.topics import topics
  for topic in sorted(topics):
    if split_of(topic) != split:
      continue
    paragraphs = [p for p in topics[topic].split('\n\n') if p.strip()]
    for i, document in enumerate(group_paragraphs(paragraphs)):
      yield f'{topic}/{i}', document


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


# ---- pgf_python_docs ---------------------------------------------------------

PYTHON_DOCS_SOURCE_DIR = '/usr/share/doc/python3.11/html/_sources'
PYTHON_DOCS_PATTERN = '*.rst.txt'  # Searched in every subfolder.
PYTHON_DOCS_VALIDATION_BUCKETS = 20  # crc32 % 20 == 0: about 5 % of files.
# Directives whose content is markup for Sphinx, not prose: index entries,
# table-of-contents trees, authors, included files, table layouts, images,
# doctest set-up. Other directives (function signatures, notes, code, ...)
# are kept as written.
MARKUP_ONLY_DIRECTIVES = frozenset({
    'contents', 'currentmodule', 'highlight', 'image', 'include', 'index',
    'literalinclude', 'moduleauthor', 'sectionauthor', 'tabularcolumns',
    'testcleanup', 'testsetup', 'toctree'})
# An explicit markup start: '..' then whitespace or the end of the line
# (so '...' doctest prompts do not match); group 2 is the rest.
_EXPLICIT_MARKUP = re.compile(r'^(\s*)\.\.(?:\s+(.*))?$')
_DIRECTIVE = re.compile(r'([A-Za-z][\w:+.-]*?)::(?:\s|$)')


def _is_dropped_markup(rest: str) -> bool:
  """Whether the explicit markup block whose first line continues with
  `rest` after '.. ' is dropped: comments (anything that is not a
  directive, footnote, citation or substitution), hyperlink targets
  ('_name:') and MARKUP_ONLY_DIRECTIVES."""
  directive = _DIRECTIVE.match(rest)
  if directive:
    return directive.group(1) in MARKUP_ONLY_DIRECTIVES
  return not rest.startswith(('[', '|'))


def clean_rest(text: str) -> str:
  """`text` without the markup blocks `_is_dropped_markup` names.

  A block is its first line plus the lines after it that are blank or
  indented deeper than its '..' (reST's rule), so a comment's or a
  toctree's body goes with it. Trailing whitespace is stripped.
  """
  lines, block_indent = [], None
  for line in text.splitlines():
    if block_indent is not None:
      if not line.strip() or len(line) - len(line.lstrip()) > block_indent:
        continue
      block_indent = None
    markup = _EXPLICIT_MARKUP.match(line)
    if markup and _is_dropped_markup(markup.group(2) or ''):
      block_indent = len(markup.group(1))
      continue
    lines.append(line.rstrip())
  return '\n'.join(lines)


def _paragraphs(text: str) -> list[str]:
  """Runs of non-blank lines, each joined by newlines."""
  paragraphs, current = [], []
  for line in text.splitlines() + ['']:
    if line.strip():
      current.append(line)
    elif current:
      paragraphs.append('\n'.join(current))
      current = []
  return paragraphs


def python_docs_files(source_dir: str) -> list[str]:
  """Relative paths ('/'-separated, sorted) of the reST sources below
  `source_dir`."""
  root = pathlib.Path(source_dir)
  return sorted(path.relative_to(root).as_posix()
                for path in root.rglob(PYTHON_DOCS_PATTERN)
                if path.is_file())


def python_docs_documents(source_dir: str,
                          split: str) -> Iterator[tuple[str, str]]:
  """(key, text) of the split's documents, in file and paragraph order."""
  for relative in python_docs_files(source_dir):
    if split_of(relative, PYTHON_DOCS_VALIDATION_BUCKETS) != split:
      continue
    with open(os.path.join(source_dir, relative), encoding='utf-8') as f:
      text = clean_rest(f.read())
    for i, document in enumerate(group_paragraphs(_paragraphs(text))):
      yield f'{relative}/{i}', document


class PgfPythonDocs(builders.LocalSource, tfds.core.GeneratorBasedBuilder):
  """The Python 3.11 documentation's reST sources (see module doc)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  DEFAULT_SOURCE_DIR = PYTHON_DOCS_SOURCE_DIR
  SOURCE_PACKAGE = 'python3.11-doc'
  MANUAL_DOWNLOAD_INSTRUCTIONS = builders.source_instructions(
      SOURCE_PACKAGE, DEFAULT_SOURCE_DIR,
      "the Python documentation's reST sources (**/*.rst.txt)")

  @classmethod
  def missing_source_files(cls, source_dir: str) -> list[str]:
    if os.path.isdir(source_dir) and python_docs_files(source_dir):
      return []
    return [f'reST sources ({os.path.join("**", PYTHON_DOCS_PATTERN)})']

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly, a string Tensor feature: see PgfPydoc._info.
    return tfds.core.DatasetInfo(
        builder=self,
        description=('The reST sources of the Python 3.11 documentation, '
                     'lightly cleaned and split into paragraph groups.'),
        features=tfds.features.FeaturesDict(
            {'text': tfds.features.Tensor(shape=(), dtype=np.str_)}),
        homepage='https://docs.python.org/3.11/',
        license='PSF-2.0',
    )

  def _split_generators(self, dl_manager):
    source = self._source_dir(dl_manager)
    return {split: self._generate_examples(source, split)
            for split in ('train', 'validation')}

  def _generate_examples(self, source: str, split: str):
    for key, text in python_docs_documents(source, split):
      yield key, {'text': text}
