r"""Prepares a dataset for pgf (TFDS array_record files in --data_dir).

  python -m pgf.data.prepare --dataset=pgf_digits --data_dir=/tmp/tfds
  python -m pgf.data.prepare --dataset=pgf_fashion_mnist --source_dir=DIR
  python -m pgf.data.prepare --dataset=imagenet2012 --data_dir=~/tfds

pgf's own datasets are made offline: pgf_digits and pgf_pydoc from files
inside Python packages; pgf_fashion_mnist and pgf_python_docs from local
files, by default where the Debian/Ubuntu packages dataset-fashion-mnist and
python3.11-doc install them, else from --source_dir (the same as
--config.data.source_dir).
Any other name goes to TFDS's builder; TFDS's image builders may need
TensorFlow to prepare (`pip install tensorflow`), though pgf reads the result
without it. imagenet2012 needs a manual download first: put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
<data_dir>/downloads/manual/
(https://www.tensorflow.org/datasets/catalog/imagenet2012).
"""

import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from pgf.data import builders

_DATASET = flags.DEFINE_string('dataset', None, 'TFDS dataset name.',
                               required=True)
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'TFDS data_dir (default: $TFDS_DATA_DIR or '
    '~/tensorflow_datasets); the same as --config.data.data_dir.')
_SOURCE_DIR = flags.DEFINE_string(
    'source_dir', None, 'Folder of the local files that pgf_fashion_mnist '
    'or pgf_python_docs are prepared from (default: where their Debian '
    'package puts them); the same as --config.data.source_dir.')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  name, data_dir = _DATASET.value, _DATA_DIR.value or None
  try:
    ours = builders.ensure_prepared(name, data_dir,
                                    source_dir=_SOURCE_DIR.value)
  except builders.SourceNotFoundError as e:
    sys.exit(str(e))  # The message says what to do; a traceback would not.
  if not ours:
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(file_format=builders.FILE_FORMAT)
  builder = tfds.builder(name, data_dir=data_dir)
  logging.info('%s is ready in %s: %s', name, builder.data_dir,
               {k: v.num_examples for k, v in builder.info.splits.items()})


if __name__ == '__main__':
  app.run(main)
