r"""Prepares a dataset for pgf (TFDS array_record files in --data_dir).

  python -m pgf.data.prepare --dataset=pgf_digits --data_dir=/tmp/tfds
  python -m pgf.data.prepare --dataset=imagenet2012 --data_dir=~/tfds

pgf's own datasets (pgf_digits, and the text builders) are made offline.
Any other name goes to TFDS's builder; TFDS's image builders may need
TensorFlow to prepare (`pip install tensorflow`), though pgf reads the result
without it. imagenet2012 needs a manual download first: put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
<data_dir>/downloads/manual/
(https://www.tensorflow.org/datasets/catalog/imagenet2012).
"""

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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  name, data_dir = _DATASET.value, _DATA_DIR.value or None
  if not builders.ensure_prepared(name, data_dir):
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(file_format=builders.FILE_FORMAT)
  builder = tfds.builder(name, data_dir=data_dir)
  logging.info('%s is ready in %s: %s', name, builder.data_dir,
               {k: v.num_examples for k, v in builder.info.splits.items()})


if __name__ == '__main__':
  app.run(main)
