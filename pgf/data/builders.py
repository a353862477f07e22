"""pgf's own TFDS datasets, prepared offline on first use.

`pgf_digits` is scikit-learn's copy of the UCI handwritten digits (1797
grayscale 8x8 images, 10 classes), which ships inside scikit-learn: a real
dataset that needs no network, for tests and laptop runs.

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

import importlib
import importlib.util

import numpy as np
import tensorflow_datasets as tfds

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


def ensure_prepared(name: str, data_dir: str | None) -> bool:
  """Prepares pgf's dataset `name` in `data_dir` (None: TFDS's default).

  Returns True if `name` is one of pgf's builders (now prepared), False for
  any other name, which is left untouched.
  """
  cls = _pgf_builder_cls(name)
  if cls is None:
    return False
  builder = cls(data_dir=data_dir or None, file_format=FILE_FORMAT)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format=FILE_FORMAT)
  return True


def config_data_dir(config) -> str | None:
  """data.data_dir, or None for TFDS's default ($TFDS_DATA_DIR or
  ~/tensorflow_datasets)."""
  return config.data.data_dir or None


def open_builder(config) -> tuple[tfds.core.DatasetBuilder | None, str]:
  """(builder or None if TFDS does not know the name, a description of
  where the data is looked for); pgf's own datasets are prepared first."""
  d = config.data
  where = f'data.data_dir={d.data_dir!r}' + (
      '' if d.data_dir else ' ($TFDS_DATA_DIR or ~/tensorflow_datasets)')
  ensure_prepared(d.name, config_data_dir(config))
  try:
    return tfds.builder(d.name, data_dir=config_data_dir(config)), where
  except tfds.core.registered.DatasetNotFoundError:
    return None, where
