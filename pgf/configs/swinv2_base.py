r"""SwinV2-B (window 8, 256x256) on ImageNet-1k with N:M sparse FF layers.

  python -m pgf.train --config=configs/swinv2_base.py:srste,2:4 \
      --config.data.data_dir=$TFDS_DATA_DIR --workdir=$WORKDIR
  python -m pgf.train --config=configs/swinv2_base.py:mdgf_exp,1:8,runlocal

The paper's SwinV2-B runs use the Swin authors' ImageNet-1k recipe
(docs/recipes.md section 6; Liu et al. 2022, config
swinv2_base_patch4_window8_256):
300 epochs, batch 1024, AdamW (wd 0.05, eps 1e-8), lr 1e-3 (5e-4 per 512),
20 warm-up epochs, cosine to 1e-5, clipping 5.0, drop-path 0.5, label
smoothing 0.1, RandAugment m9 n2, mixup 0.8 (pgf has no CutMix yet). The
authors' released sparse run: SR-STE 2:4 on FF with output-axis grouping
('COL'), which the default argument reproduces.

runlocal: a 'mu' SwinV2 (2 stages) on pgf_digits upsampled to 32x32.
"""

from pgf.configs import base
from pgf.configs import common


def get_config(arg=None):
  recipe, n, m, flags = common.parse_arg(arg, recipe='srste', nm='2:4')
  runlocal = 'runlocal' in flags
  c = base.get_base_config()
  c.model.name = 'swin'
  c.model.variant = 'B'
  c.model.window_size = 8
  c.model.num_classes = 1000
  c.model.drop_path = 0.5
  c.model.dtype = 'bfloat16'

  c.data.name = 'imagenet2012'
  c.data.eval_split = 'validation'
  c.data.image_size = 256
  c.data.preprocess = 'imagenet'
  c.data.randaugment_n = 2
  c.data.randaugment_m = 9
  c.data.mixup_alpha = 0.8
  c.data.num_workers = 16

  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.total_steps = '300ep'
  c.loss = 'softmax_xent'
  c.label_smoothing = 0.1
  c.optimizer.lr = 1e-3
  c.optimizer.warmup = '20ep'
  c.optimizer.min_lr = 1e-5
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 5.0

  common.set_recipe(c.sparsity.ff, recipe, n, m)
  c.sparsity.ff.axis = 'out'  # The authors' SwinV2 config groups by 'COL'.

  c.log_every = '100'
  c.eval_every = '5ep'
  c.checkpoint_every = '1ep'

  if runlocal:
    c.model.variant = 'mu'
    c.model.window_size = 4
    c.model.num_classes = 10
    c.model.drop_path = 0.0
    c.model.dtype = 'float32'
    c.data.name = 'pgf_digits'
    c.data.eval_split = 'test'
    c.data.image_size = 32
    c.data.preprocess = 'simple'
    c.data.randaugment_n = 0
    c.data.mixup_alpha = 0.0
    c.data.num_workers = 0
    c.batch_size = 32
    c.eval_batch_size = 128
    c.total_steps = '300'
    c.label_smoothing = 0.0
    c.optimizer.lr = 2e-3
    c.optimizer.warmup = '20'
    c.optimizer.min_lr = 0.0
    c.optimizer.weight_decay = 1e-4
    c.sparsity.ff.decay = 1e-2
    c.log_every = '50'
    c.eval_every = '150'
    c.checkpoint_every = '150'
  return c
