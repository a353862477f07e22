r"""The embedded default: what `python -m pgf.train` with no flags runs.

A small ViT (4 layers, width 64, patch 2) trained with MdGf-Exponential at
1:8 on the FF layers, on scikit-learn's handwritten digits (pgf_digits: 8x8
images that ship with scikit-learn, prepared as a TFDS dataset on first use,
so this run takes the same path as imagenet2012). Offline, on a CPU.

  python -m pgf.train                       # == --config=configs/default.py
  python -m pgf.train --config.sparsity.ff.recipe=srste
"""

from pgf.configs import base


def get_config(arg=None):
  del arg
  c = base.get_base_config()
  c.model.name = 'vit'
  c.model.variant = 'tiny/2'
  c.model.num_classes = 10
  c.model.pool = 'tok'
  c.data.name = 'pgf_digits'
  c.data.eval_split = 'test'
  c.data.image_size = 8
  c.data.preprocess = 'simple'
  c.batch_size = 64
  c.eval_batch_size = 360
  c.total_steps = '1500'
  c.optimizer.lr = 2e-3
  c.optimizer.warmup = '100'
  c.optimizer.weight_decay = 1e-4
  c.optimizer.clip_norm = 1.0
  c.sparsity.ff.recipe = 'mdgf_exp'
  c.sparsity.ff.n = 1
  c.sparsity.ff.m = 8
  c.sparsity.ff.decay = 4e-3  # alpha(500) = 0.14, alpha(1500) = 0.0025.
  c.log_every = '100'
  c.eval_every = '500'
  c.checkpoint_every = '250'
  return c
