r"""A small ViT on Fashion-MNIST: the reproduction study's vision config.

  python -m pgf.train --config=configs/fmnist_vit.py:srste,1:32 \
      --config.seed=0 --workdir=workdirs/fmnist/srste_1:32/seed_0
  python -m pgf.train --config=configs/fmnist_vit.py:mdgf_exp,1:32,diag
  python -m pgf.train --config=configs/fmnist_vit.py:runlocal

Fashion-MNIST (60,000 / 10,000 28x28 images; `apt-get install -y
dataset-fashion-mnist`, or --config.data.source_dir=DIR with the four IDX
files) held in memory. The model is sized so that sparsity costs accuracy
and a CPU trains it in minutes: a 'mini/7' ViT (width 64, 2 blocks, MLP
256, 16 patches of 7x7, average pooling), FF layers sparse (the
contraction lengths 64 and 256 hold groups up to M = 64 and 256). 4 epochs
of batch 128, AdamW with a 5 % warm-up and a cosine decay. MdGf's
coefficient puts alpha at 0.01 at 60 % of the run, as the released ViT-B
1:32 config does (alpha(50k of 90k steps) = 0.007).

The argument: a recipe, an N:M (default dense, 1:32), and
  diag      log the gradient-noise diagnostics (docs/recipes.md section 8)
  runlocal  a 150-step smoke run.
`--config.sparsity.ff.*` and the other keys override as usual. The study:
experiments/fmnist/ (grid.py, README.md).
"""

import math

from pgf.configs import base
from pgf.configs import common

EPOCHS = 4
ALPHA_AT = 0.6  # Fraction of the run at which MdGf's alpha reaches 0.01.


def get_config(arg=None):
  recipe, n, m, flags = common.parse_arg(arg, recipe='dense', nm='1:32',
                                         extra=('diag',))
  c = base.get_base_config()
  c.task = 'classification'
  c.model.name = 'vit'
  c.model.variant = 'mini/7'
  c.model.num_classes = 10
  c.model.pool = 'gap'

  c.data.name = 'pgf_fashion_mnist'
  c.data.eval_split = 'test'
  c.data.image_size = 28
  c.data.preprocess = 'simple'
  c.data.in_memory = True

  c.batch_size = 128
  c.eval_batch_size = 1000
  c.total_steps = f'{EPOCHS}ep'
  c.optimizer.name = 'adamw'
  c.optimizer.lr = 3e-3
  c.optimizer.warmup = '5%'
  c.optimizer.schedule = 'cosine'
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0

  common.set_recipe(c.sparsity.ff, recipe, n, m)
  steps = EPOCHS * (60_000 // c.batch_size)
  c.sparsity.ff.decay = decay_for(recipe, steps)

  c.log_every = '50'
  c.eval_every = '1ep'
  c.checkpoint_every = '1ep'
  c.keep_checkpoints = 2
  if 'diag' in flags:
    c.diagnostics.enabled = True
    c.diagnostics.sub_batches = 4

  if 'runlocal' in flags:
    c.total_steps = '150'
    c.sparsity.ff.decay = decay_for(recipe, 150)
    c.eval_every = c.checkpoint_every = '75'
  return c


def decay_for(recipe: str, total_steps: int) -> float:
  """The MdGf coefficient that puts alpha at 0.01 at ALPHA_AT of the run."""
  t = ALPHA_AT * total_steps
  if recipe == 'mdgf_linear':
    return 0.99 / t  # max(1 - c t, 0) = 0.01.
  return math.log(100) / t  # exp(-c t) = 0.01 (and unused by others).
