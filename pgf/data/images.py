"""Image classification input pipeline: TFDS array_record sources + grain.

Reads `tfds.data_source(data.name)` (no TensorFlow needed: TFDS decodes
Tensor features itself and JPEG/PNG Image features with PIL, or OpenCV when
installed) and preprocesses with PIL and NumPy.

Train: an infinite iterator in the order of `pgf.data.order` (each epoch a
fresh shuffle drawn from the data seed; the global batch of every step is
the same whatever the number of processes; process p reads its slice).
Per-example randomness (crops, flips, RandAugment) is drawn from (seed,
stream position), so `get_state()` / `set_state()` resume bit-exactly and the
augmentation does not depend on the process count either. Output:
  'image' float32 [b, S, S, C] normalised, 'label' float32 [b, classes]
  (one-hot; mixup, when on, is applied on the device by the task).
With data.in_memory the split is read and preprocessed once into host
arrays (preprocess 'simple', no RandAugment: deterministic preprocessing)
and batches are gathered from them: the same batches as the grain path,
without its per-image cost.

Eval: one pass over the eval split. Global batch j holds examples
j*G .. j*G+G-1 and process p takes its slice [p*b, (p+1)*b), so every
example is seen exactly once across processes and every process yields the
same number of batches; the last is padded. Output:
  'image' float32 [b, S, S, C], 'label' int32 [b], 'mask' float32 [b]
  (1 real, 0 padding).

Preprocessing (`data.preprocess`):
  simple: resize to S x S (bilinear), scale to [0, 1], normalise with mean
    0.5 / std 0.5. No flips (digits must not be mirrored).
  imagenet: train: Inception crop (scale 0.08-1, ratio 3/4-4/3) + horizontal
    flip; eval: resize the shorter side to S / 0.9, center crop; mean = std =
    0.5 (timm's vit_base_patch16_224 data config, the authors' recipe).
  Either way, RandAugment when data.randaugment_n > 0 (train only) and
  grayscale images keep one channel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import grain.python as grain
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import tensorflow_datasets as tfds

from pgf.data import DataInfo
from pgf.data import DatasetNotPreparedError
from pgf.data import builders
from pgf.data import data_seed
from pgf.data import order as order_lib

SIMPLE_MEAN, SIMPLE_STD = (0.5,), (0.5,)
# timm's vit_base_patch16_224 data config, which the authors' released ViT-B
# run resolves to (their code is a timm fork): mean = std = 0.5, crop_pct 0.9.
IMAGENET_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STD = (0.5, 0.5, 0.5)
EVAL_CROP_FRACTION = 0.9
CROP_SCALE = (0.08, 1.0)  # Inception crop: fraction of the image area,
CROP_RATIO = (3 / 4, 4 / 3)  # and aspect ratio (timm/torchvision defaults).
# The released ViT-B config uses timm's 'rand-m15-n2-p1-mstd0': every drawn
# op is applied (p1), at a fixed magnitude, which timm clips to 10 (no mmax).
RANDAUGMENT_PROB = 1.0
RANDAUGMENT_MAX_MAGNITUDE = 10
# train_interpolation='random' in that config: bilinear or bicubic per call.
_RANDOM_INTERPOLATIONS = (PIL.Image.Resampling.BILINEAR,
                          PIL.Image.Resampling.BICUBIC)


# ---- Availability and shapes ----------------------------------------------

def _prepared_builder(config) -> tfds.core.DatasetBuilder:
  """The builder of data.name, checked against the config; pgf's own
  datasets are prepared here if missing. Reads metadata only."""
  d = config.data
  builder, where = builders.open_builder(config)
  if builder is None:
    raise DatasetNotPreparedError(
        f'data.name={d.name!r} is neither a TFDS dataset nor prepared in '
        f'{where}.')
  if not builder.is_prepared():
    command = f'python -m pgf.data.prepare --dataset={d.name}' + (
        f' --data_dir={d.data_dir}' if d.data_dir else '')
    manual = (
        ' ImageNet cannot be downloaded automatically: put '
        'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
        f'{builder.data_dir_root / "downloads" / "manual"} first (see '
        'https://www.tensorflow.org/datasets/catalog/imagenet2012).'
        if d.name.startswith('imagenet2012') else '')
    raise DatasetNotPreparedError(
        f'Dataset data.name={d.name!r} is not prepared in {where} (expected '
        f'at {builder.data_dir}).{manual} Prepare it with `{command}`; '
        "preparing TFDS's own image datasets may need TensorFlow "
        '(pip install tensorflow).')
  features, splits = builder.info.features, builder.info.splits
  for key in ('image', 'label'):
    if key not in features.keys():
      raise ValueError(f'data.name={d.name!r} has no {key!r} feature '
                       f'(features: {list(features.keys())}).')
  num_classes = getattr(features['label'], 'num_classes', None)
  if num_classes != config.model.num_classes:
    raise ValueError(
        f'model.num_classes={config.model.num_classes} but data.name='
        f'{d.name!r} has {num_classes} classes.')
  for key in ('train_split', 'eval_split'):
    try:
      splits[d[key]]
    except (KeyError, ValueError) as e:
      raise ValueError(f'data.{key}={d[key]!r} is not a split of {d.name!r} '
                       f'(splits: {list(splits.keys())}).') from e
  return builder


def check_available(config) -> None:
  """Raises ValueError naming data.name, data.data_dir and how to prepare the
  dataset unless it is ready; pgf's own datasets are prepared on the spot."""
  _prepared_builder(config)


def published_info(config, num_train: int, num_eval: int, num_classes: int,
                   *, channels: int = 3) -> DataInfo:
  """DataInfo from dataset sizes; used with published sizes by dry runs."""
  size = config.data.image_size
  image = ((size, size, channels), np.dtype(np.float32))
  return DataInfo(
      num_train_examples=num_train, num_eval_examples=num_eval,
      num_classes=num_classes,
      train_spec={'image': image,
                  'label': ((num_classes,), np.dtype(np.float32))},
      eval_spec={'image': image, 'label': ((), np.dtype(np.int32)),
                 'mask': ((), np.dtype(np.float32))})


def dataset_info(config) -> DataInfo:
  builder = _prepared_builder(config)
  info, d = builder.info, config.data
  return published_info(
      config, info.splits[d.train_split].num_examples,
      info.splits[d.eval_split].num_examples,
      info.features['label'].num_classes,
      channels=int(info.features['image'].shape[-1]))


# ---- Image operations (PIL) -------------------------------------------------

def _to_pil(image: np.ndarray, channels: int) -> PIL.Image.Image:
  """uint8 [h, w] or [h, w, c] -> PIL image in mode L (c=1) or RGB (c=3)."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  img = PIL.Image.fromarray(image)
  mode = 'L' if channels == 1 else 'RGB'
  return img if img.mode == mode else img.convert(mode)


def _normalize(img: PIL.Image.Image, mean, std) -> np.ndarray:
  """PIL image -> float32 [h, w, c], (x / 255 - mean) / std per channel."""
  x = np.asarray(img, np.float32) / 255
  if x.ndim == 2:
    x = x[..., None]
  if x.shape[-1] != len(mean):  # ImageNet statistics on a grayscale image.
    mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _interpolation(rng: np.random.Generator) -> PIL.Image.Resampling:
  return _RANDOM_INTERPOLATIONS[rng.integers(2)]


def random_resized_crop(img: PIL.Image.Image, size: int,
                        rng: np.random.Generator) -> PIL.Image.Image:
  """Inception-style crop resized to size x size (torchvision's algorithm:
  10 tries at a random area and log-uniform aspect ratio, then the central
  crop at the nearest allowed ratio)."""
  width, height = img.size
  for _ in range(10):
    area = rng.uniform(*CROP_SCALE) * width * height
    ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]),
                                 math.log(CROP_RATIO[1])))
    w = int(round(math.sqrt(area * ratio)))
    h = int(round(math.sqrt(area / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      break
  else:
    w, h = width, height
    if width / height < CROP_RATIO[0]:
      h = int(round(width / CROP_RATIO[0]))
    elif width / height > CROP_RATIO[1]:
      w = int(round(height * CROP_RATIO[1]))
    top, left = (height - h) // 2, (width - w) // 2
  return img.resize((size, size), _interpolation(rng),
                    box=(left, top, left + w, top + h))


def resize_center_crop(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
  """Shorter side to floor(size / EVAL_CROP_FRACTION) (0.9, bicubic), then
  the central size x size crop, as timm's eval transform."""
  scale = math.floor(size / EVAL_CROP_FRACTION)
  width, height = img.size
  if width <= height:
    new = (scale, int(scale * height / width))
  else:
    new = (int(scale * width / height), scale)
  img = img.resize(new, PIL.Image.Resampling.BICUBIC)
  left = int(round((new[0] - size) / 2))
  top = int(round((new[1] - size) / 2))
  return img.crop((left, top, left + size, top + size))


# RandAugment as timm's rand_augment_transform (non-'inc' op set), with the
# magnitude m mapped to level = min(m, 10) / 10 and signs drawn per call.
RAND_AUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate',
                    'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
                    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                    'TranslateXRel', 'TranslateYRel')


def _fill(img: PIL.Image.Image):
  """Fill color of geometric ops: the ImageNet mean (timm's img_mean)."""
  fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
  return fill if img.mode == 'RGB' else round(float(np.mean(fill)))


def _affine(img, matrix, rng) -> PIL.Image.Image:
  return img.transform(img.size, PIL.Image.Transform.AFFINE, matrix,
                       resample=_interpolation(rng), fillcolor=_fill(img))


def randaugment_op(img: PIL.Image.Image, name: str, *, magnitude: float,
                   rng: np.random.Generator) -> PIL.Image.Image:
  """Applies RandAugment op `name` at `magnitude` (0..10; more is clipped);
  returns an image of the same size and mode."""
  level = min(max(magnitude, 0), RANDAUGMENT_MAX_MAGNITUDE) / 10
  signed = lambda v: -v if rng.random() > 0.5 else v
  enhance = level * 1.8 + 0.1  # [0.1, 1.9]
  if name == 'AutoContrast':
    return PIL.ImageOps.autocontrast(img)
  if name == 'Equalize':
    return PIL.ImageOps.equalize(img)
  if name == 'Invert':
    return PIL.ImageOps.invert(img)
  if name == 'Rotate':
    return img.rotate(signed(level * 30), resample=_interpolation(rng),
                      fillcolor=_fill(img))
  if name == 'Posterize':  # Keeps int(4 * level) bits (TPU EfficientNet);
    bits = int(level * 4)  # 0 bits: black (Pillow rejects bits=0).
    if bits == 0:
      return img.point([0] * 256 * len(img.getbands()))
    return PIL.ImageOps.posterize(img, bits)
  if name == 'Solarize':  # Inverts pixels >= threshold; weaker as m grows.
    return PIL.ImageOps.solarize(img, min(256, int(level * 256)))
  if name == 'SolarizeAdd':  # Adds to pixels < 128.
    add = min(128, int(level * 110))
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return getattr(PIL.ImageEnhance, name)(img).enhance(enhance)
  if name == 'ShearX':
    return _affine(img, (1, signed(level * 0.3), 0, 0, 1, 0), rng)
  if name == 'ShearY':
    return _affine(img, (1, 0, 0, signed(level * 0.3), 1, 0), rng)
  if name == 'TranslateXRel':
    return _affine(img, (1, 0, signed(level * 0.45) * img.size[0], 0, 1, 0),
                   rng)
  if name == 'TranslateYRel':
    return _affine(img, (1, 0, 0, 0, 1, signed(level * 0.45) * img.size[1]),
                   rng)
  raise ValueError(f'Unknown RandAugment op {name!r}; ops: {RAND_AUGMENT_OPS}')


def randaugment(img: PIL.Image.Image, *, num_layers: int, magnitude: float,
                rng: np.random.Generator) -> PIL.Image.Image:
  """`num_layers` ops drawn uniformly with replacement, as timm."""
  for i in rng.choice(len(RAND_AUGMENT_OPS), size=num_layers, replace=True):
    if RANDAUGMENT_PROB < 1 and rng.random() > RANDAUGMENT_PROB:
      continue
    img = randaugment_op(img, RAND_AUGMENT_OPS[i], magnitude=magnitude,
                         rng=rng)
  return img


def preprocess_train(image: np.ndarray, rng: np.random.Generator, *,
                     preprocess: str, image_size: int, randaugment_n: int,
                     randaugment_m: float) -> np.ndarray:
  """uint8 [h, w, c] -> float32 [image_size, image_size, c] (see module)."""
  channels = image.shape[-1] if image.ndim == 3 else 1
  img = _to_pil(image, channels)
  if preprocess == 'simple':
    img = img.resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
  else:
    img = random_resized_crop(img, image_size, rng)
    if rng.random() < 0.5:
      img = PIL.ImageOps.mirror(img)
  if randaugment_n:
    img = randaugment(img, num_layers=randaugment_n, magnitude=randaugment_m,
                      rng=rng)
  if preprocess == 'simple':
    return _normalize(img, SIMPLE_MEAN, SIMPLE_STD)
  return _normalize(img, IMAGENET_MEAN, IMAGENET_STD)


def preprocess_eval(image: np.ndarray, *, preprocess: str,
                    image_size: int) -> np.ndarray:
  """uint8 [h, w, c] -> float32 [image_size, image_size, c] (see module)."""
  channels = image.shape[-1] if image.ndim == 3 else 1
  img = _to_pil(image, channels)
  if preprocess == 'simple':
    img = img.resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
    return _normalize(img, SIMPLE_MEAN, SIMPLE_STD)
  return _normalize(resize_center_crop(img, image_size), IMAGENET_MEAN,
                    IMAGENET_STD)


# ---- grain transforms -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TrainExample(grain.MapTransform):
  """Local stream index -> processed example of that global position."""
  source: Sequence[dict[str, np.ndarray]]  # A TFDS data source.
  order: order_lib.ExampleOrder
  local_batch: int
  process_index: int
  process_count: int
  preprocess: str
  image_size: int
  randaugment_n: int
  randaugment_m: float
  num_classes: int

  def map(self, index):
    k = int(order_lib.global_positions(
        index, local_batch=self.local_batch, process_index=self.process_index,
        process_count=self.process_count))
    example = self.source[int(self.order(k))]
    image = preprocess_train(
        example['image'], order_lib.example_rng(self.order.seed, k),
        preprocess=self.preprocess, image_size=self.image_size,
        randaugment_n=self.randaugment_n, randaugment_m=self.randaugment_m)
    return {'image': image, 'label': _one_hot(example['label'],
                                              self.num_classes)}


def _one_hot(label, num_classes: int) -> np.ndarray:
  out = np.zeros(num_classes, np.float32)
  out[int(label)] = 1
  return out


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  """Stream position -> processed example, or zeros with mask 0 past the
  end of the split."""
  source: Sequence[dict[str, np.ndarray]]  # A TFDS data source.
  preprocess: str
  image_size: int
  channels: int

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    if position >= len(self.source):
      shape = (self.image_size, self.image_size, self.channels)
      return {'image': np.zeros(shape, np.float32), 'label': np.int32(0),
              'mask': np.float32(0)}
    example = self.source[position]
    image = preprocess_eval(example['image'], preprocess=self.preprocess,
                            image_size=self.image_size)
    return {'image': image, 'label': np.int32(example['label']),
            'mask': np.float32(1)}


def _source(config, split: str):
  return tfds.data_source(config.data.name, split=split,
                          data_dir=builders.config_data_dir(config),
                          download=False)


# Local stream indices of the train iterator: effectively infinite.
_STREAM_LENGTH = 2**62


def make_train_iterator(config, *, global_batch_size: int, process_index: int,
                        process_count: int):
  """Infinite iterator of this process's batches (see module docstring);
  save `get_state()` (a JSON-able dict) to resume exactly with
  `set_state()`."""
  info = dataset_info(config)
  d = config.data
  local = order_lib.local_batch_size(global_batch_size, process_count)
  source = _source(config, d.train_split)
  order = order_lib.ExampleOrder(len(source), data_seed(config))
  if d.in_memory:
    images, labels = _preprocessed_split(config, source, train=True)
    return InMemoryIterator(
        images, np.eye(info.num_classes, dtype=np.float32)[labels], order,
        local_batch=local, process_index=process_index,
        process_count=process_count)
  ds = grain.MapDataset.range(_STREAM_LENGTH).map(_TrainExample(
      source, order, local, process_index, process_count, d.preprocess,
      d.image_size, d.randaugment_n, d.randaugment_m, info.num_classes))
  ds = ds.batch(local, drop_remainder=True).to_iter_dataset()
  if d.num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return iter(ds)


def make_eval_iterable(config, *, global_batch_size: int, process_index: int,
                       process_count: int) -> Iterable[dict[str, np.ndarray]]:
  """One deterministic pass over the eval split per `iter()` (see module
  docstring); ceil(n / global_batch_size) batches on every process."""
  info = dataset_info(config)
  d = config.data
  local = order_lib.local_batch_size(global_batch_size, process_count)
  source = _source(config, d.eval_split)
  num_batches = -(-len(source) // global_batch_size)
  positions = (np.arange(num_batches)[:, None] * global_batch_size
               + process_index * local + np.arange(local)).ravel()
  if d.in_memory:
    images, labels = _preprocessed_split(config, source, train=False)
    return _InMemoryEval(images, labels, positions, local)
  channels = info.eval_spec['image'][0][-1]
  ds = grain.MapDataset.source(positions.tolist()).map(
      _EvalExample(source, d.preprocess, d.image_size, channels))
  ds = ds.batch(local).to_iter_dataset()
  if d.num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return ds


# ---- In memory --------------------------------------------------------------

_SPLIT_CACHE: dict = {}


def _preprocessed_split(config, source, *, train: bool
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [n, S, S, C], labels int64 [n]) of a whole split,
  preprocessed once with the deterministic 'simple' preprocessing (cached
  per process: evaluations reuse it)."""
  d = config.data
  key = (d.name, builders.config_data_dir(config), d.train_split if train
         else d.eval_split, d.image_size, train)
  if key not in _SPLIT_CACHE:
    prep = (lambda im: preprocess_train(
        im, None, preprocess='simple', image_size=d.image_size,
        randaugment_n=0, randaugment_m=0)) if train else (
            lambda im: preprocess_eval(im, preprocess='simple',
                                       image_size=d.image_size))
    raw = _read_all(source)
    pixels = raw['image']
    if (pixels.ndim in (3, 4) and pixels.shape[1:3] == (d.image_size,) * 2
        and pixels.dtype == np.uint8):
      # Already S x S: PIL's resize to the same size is a copy, so the
      # 'simple' preprocessing is the normalisation alone, done at once
      # with the same float32 operations as _normalize.
      x = pixels.reshape(pixels.shape[:3] + (-1,)).astype(np.float32) / 255
      images = (x - np.asarray(SIMPLE_MEAN, np.float32)) / np.asarray(
          SIMPLE_STD, np.float32)
    else:
      images = np.stack([prep(im) for im in pixels])
    if len(_SPLIT_CACHE) >= 4:
      _SPLIT_CACHE.pop(next(iter(_SPLIT_CACHE)))
    _SPLIT_CACHE[key] = (images.astype(np.float32),
                         raw['label'].astype(np.int64))
  return _SPLIT_CACHE[key]


def _read_all(source, chunk: int = 4096) -> dict[str, np.ndarray]:
  """Every record of a TFDS data source as stacked arrays (read in chunks
  with the source's batched __getitems__ when it has one)."""
  n = len(source)
  parts = []
  for start in range(0, n, chunk):
    idx = list(range(start, min(start + chunk, n)))
    getitems = getattr(source, '__getitems__', None)
    parts.extend(getitems(idx) if getitems else [source[i] for i in idx])
  return {'image': np.stack([np.asarray(p['image']) for p in parts]),
          'label': np.asarray([int(p['label']) for p in parts])}


class InMemoryIterator:
  """Batches gathered from host arrays in the order of `pgf.data.order`.

  The same batches as the grain pipeline's for deterministic preprocessing;
  state {'batch': number of batches yielded}.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               order: order_lib.ExampleOrder, *, local_batch: int,
               process_index: int, process_count: int):
    self.images, self.labels, self.order = images, labels, order
    self.local_batch = local_batch
    self.process_index, self.process_count = process_index, process_count
    self.batch = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    local = self.batch * self.local_batch + np.arange(self.local_batch)
    idx = self.order(order_lib.global_positions(
        local, local_batch=self.local_batch,
        process_index=self.process_index, process_count=self.process_count))
    self.batch += 1
    return {'image': self.images[idx], 'label': self.labels[idx]}

  def get_state(self) -> dict:
    return {'batch': self.batch}

  def set_state(self, state: dict) -> None:
    self.batch = int(state['batch'])


class _InMemoryEval:
  """One pass over a preprocessed eval split; padding positions past the
  end give zeros with mask 0."""

  def __init__(self, images, labels, positions, local):
    self.images, self.labels = images, labels
    self.positions, self.local = positions, local

  def __iter__(self):
    n = len(self.labels)
    for start in range(0, len(self.positions), self.local):
      pos = self.positions[start:start + self.local]
      real = pos < n
      idx = np.where(real, pos, 0)
      yield {'image': np.where(real[:, None, None, None], self.images[idx],
                               0).astype(np.float32),
             'label': np.where(real, self.labels[idx], 0).astype(np.int32),
             'mask': real.astype(np.float32)}
