"""Vision input pipeline on the offline pgf_digits dataset (and a tiny JPEG
dataset made here): splits, shapes, the order (seeded, the same global batch
for any number of processes), eval padding, exact resume, the in-memory
path, mixup, RandAugment and the errors for datasets that are not
prepared."""

from collections import Counter
import io
import os
import sys

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from pgf import tasks
from pgf.configs.base import get_base_config
from pgf.data import builders
from pgf.data import images

TRAIN, TEST = 1442, 355  # pgf_digits split sizes (PgfDigits docstring).


@pytest.fixture(scope='module')
def digits_dir(data_dir):
  """The session's TFDS data_dir (conftest.py), with pgf_digits in it."""
  assert builders.ensure_prepared('pgf_digits', data_dir)
  return data_dir


def _config(data_dir, **overrides):
  c = get_base_config()
  c.data.data_dir = data_dir
  c.data.image_size = 8
  for key, value in overrides.items():
    c.data[key] = value
  return c


def _key(image, label):
  return (np.asarray(image).tobytes(), int(label))


def _processed_split(config, split):
  """Keys of every example of `split` through the deterministic 'simple'
  preprocessing, in the source's order."""
  source = tfds.data_source('pgf_digits', split=split,
                            data_dir=config.data.data_dir, download=False)
  return [_key(images.preprocess_eval(ex['image'], preprocess='simple',
                                      image_size=config.data.image_size),
               ex['label']) for ex in source]


def test_digits_builder_prepares_offline(digits_dir):
  builder = tfds.builder('pgf_digits', data_dir=digits_dir)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == TRAIN
  assert builder.info.splits['test'].num_examples == TEST
  source = tfds.data_source('pgf_digits', split='test', data_dir=digits_dir,
                            download=False)
  labels = np.array([ex['label'] for ex in source])
  # Every 5th image of each class: floor(count / 5) per class.
  np.testing.assert_array_equal(np.bincount(labels),
                                [35, 36, 35, 36, 36, 36, 36, 35, 34, 36])
  ex = source[0]
  assert ex['image'].shape == (8, 8, 1) and ex['image'].dtype == np.uint8
  assert max(source[i]['image'].max() for i in range(20)) == 255
  # Idempotent; names that are not pgf's own are left alone.
  assert builders.ensure_prepared('pgf_digits', digits_dir)
  assert not builders.ensure_prepared('mnist', digits_dir)
  assert not os.path.exists(os.path.join(digits_dir, 'mnist'))


def test_dataset_info(digits_dir):
  info = images.dataset_info(_config(digits_dir, image_size=32))
  assert (info.num_train_examples, info.num_eval_examples) == (TRAIN, TEST)
  assert info.num_classes == 10
  assert info.train_spec == {'image': ((32, 32, 1), np.float32),
                             'label': ((10,), np.float32)}
  assert info.eval_spec == {'image': ((32, 32, 1), np.float32),
                            'label': ((), np.int32), 'mask': ((), np.float32)}


def test_train_batch_shapes_and_normalisation(digits_dir):
  config = _config(digits_dir, image_size=32)
  it = images.make_train_iterator(config, global_batch_size=16,
                                process_index=0, process_count=2)
  batch = next(it)
  assert batch['image'].shape == (8, 32, 32, 1)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (8, 10) and batch['label'].dtype == np.float32
  # mean 0.5, std 0.5: background 0 -> -1, full ink 255 -> 1.
  assert batch['image'].min() == -1 and batch['image'].max() == 1
  np.testing.assert_array_equal(batch['label'].sum(-1), 1)
  assert set(np.unique(batch['label'])) == {0, 1}


def _keys(batch):
  return [_key(x, y.argmax()) for x, y in zip(batch['image'],
                                              batch['label'])]


@pytest.mark.parametrize('in_memory', [False, True])
def test_same_global_batches_for_any_process_count(digits_dir, in_memory):
  config = _config(digits_dir, in_memory=in_memory)
  global_batch, steps = 14, 2 * TRAIN // 14 + 3   # Two epochs and a bit.
  one = images.make_train_iterator(config, global_batch_size=global_batch,
                                   process_index=0, process_count=1)
  two = [images.make_train_iterator(config, global_batch_size=global_batch,
                                    process_index=p, process_count=2)
         for p in range(2)]
  stream = []
  for _ in range(steps):
    want = _keys(next(one))
    # Process 0's slice, then process 1's: the same global batch.
    assert _keys(next(two[0])) + _keys(next(two[1])) == want
    stream += want
  # Every epoch is the whole split, reshuffled; nothing dropped at its end.
  first, second = stream[:TRAIN], stream[TRAIN:2 * TRAIN]
  split = Counter(_processed_split(config, 'train'))
  assert Counter(first) == split and Counter(second) == split
  assert first != second


def test_config_seed_seeds_the_order(digits_dir):
  def first_batch(**kw):
    c = _config(digits_dir)
    c.seed = kw.pop('seed', 0)
    c.data.shuffle_seed = kw.pop('shuffle_seed', -1)
    return _keys(next(images.make_train_iterator(
        c, global_batch_size=16, process_index=0, process_count=1)))
  assert first_batch(seed=0) == first_batch(seed=0)
  assert first_batch(seed=0) != first_batch(seed=1)
  # data.shuffle_seed, when set, overrides config.seed for the order only.
  assert first_batch(seed=0, shuffle_seed=1) == first_batch(seed=1)
  assert first_batch(seed=5, shuffle_seed=1) == first_batch(seed=1)


@pytest.mark.parametrize('size', [8, 12])  # Native size; resized by PIL.
def test_in_memory_path_equals_grain_path(digits_dir, size):
  grain_it = images.make_train_iterator(
      _config(digits_dir, image_size=size), global_batch_size=16,
      process_index=1, process_count=2)
  memory = _config(digits_dir, in_memory=True, image_size=size)
  mem_it = images.make_train_iterator(memory, global_batch_size=16,
                                      process_index=1, process_count=2)
  for _ in range(5):
    a, b = next(grain_it), next(mem_it)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      assert a[k].dtype == b[k].dtype
  state = mem_it.get_state()
  want = next(mem_it)
  again = images.make_train_iterator(memory, global_batch_size=16,
                                     process_index=1, process_count=2)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['image'], want['image'])
  for p in range(2):
    a = list(images.make_eval_iterable(_config(digits_dir, image_size=size),
                                       global_batch_size=64, process_index=p,
                                       process_count=2))
    b = list(images.make_eval_iterable(memory, global_batch_size=64,
                                       process_index=p, process_count=2))
    assert len(a) == len(b)
    for x, y in zip(a, b):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_eval_sees_every_example_once_across_processes(digits_dir):
  config = _config(digits_dir)
  passes = [list(images.make_eval_iterable(config, global_batch_size=64,
                                         process_index=p, process_count=2))
            for p in range(2)]
  assert len(passes[0]) == len(passes[1]) == -(-TEST // 64)  # 6 batches.
  seen = []
  for b0, b1 in zip(*passes):  # Global batch = process 0's then 1's slice.
    for b in (b0, b1):
      assert b['image'].shape == (32, 8, 8, 1)
      assert b['label'].dtype == np.int32 and b['mask'].dtype == np.float32
      real = b['mask'] == 1
      assert np.all(real[:real.sum()])  # Padding only at the end.
      assert np.all(b['image'][~real] == 0)
      seen += [_key(x, y) for x, y in zip(b['image'][real], b['label'][real])]
  assert sum(b['mask'].sum() for p in passes for b in p) == TEST
  assert seen == _processed_split(config, 'test')
  # Iterating again gives the same pass.
  again = list(images.make_eval_iterable(config, global_batch_size=64,
                                       process_index=1, process_count=2))
  np.testing.assert_array_equal(again[-1]['image'], passes[1][-1]['image'])


def test_iterator_state_restores_exact_batches(digits_dir):
  config = _config(digits_dir, preprocess='imagenet', randaugment_n=2,
                   randaugment_m=15, mixup_alpha=0.5, shuffle_seed=3)
  make = lambda: images.make_train_iterator(
      config, global_batch_size=8, process_index=1, process_count=2)
  it = make()
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  restored = make()
  restored.set_state(state)
  replay = make()  # And a fresh iterator replays the same stream.
  for _ in range(3):
    next(replay)
  for want in expected:
    for got in (next(restored), next(replay)):
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_mixup_is_a_convex_combination_within_the_batch(digits_dir):
  # Mixup runs on the device, on the global batch, in the task.
  config = _config(digits_dir, mixup_alpha=0.5)
  task = tasks.get_task(config, images.dataset_info(config))
  it = images.make_train_iterator(config, global_batch_size=16,
                                  process_index=0, process_count=1)
  lams = []
  for step in range(3):
    x = next(it)
    m = jax.device_get(task.augment(x, jax.random.key(step)))
    y = x['label'].argmax(-1)
    differ = np.flatnonzero(y != y[::-1])
    lam = m['label'][differ[0], y[differ[0]]]
    lams.append(lam)
    np.testing.assert_allclose(
        m['label'], lam * x['label'] + (1 - lam) * x['label'][::-1],
        atol=1e-6)
    np.testing.assert_allclose(m['label'].sum(-1), 1, atol=1e-6)
    assert np.all(m['label'] >= 0) and np.all((m['label'] > 0).sum(-1) <= 2)
    np.testing.assert_allclose(
        m['image'], lam * x['image'] + (1 - lam) * x['image'][::-1],
        atol=1e-6)
  assert len(set(lams)) == 3  # One lambda per step.
  off = tasks.get_task(_config(digits_dir), images.dataset_info(config))
  assert off.augment(x, jax.random.key(0)) is x


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_randaugment_ops_preserve_shape_and_dtype(mode):
  rng = np.random.default_rng(0)
  shape = (20, 24) if mode == 'L' else (20, 24, 3)
  img = PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
  for name in images.RAND_AUGMENT_OPS:
    for magnitude in (0, 5, 15):
      out = images.randaugment_op(img, name, magnitude=magnitude, rng=rng)
      assert out.mode == img.mode and out.size == img.size, name
      assert np.asarray(out).shape == shape
      assert np.asarray(out).dtype == np.uint8
  x = np.asarray(img)
  np.testing.assert_array_equal(
      np.asarray(images.randaugment_op(img, 'Invert', magnitude=10, rng=rng)),
      255 - x)
  # SolarizeAdd at m=10 adds 110 to pixels below 128.
  np.testing.assert_array_equal(
      np.asarray(images.randaugment_op(img, 'SolarizeAdd', magnitude=10,
                                       rng=rng)),
      np.where(x < 128, np.minimum(x.astype(int) + 110, 255), x))
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    images.randaugment_op(img, 'Cutout', magnitude=10, rng=rng)


def test_check_available_explains_unprepared_imagenet(tmp_path):
  empty = str(tmp_path)
  config = _config(empty, name='imagenet2012')
  config.model.num_classes = 1000
  with pytest.raises(ValueError) as e:
    images.check_available(config)
  message = str(e.value)
  for part in ("'imagenet2012'", empty, 'pgf.data.prepare --dataset='
               'imagenet2012', 'downloads/manual'):
    assert part in message
  assert os.listdir(empty) == []  # Nothing downloaded or written.
  with pytest.raises(ValueError, match="data.name='no_such_dataset'"):
    images.check_available(_config(empty, name='no_such_dataset'))


def test_check_available_names_bad_split_and_classes(digits_dir):
  with pytest.raises(ValueError, match="data.eval_split='validation'"):
    images.check_available(_config(digits_dir, eval_split='validation'))
  config = _config(digits_dir)
  config.model.num_classes = 1000
  with pytest.raises(ValueError, match='model.num_classes=1000'):
    images.check_available(config)


class PgfTestJpegs(tfds.core.GeneratorBasedBuilder):
  """Six JPEG-encoded RGB images of different sizes, 3 classes."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0),
            'test': self._generate_examples(1)}

  def _generate_examples(self, seed):
    rng = np.random.default_rng(seed)
    for i in range(6):
      pixels = rng.integers(0, 256, (20 + 3 * i, 30 - 2 * i, 3), np.uint8)
      buffer = io.BytesIO()
      PIL.Image.fromarray(pixels).save(buffer, format='JPEG')
      # Already-encoded bytes: writing them needs no TensorFlow.
      yield i, {'image': buffer.getvalue(), 'label': i % 3}


def test_jpeg_dataset_with_imagenet_preprocessing(tmp_path):
  PgfTestJpegs(data_dir=str(tmp_path), file_format='array_record'
               ).download_and_prepare(file_format='array_record')
  config = _config(str(tmp_path), name='pgf_test_jpegs', image_size=16,
                   preprocess='imagenet', randaugment_n=2, mixup_alpha=0.5)
  config.model.num_classes = 3
  batch = next(images.make_train_iterator(config, global_batch_size=4,
                                        process_index=0, process_count=1))
  assert batch['image'].shape == (4, 16, 16, 3)
  assert batch['label'].shape == (4, 3)
  assert np.all(np.isfinite(batch['image']))
  first = next(iter(images.make_eval_iterable(
      config, global_batch_size=8, process_index=0, process_count=1)))
  assert first['image'].shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(first['mask'], [1] * 6 + [0] * 2)
  assert 'tensorflow' not in sys.modules  # Decoded with PIL, not TF.
