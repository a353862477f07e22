"""pgf's builders from local files: the IDX parser, pgf_fashion_mnist and
pgf_python_docs on small files made here and on the Debian packages' real
files, the missing-source message and data.source_dir."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pgf import data
from pgf.configs.base import get_base_config
from pgf.data import builders
from pgf.data import images
from pgf.data import text_builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = 'pgf_fashion_mnist'
DOCS = 'pgf_python_docs'
FASHION_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                 't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')


def _write_gz(path, content: bytes) -> str:
  with gzip.open(path, 'wb') as f:
    f.write(content)
  return str(path)


def _idx_bytes(array: np.ndarray) -> bytes:
  """uint8 IDX: 0, 0, type 0x08, ndim, big-endian uint32 sizes, values."""
  header = b'\0\0\x08' + bytes([array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  return header + array.astype(np.uint8).tobytes()


# Hand-made IDX files: 3 images of 2x2 and their 3 labels.
IMAGES_3X2X2 = (b'\x00\x00\x08\x03' b'\x00\x00\x00\x03'
                b'\x00\x00\x00\x02' b'\x00\x00\x00\x02'
                + bytes([0, 255, 7, 128, 1, 2, 3, 4, 250, 9, 16, 99]))
LABELS_3 = b'\x00\x00\x08\x01' b'\x00\x00\x00\x03' + bytes([9, 0, 3])


# ---- IDX parser -------------------------------------------------------------

def test_read_idx_hand_made_images_and_labels(tmp_path):
  images = builders.read_idx(_write_gz(tmp_path / 'i.gz', IMAGES_3X2X2),
                             magic=builders.IDX_IMAGES_MAGIC)
  assert images.dtype == np.uint8 and images.shape == (3, 2, 2)
  np.testing.assert_array_equal(
      images, [[[0, 255], [7, 128]], [[1, 2], [3, 4]], [[250, 9], [16, 99]]])
  labels = builders.read_idx(_write_gz(tmp_path / 'l.gz', LABELS_3),
                             magic=builders.IDX_LABELS_MAGIC)
  assert labels.dtype == np.uint8
  np.testing.assert_array_equal(labels, [9, 0, 3])
  # Other IDX types are big-endian: int16 0xfffe = -2, 0x0102 = 258.
  int16 = builders.read_idx(_write_gz(
      tmp_path / 's.gz',
      b'\x00\x00\x0b\x01\x00\x00\x00\x02\xff\xfe\x01\x02'))
  assert int16.dtype == np.int16 and int16.tolist() == [-2, 258]


@pytest.mark.parametrize('content,message', [
    (LABELS_3, r'magic number 0x00000801, expected 0x00000803'),
    (b'\x1f\x8b\x08\x03' + IMAGES_3X2X2[4:], r'not an IDX file: magic '
     r'number 0x1f8b0803'),
    (IMAGES_3X2X2[:-1], r'truncated: its header says shape \(3, 2, 2\) '
     r'\(12 bytes of values\) but 11 bytes'),
    (IMAGES_3X2X2 + b'\0', r'too long: .* but 13 bytes'),
    (IMAGES_3X2X2[:10], r'truncated inside its header'),
    (b'\0\0', r'truncated: 2 bytes'),
])
def test_read_idx_errors_name_the_file(tmp_path, content, message):
  path = _write_gz(tmp_path / 'bad-idx3.gz', content)
  with pytest.raises(builders.IdxFormatError,
                     match=r'bad-idx3\.gz (is|has) .*' + message):
    builders.read_idx(path, magic=builders.IDX_IMAGES_MAGIC)


def test_read_idx_truncated_or_not_gzip(tmp_path):
  path = _write_gz(tmp_path / 'cut.gz', IMAGES_3X2X2)
  with open(path, 'rb') as f:
    compressed = f.read()
  with open(path, 'wb') as f:  # A download cut short.
    f.write(compressed[:len(compressed) // 2])
  with pytest.raises(builders.IdxFormatError,
                     match=r'cut\.gz is not a complete gzip file'):
    builders.read_idx(path)
  plain = tmp_path / 'plain.gz'
  plain.write_bytes(IMAGES_3X2X2)  # Not compressed at all.
  with pytest.raises(builders.IdxFormatError,
                     match=r'plain\.gz is not a complete gzip file'):
    builders.read_idx(str(plain))


# ---- pgf_fashion_mnist on fake files ----------------------------------------

def _fake_images(n: int, seed: int) -> np.ndarray:
  """n distinct uint8 [28, 28] images: (position * (k + seed)) % 256."""
  grid = np.arange(28 * 28).reshape(28, 28)
  return np.stack([(grid * (k + seed)) % 256 for k in range(1, n + 1)]
                  ).astype(np.uint8)


TRAIN_LABELS, TEST_LABELS = [9, 0, 0, 3, 0, 2], [9, 2]


@pytest.fixture
def fake_fashion(tmp_path):
  """A source folder with six train and two test 28x28 images."""
  source = tmp_path / 'fashion_source'
  source.mkdir()
  arrays = (_fake_images(6, 0), np.array(TRAIN_LABELS),
            _fake_images(2, 7), np.array(TEST_LABELS))
  for name, array in zip(FASHION_FILES, arrays):
    _write_gz(source / name, _idx_bytes(array))
  return str(source), arrays


def test_fashion_builder_from_fake_files(tmp_path, fake_fashion):
  source, (train_images, _, test_images, _) = fake_fashion
  data_dir = str(tmp_path / 'tfds')
  assert builders.ensure_prepared(FASHION, data_dir, source_dir=source)
  builder = tfds.builder(FASHION, data_dir=data_dir)
  assert builder.info.splits['train'].num_examples == 6
  assert builder.info.splits['test'].num_examples == 2
  assert builder.info.features['label'].names[9] == 'Ankle boot'
  assert builder.info.features['label'].names[0] == 'T-shirt/top'
  for split, written, labels in (('train', train_images, TRAIN_LABELS),
                                 ('test', test_images, TEST_LABELS)):
    source_ = tfds.data_source(FASHION, split=split, data_dir=data_dir,
                               download=False)
    examples = [source_[i] for i in range(len(source_))]
    # In file order, exactly the pixels written.
    assert [int(ex['label']) for ex in examples] == labels
    for ex, image in zip(examples, written):
      assert ex['image'].shape == (28, 28, 1)
      assert ex['image'].dtype == np.uint8
      np.testing.assert_array_equal(ex['image'][..., 0], image)


def test_fashion_inconsistent_files(tmp_path):
  for name, array in (('train-images-idx3-ubyte.gz', _fake_images(3, 0)),
                      ('train-labels-idx1-ubyte.gz', np.array([1, 2]))):
    _write_gz(tmp_path / name, _idx_bytes(array))
  with pytest.raises(builders.IdxFormatError,
                     match=r'train-images-idx3-ubyte\.gz holds 3 images but '
                     r'.*train-labels-idx1-ubyte\.gz 2 labels'):
    builders.read_fashion_mnist(str(tmp_path), 'train')
  _write_gz(tmp_path / 'train-labels-idx1-ubyte.gz',
            _idx_bytes(np.array([1, 10, 2])))
  with pytest.raises(builders.IdxFormatError,
                     match=r'labels-idx1-ubyte\.gz holds label 10; classes '
                     r'are 0\.\.9'):
    builders.read_fashion_mnist(str(tmp_path), 'train')
  _write_gz(tmp_path / 'train-images-idx3-ubyte.gz', IMAGES_3X2X2)
  with pytest.raises(builders.IdxFormatError,
                     match=r'images of shape \(2, 2\), not \(28, 28\)'):
    builders.read_fashion_mnist(str(tmp_path), 'train')


def test_fashion_missing_source_one_clear_message(tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  nowhere = str(tmp_path / 'nowhere')
  with pytest.raises(builders.SourceNotFoundError) as e:
    builders.ensure_prepared(FASHION, data_dir, source_dir=nowhere)
  message = str(e.value)
  assert isinstance(e.value, data.DatasetNotPreparedError)
  assert isinstance(e.value, ValueError)
  assert f'{nowhere} (no such folder) lacks' in message
  assert all(name in message for name in FASHION_FILES)
  assert '`apt-get install -y dataset-fashion-mnist`' in message
  assert '--config.data.source_dir=DIR' in message
  assert not os.path.exists(os.path.join(data_dir, FASHION))
  # A folder with half of the files: only the missing half is named.
  partial = tmp_path / 'partial'
  partial.mkdir()
  for name in FASHION_FILES[:2]:
    _write_gz(partial / name, b'')
  with pytest.raises(builders.SourceNotFoundError,
                     match=rf'{partial} lacks t10k-images-idx3-ubyte\.gz, '
                     r't10k-labels-idx1-ubyte\.gz\. Install'):
    builders.ensure_prepared(FASHION, data_dir, source_dir=str(partial))
  # TFDS's own path (no manual_dir given: <data_dir>/downloads/manual) says
  # the same through MANUAL_DOWNLOAD_INSTRUCTIONS.
  with pytest.raises(builders.SourceNotFoundError,
                     match=r'(?s)downloads/manual does not exist .*`apt-get '
                     r'install -y dataset-fashion-mnist`.*source_dir=DIR'):
    tfds.builder(FASHION, data_dir=data_dir).download_and_prepare(
        file_format=builders.FILE_FORMAT)
  # Without source_dir, the default folder is the one looked in.
  monkeypatch.setattr(builders.PgfFashionMnist, 'DEFAULT_SOURCE_DIR', nowhere)
  with pytest.raises(builders.SourceNotFoundError, match=rf'{nowhere} \(no'):
    builders.ensure_prepared(FASHION, data_dir)


def _vision_config(data_dir, source_dir):
  c = get_base_config()
  c.data.name = FASHION
  c.data.data_dir = data_dir
  c.data.source_dir = source_dir
  c.data.image_size = 28
  return c


def test_config_source_dir_is_honoured(tmp_path, fake_fashion):
  source, _ = fake_fashion
  missing = str(tmp_path / 'missing')
  with pytest.raises(builders.SourceNotFoundError, match=missing):
    images.check_available(_vision_config(str(tmp_path / 'tfds'), missing))
  info = images.dataset_info(_vision_config(str(tmp_path / 'tfds'), source))
  assert (info.num_train_examples, info.num_eval_examples) == (6, 2)
  assert info.train_spec['image'] == ((28, 28, 1), np.float32)
  # Once prepared, the source is no longer read.
  images.check_available(_vision_config(str(tmp_path / 'tfds'), missing))


# ---- The real Fashion-MNIST (Debian's dataset-fashion-mnist) ----------------

@pytest.fixture(scope='module')
def real_fashion(data_dir):
  if builders.PgfFashionMnist.missing_source_files(
      builders.FASHION_MNIST_SOURCE_DIR):
    pytest.skip(f'{builders.FASHION_MNIST_SOURCE_DIR} lacks the Fashion-MNIST '
                'files (apt-get install -y dataset-fashion-mnist).')
  assert builders.ensure_prepared(FASHION, data_dir)
  return data_dir


def test_real_fashion_mnist(real_fashion):
  builder = tfds.builder(FASHION, data_dir=real_fashion)
  for split, n, first_labels in (('train', 60_000, [9, 0, 0, 3, 0, 2]),
                                 ('test', 10_000, [9, 2, 1, 1, 6, 1])):
    assert builder.info.splits[split].num_examples == n
    source = tfds.data_source(FASHION, split=split, data_dir=real_fashion,
                              download=False)
    examples = source.__getitems__(list(range(n)))
    labels = np.array([ex['label'] for ex in examples])
    assert labels[:6].tolist() == first_labels  # 9: ankle boot.
    np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                  [n // 10] * 10)
    raw_images, _ = builders.read_fashion_mnist(
        builders.FASHION_MNIST_SOURCE_DIR, split)
    for i in (0, 1, n - 1):
      np.testing.assert_array_equal(examples[i]['image'][..., 0],
                                    raw_images[i])
    assert examples[0]['image'].max() == 255


# ---- pgf_python_docs --------------------------------------------------------

INTRO = """\
.. Licence comment that
   spans two lines.

.. _intro:

Introduction
============

.. index:: single: intro
   pair: intro; example

Python is a language.
It is easy.

.. note::

   Keep this note.
   >>> f(
   ... 1)

.. toctree::
   :maxdepth: 1

   guide/setup

Last paragraph.\x20\x20
"""
# clean_rest drops the comment, the target, the index and the toctree with
# their bodies; the note stays; paragraphs are runs of non-blank lines.
INTRO_DOCUMENT = (
    'Introduction\n============\n\nPython is a language.\nIt is easy.\n\n'
    '.. note::\n\n   Keep this note.\n   >>> f(\n   ... 1)\n\n'
    'Last paragraph.')
# 900-character paragraphs: two fit in MAX_DOCUMENT_CHARS = 2000, not three.
LONG = ['A' * 900, 'B' * 900, 'C' * 900]


@pytest.fixture
def fake_docs(tmp_path):
  """A tiny reST source tree; crc32('guide/part1.rst.txt') % 20 == 0 puts
  that file in 'validation', the others (10, 4 and 7) in 'train'."""
  root = tmp_path / 'docs_source'
  (root / 'guide').mkdir(parents=True)
  (root / 'intro.rst.txt').write_text(INTRO, encoding='utf-8')
  (root / 'guide' / 'setup.rst.txt').write_text('\n\n\n'.join(LONG) + '\n')
  (root / 'guide' / 'part1.rst.txt').write_text('Validation text.\n')
  (root / 'guide' / 'part20.rst.txt').write_text('Bucket 10 of 20.\n')
  (root / 'notes.txt').write_text('Not a reST source.\n')
  return str(root)


def test_clean_rest_hand_made():
  assert text_builders.clean_rest(
      'Text.\n..\n   empty comment body\nMore.\n'
      '   .. index:: nested\n      body\n   Indented kept.\n'
      '.. [1] A footnote.\n.. |sub| replace:: kept\n'
      '.. _label: https://x\n.. code-block:: python\n\n   x = 1\n'
      '... not markup') == (
          'Text.\nMore.\n   Indented kept.\n.. [1] A footnote.\n'
          '.. |sub| replace:: kept\n.. code-block:: python\n\n   x = 1\n'
          '... not markup')


def test_python_docs_documents_and_split(fake_docs):
  assert text_builders.split_of('guide/part1.rst.txt', 20) == 'validation'
  assert text_builders.python_docs_files(fake_docs) == [
      'guide/part1.rst.txt', 'guide/part20.rst.txt', 'guide/setup.rst.txt',
      'intro.rst.txt']
  assert list(text_builders.python_docs_documents(fake_docs, 'train')) == [
      ('guide/part20.rst.txt/0', 'Bucket 10 of 20.'),
      ('guide/setup.rst.txt/0', LONG[0] + '\n\n' + LONG[1]),
      ('guide/setup.rst.txt/1', LONG[2]),
      ('intro.rst.txt/0', INTRO_DOCUMENT)]
  assert list(text_builders.python_docs_documents(
      fake_docs, 'validation')) == [('guide/part1.rst.txt/0',
                                     'Validation text.')]


def test_python_docs_builder_from_fake_tree(tmp_path, fake_docs):
  data_dir = str(tmp_path / 'tfds')
  c = get_base_config()
  c.data.name, c.data.data_dir, c.data.source_dir = DOCS, data_dir, fake_docs
  builder, _ = builders.open_builder(c)  # Prepares from data.source_dir.
  assert builder.info.splits['train'].num_examples == 4
  assert builder.info.splits['validation'].num_examples == 1
  texts = {split: sorted(ex['text'].decode() for ex in tfds.data_source(
      DOCS, split=split, data_dir=data_dir, download=False))
           for split in ('train', 'validation')}
  assert texts == {
      'train': sorted([LONG[0] + '\n\n' + LONG[1], LONG[2], INTRO_DOCUMENT,
                       'Bucket 10 of 20.']),
      'validation': ['Validation text.']}


def test_python_docs_missing_source(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'index.html').write_text('<html></html>')
  for folder, where in ((str(empty), f'{empty} lacks'),
                        (str(tmp_path / 'none'), f'{tmp_path}/none (no such '
                         'folder) lacks')):
    with pytest.raises(builders.SourceNotFoundError) as e:
      builders.ensure_prepared(DOCS, str(tmp_path / 'tfds'),
                               source_dir=folder)
    message = str(e.value)
    assert message.startswith(f'{DOCS} is prepared from local files, but '
                              f'{where} reST sources (**/*.rst.txt).')
    assert '`apt-get install -y python3.11-doc`' in message
    assert '--config.data.source_dir=DIR' in message


def test_real_python_docs(data_dir):
  source = text_builders.PYTHON_DOCS_SOURCE_DIR
  if text_builders.PgfPythonDocs.missing_source_files(source):
    pytest.skip(f'{source} lacks the reST sources (apt-get install -y '
                'python3.11-doc).')
  assert builders.ensure_prepared(DOCS, data_dir)
  splits = tfds.builder(DOCS, data_dir=data_dir).info.splits
  n_train = splits['train'].num_examples
  n_val = splits['validation'].num_examples
  # 5709 and 281 from python3.11-doc 3.11.2; other releases differ a little.
  assert n_train > 4000 and n_val > 100
  assert 0.02 < n_val / (n_train + n_val) < 0.1
  files = {split: {key.rsplit('/', 1)[0] for key, _ in
                   text_builders.python_docs_documents(source, split)}
           for split in ('train', 'validation')}
  assert not files['train'] & files['validation']
  assert len(files['train']) + len(files['validation']) == len(
      text_builders.python_docs_files(source)) > 400
  validation = tfds.data_source(DOCS, split='validation', data_dir=data_dir,
                                download=False)
  texts = [ex['text'].decode() for ex in validation]
  assert len(texts) == n_val and sum(map(len, texts)) > 200_000
  assert not any('.. index::' in t or '.. toctree::' in t for t in texts)


def test_prepare_command(tmp_path, fake_docs):
  def prepare(*flags):
    return subprocess.run(
        [sys.executable, '-m', 'pgf.data.prepare', f'--dataset={DOCS}',
         f'--data_dir={tmp_path / "tfds"}', *flags], cwd=REPO,
        capture_output=True, text=True, timeout=300)
  r = prepare(f'--source_dir={tmp_path / "none"}')
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith(
      f'{DOCS} is prepared from local files, but {tmp_path}/none (no such')
  r = prepare(f'--source_dir={fake_docs}')
  assert r.returncode == 0, r.stderr
  assert "{'train': 4, 'validation': 1}" in r.stderr
