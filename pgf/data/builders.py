"""pgf's own TFDS datasets, prepared offline on first use.

`pgf_digits` is scikit-learn's copy of the UCI handwritten digits (1797
grayscale 8x8 images, 10 classes), which ships inside scikit-learn: a real
dataset that needs no network, for tests and laptop runs.

`pgf_fashion_mnist` is Fashion-MNIST (Xiao et al. 2017; 60,000 train and
10,000 test 28x28 grayscale images of 10 kinds of clothing; MIT licence),
read from its four IDX files, which Debian/Ubuntu's `dataset-fashion-mnist`
installs in /usr/share/datasets/fashion-mnist. Preparing it takes about 6 s
on a 2-core CPU and writes 45 MB.

Builders prepared from local files (`LocalSource`) use TFDS's manual_dir:
`ensure_prepared(name, data_dir, source_dir=...)` hands TFDS
`DownloadConfig(manual_dir=source_dir or the builder's DEFAULT_SOURCE_DIR)`,
after checking that the files are there (SourceNotFoundError otherwise, one
message saying what is missing and how to install it). The config key is
`data.source_dir` ('' = the default folder); `open_builder(config)` passes
it. The source is read only to prepare: a prepared dataset is reused
whatever source_dir says.

Builders are looked up by name in TFDS's registry, which every
`GeneratorBasedBuilder` subclass joins when its module is imported. For a
name starting with 'pgf_', `ensure_prepared` imports the modules that define
pgf builders (`_BUILDER_MODULES`, those that exist) and prepares the dataset
if one of them defines it. TFDS writes into an `incomplete.*` directory and
renames it when done, so an interrupted preparation leaves nothing
half-written behind.
Processes that share one data_dir should not prepare it concurrently: run
`python -m pgf.data.prepare` once first.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import math
import os
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from pgf.data import DatasetNotPreparedError

# Modules whose import registers pgf builders with TFDS (absent ones are
# skipped: the text builders may be missing from a vision-only checkout).
_BUILDER_MODULES = ('pgf.data.builders', 'pgf.data.text_builders')

FILE_FORMAT = 'array_record'  # Random access for grain; written without TF.


class PgfDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits as a TFDS dataset.

  Splits (deterministic, stratified, no RNG): within each class, in
  scikit-learn's order, every 5th image (positions 4, 9, ...) goes to 'test'
  and the rest to 'train': 1442 train and 355 test images.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` needs the builder to live in
    # a TFDS dataset package directory (with README/CITATIONS files).
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'UCI ML handwritten digits (the copy in scikit-learn): 8x8 '
            'grayscale images with values 0..16 rescaled to 0..255.'),
        # A Tensor, not tfds.features.Image: encoding Image features from
        # arrays needs TensorFlow, which pgf does not require.
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage=('https://archive.ics.uci.edu/dataset/80/'
                  'optical+recognition+of+handwritten+digits'),
        citation=('Alpaydin, E. and Kaynak, C. (1998). Optical Recognition of '
                  'Handwritten Digits. UCI Machine Learning Repository.'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    from sklearn import datasets  # Only needed to prepare.
    digits = datasets.load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    is_test = np.zeros(len(labels), bool)
    for c in range(10):
      is_test[np.flatnonzero(labels == c)[4::5]] = True
    return {
        'train': self._generate_examples(images, labels, ~is_test),
        'test': self._generate_examples(images, labels, is_test),
    }

  def _generate_examples(self, images, labels, selected):
    for i in np.flatnonzero(selected):
      yield int(i), {'image': images[i], 'label': int(labels[i])}


class SourceNotFoundError(DatasetNotPreparedError):
  """The local files a pgf builder is prepared from are missing (the message
  names the folder, the missing files and how to get them)."""


class LocalSource:
  """Mixin of pgf builders prepared from files on this machine.

  The files are read from TFDS's `dl_manager.manual_dir`, which
  `ensure_prepared` sets to data.source_dir or DEFAULT_SOURCE_DIR. A
  subclass sets DEFAULT_SOURCE_DIR, SOURCE_PACKAGE (the Debian/Ubuntu package
  that installs the files there), MANUAL_DOWNLOAD_INSTRUCTIONS (TFDS shows
  them when manual_dir is empty) and `missing_source_files`.
  """

  DEFAULT_SOURCE_DIR = ''
  SOURCE_PACKAGE = ''
  name: str  # Set by TFDS's registration of the builder class.

  @classmethod
  def missing_source_files(cls, source_dir: str) -> list[str]:
    """Names (or patterns) of the files the builder needs but `source_dir`
    lacks; empty when it can be prepared from there."""
    raise NotImplementedError

  @classmethod
  def check_source(cls, source_dir: str | None) -> str:
    """`source_dir` ('' or None: DEFAULT_SOURCE_DIR), user-expanded, after
    checking it; raises SourceNotFoundError if files are missing."""
    source = os.path.expanduser(source_dir or cls.DEFAULT_SOURCE_DIR)
    missing = cls.missing_source_files(source)
    if missing:
      where = source if os.path.isdir(source) else (
          f'{source} (no such folder)')
      raise SourceNotFoundError(
          f'{cls.name} is prepared from local files, but {where} lacks '
          f'{", ".join(missing)}. ' + source_instructions(
              cls.SOURCE_PACKAGE, cls.DEFAULT_SOURCE_DIR, 'them'))
    return source

  def _source_dir(self, dl_manager) -> str:
    """The checked manual_dir of a preparation."""
    try:
      source = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS's answer to a missing/empty folder.
      raise SourceNotFoundError(f'{self.name}: {e}') from e
    return self.check_source(source)


def source_instructions(package: str, default_dir: str, files: str) -> str:
  """How to get a LocalSource builder's `files` (for its messages)."""
  return (f'Install {files} with `apt-get install -y {package}` '
          f'(Debian/Ubuntu; they go to {default_dir}), or pass '
          '--config.data.source_dir=DIR (python -m pgf.data.prepare '
          '--source_dir=DIR) naming a folder that holds them.')


# ---- IDX files (Fashion-MNIST) ----------------------------------------------

class IdxFormatError(ValueError):
  """An IDX file is malformed, truncated or not the kind expected."""


# IDX type codes (third byte of the magic number) -> big-endian dtypes.
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4',
               0x0D: '>f4', 0x0E: '>f8'}
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions: [n, rows, cols].
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension: [n].


def read_idx(path: str, *, magic: int | None = None) -> np.ndarray:
  """The array stored in the gzip-compressed IDX file `path`.

  IDX (the MNIST format): a big-endian magic number whose bytes are 0, 0,
  the type code (0x08 uint8, ...) and the number of dimensions d; then d
  big-endian uint32 sizes; then the values, big-endian, in C order.

  Args:
    path: a .gz IDX file.
    magic: the magic number the file must have (IDX_IMAGES_MAGIC,
      IDX_LABELS_MAGIC); None accepts any valid one.

  Returns:
    The values, shaped as the header says, in native byte order.

  Raises:
    IdxFormatError naming `path` when it is not gzip, has a wrong magic
    number, or holds more or fewer values than its header says.
  """
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise IdxFormatError(f'{path} is not a complete gzip file ({e}).') from e
  if len(data) < 4:
    raise IdxFormatError(f'{path} is truncated: {len(data)} bytes, shorter '
                         'than an IDX magic number.')
  found = int.from_bytes(data[:4], 'big')
  if data[:2] != b'\0\0' or data[2] not in _IDX_DTYPES:
    raise IdxFormatError(f'{path} is not an IDX file: magic number '
                         f'0x{found:08x}.')
  if magic is not None and found != magic:
    raise IdxFormatError(f'{path} has IDX magic number 0x{found:08x}, '
                         f'expected 0x{magic:08x}.')
  ndim, header = data[3], 4 + 4 * data[3]
  if len(data) < header:
    raise IdxFormatError(f'{path} is truncated inside its header.')
  shape = tuple(int(n) for n in np.frombuffer(data, '>u4', ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = math.prod(shape) * dtype.itemsize
  if len(data) - header != expected:
    state = 'truncated' if len(data) - header < expected else 'too long'
    raise IdxFormatError(
        f'{path} is {state}: its header says shape {shape} '
        f'({expected} bytes of values) but {len(data) - header} bytes '
        'follow the header.')
  values = np.frombuffer(data, dtype, math.prod(shape), offset=header)
  return values.reshape(shape).astype(dtype.newbyteorder('='))


FASHION_MNIST_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress',
                         'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
# Split -> (images file, labels file, published number of examples).
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              60_000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz',
             10_000),
}


def read_fashion_mnist(source_dir: str,
                       split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, 28, 28], labels uint8 [n]) of `split` ('train' or
  'test') from the IDX files in `source_dir`, in file order.

  Raises IdxFormatError naming the file when a file is malformed, the
  images are not 28x28, the counts of images and labels differ or a label
  is not a class index; logs a warning when n is not the published size.
  """
  images_file, labels_file, published = FASHION_MNIST_FILES[split]
  images_path = os.path.join(source_dir, images_file)
  labels_path = os.path.join(source_dir, labels_file)
  images = read_idx(images_path, magic=IDX_IMAGES_MAGIC)
  labels = read_idx(labels_path, magic=IDX_LABELS_MAGIC)
  if images.shape[1:] != (28, 28):
    raise IdxFormatError(f'{images_path} holds images of shape '
                         f'{images.shape[1:]}, not (28, 28).')
  if len(images) != len(labels):
    raise IdxFormatError(f'{images_path} holds {len(images)} images but '
                         f'{labels_path} {len(labels)} labels.')
  if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
    raise IdxFormatError(f'{labels_path} holds label {labels.max()}; '
                         f'classes are 0..{len(FASHION_MNIST_CLASSES) - 1}.')
  if len(labels) != published:
    logging.warning('%s holds %d examples; Fashion-MNIST\'s %s split has %d.',
                    images_path, len(labels), split, published)
  return images, labels


class PgfFashionMnist(LocalSource, tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from its IDX files (see the module docstring).

  Splits 'train' (60,000) and 'test' (10,000), each in file order.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  DEFAULT_SOURCE_DIR = FASHION_MNIST_SOURCE_DIR
  SOURCE_PACKAGE = 'dataset-fashion-mnist'
  MANUAL_DOWNLOAD_INSTRUCTIONS = source_instructions(
      SOURCE_PACKAGE, DEFAULT_SOURCE_DIR, 'the four IDX .gz files of '
      'Fashion-MNIST (train-images-idx3-ubyte.gz, ...)')

  @classmethod
  def missing_source_files(cls, source_dir: str) -> list[str]:
    return [name for images, labels, _ in FASHION_MNIST_FILES.values()
            for name in (images, labels)
            if not os.path.isfile(os.path.join(source_dir, name))]

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly, Tensor not Image features: see PgfDigits._info.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Fashion-MNIST: 28x28 grayscale images of Zalando articles, 10 '
            'classes, read from the IDX files of the original release.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        # Keep the files' order (TFDS would otherwise order by key hash).
        disable_shuffling=True,
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        citation=(
            'Xiao, H., Rasul, K. and Vollgraf, R. (2017). Fashion-MNIST: a '
            'Novel Image Dataset for Benchmarking Machine Learning '
            'Algorithms. arXiv:1708.07747.'),
        license='MIT',
    )

  def _split_generators(self, dl_manager):
    source = self._source_dir(dl_manager)
    return {split: self._generate_examples(source, split)
            for split in FASHION_MNIST_FILES}

  def _generate_examples(self, source: str, split: str):
    images, labels = read_fashion_mnist(source, split)
    for i in range(len(labels)):
      yield i, {'image': images[i, :, :, None], 'label': int(labels[i])}


def _pgf_builder_cls(name: str) -> type[tfds.core.DatasetBuilder] | None:
  """The class of pgf's own builder `name`, or None if it is not one.

  pgf's builders are named pgf_*; only for such names are their modules
  imported, so other datasets never import the text pipeline.
  """
  if not name.startswith('pgf_'):
    return None
  for module in _BUILDER_MODULES:
    if importlib.util.find_spec(module) is not None:
      importlib.import_module(module)
  try:
    cls = tfds.core.registered.imported_builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return None
  return cls if cls.__module__.startswith('pgf.') else None


def ensure_prepared(name: str, data_dir: str | None, *,
                    source_dir: str | None = None) -> bool:
  """Prepares pgf's dataset `name` in `data_dir` (None: TFDS's default).

  Args:
    name: a TFDS dataset name.
    data_dir: the TFDS data_dir; None for $TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    source_dir: for builders prepared from local files (LocalSource), the
      folder holding them; None or '': the builder's DEFAULT_SOURCE_DIR.
      Ignored by the others, and once the dataset is prepared.

  Returns:
    True if `name` is one of pgf's builders (now prepared), False for any
    other name, which is left untouched.

  Raises:
    SourceNotFoundError: the local files to prepare from are missing.
  """
  cls = _pgf_builder_cls(name)
  if cls is None:
    return False
  builder = cls(data_dir=data_dir or None, file_format=FILE_FORMAT)
  if not builder.is_prepared():
    download_config = None
    if issubclass(cls, LocalSource):
      source = cls.check_source(source_dir)
      logging.info('Preparing %s from %s in %s.', name, source,
                   builder.data_dir_root)
      download_config = tfds.download.DownloadConfig(manual_dir=source)
    builder.download_and_prepare(file_format=FILE_FORMAT,
                                 download_config=download_config)
  return True


def config_data_dir(config) -> str | None:
  """data.data_dir, or None for TFDS's default ($TFDS_DATA_DIR or
  ~/tensorflow_datasets)."""
  return config.data.data_dir or None


def config_source_dir(config) -> str | None:
  """data.source_dir, or None for the builder's default folder (configs
  without the key count as '')."""
  return config.data.get('source_dir') or None


def open_builder(config) -> tuple[tfds.core.DatasetBuilder | None, str]:
  """(builder or None if TFDS does not know the name, a description of
  where the data is looked for); pgf's own datasets are prepared first,
  those from local files from data.source_dir."""
  d = config.data
  where = f'data.data_dir={d.data_dir!r}' + (
      '' if d.data_dir else ' ($TFDS_DATA_DIR or ~/tensorflow_datasets)')
  ensure_prepared(d.name, config_data_dir(config),
                  source_dir=config_source_dir(config))
  try:
    return tfds.builder(d.name, data_dir=config_data_dir(config)), where
  except tfds.core.registered.DatasetNotFoundError:
    return None, where
