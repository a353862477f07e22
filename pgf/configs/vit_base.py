r"""ViT-Base/16 on ImageNet-1k with N:M sparse FF layers (the paper's setup).

  python -m pgf.train --config=configs/vit_base.py:mdgf_exp,1:16 \
      --config.data.data_dir=$TFDS_DATA_DIR --workdir=$WORKDIR
  python -m pgf.train --config=configs/vit_base.py:srste,2:4,runlocal

Any recipe (dense, ste, srste, mdgf_linear, mdgf_exp, sdgf_stepwise,
sdgf_geometric) and any N:M (2:4, 1:4, 1:8, 1:16, 1:32, ...) through the
argument. Hyperparameters: the authors' released ViT-B config (docs/recipes.md
section 6): 350 epochs + 2 cooldown, 15 warm-up, AdamW (eps 1e-8, wd 0.01,
none on biases/norms), lr 1e-3 at batch 4096 scaled by sqrt(batch/4096),
cosine to 1e-7, RandAugment m15 n2, mixup 0.5, BCE loss, dropout 0.1,
drop-path 0.1, clipping at 1.0, bf16; MdGf-Exponential c = 1e-4 on FF only,
no dense or fine-tune phase. The authors' released run is 1:32.

runlocal: a 'tiny/2' ViT (4 layers, width 64) on pgf_digits (8x8 images that
ship with scikit-learn), 400 steps, on a CPU in about a minute.
"""

from pgf.configs import base
from pgf.configs import common


def get_config(arg=None):
  recipe, n, m, flags = common.parse_arg(arg, recipe='mdgf_exp', nm='1:16')
  runlocal = 'runlocal' in flags
  c = base.get_base_config()
  c.model.name = 'vit'
  c.model.variant = 'B/16'
  c.model.num_classes = 1000
  c.model.pool = 'tok'
  c.model.dropout = 0.1
  c.model.drop_path = 0.1
  c.model.dtype = 'bfloat16'

  c.data.name = 'imagenet2012'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  c.data.preprocess = 'imagenet'
  c.data.randaugment_n = 2
  c.data.randaugment_m = 15
  c.data.mixup_alpha = 0.5
  c.data.num_workers = 16

  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.total_steps = '352ep'  # 350 epochs + 2 cooldown epochs.
  c.loss = 'sigmoid_xent'  # timm's BinaryCrossEntropy.
  c.optimizer.name = 'adamw'
  c.optimizer.lr = 1e-3
  c.optimizer.lr_batch_scaling = 'sqrt'
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup = '15ep'
  c.optimizer.cooldown = '2ep'
  c.optimizer.min_lr = 1e-7
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  c.optimizer.clip_norm = 1.0

  common.set_recipe(c.sparsity.ff, recipe, n, m)
  c.sparsity.ff.decay = 1e-4  # Released ViT-B 1:32 MdGf-Exponential config.

  c.log_every = '100'
  c.eval_every = '5ep'
  c.checkpoint_every = '1ep'

  if runlocal:
    c.model.variant = 'tiny/2'  # Width 64: SdGf-Geometric's 8:64 fits.
    c.model.num_classes = 10
    c.model.dtype = 'float32'
    c.model.dropout = c.model.drop_path = 0.0
    c.data.name = 'pgf_digits'
    c.data.eval_split = 'test'
    c.data.image_size = 8
    c.data.preprocess = 'simple'
    c.data.randaugment_n = 0
    c.data.mixup_alpha = 0.0
    c.data.num_workers = 0
    c.batch_size = 64
    c.eval_batch_size = 256
    c.total_steps = '400'
    c.optimizer.lr = 3e-3
    c.optimizer.lr_batch_scaling = 'none'
    c.optimizer.warmup = '20'
    c.optimizer.cooldown = '0'
    c.optimizer.weight_decay = 1e-4
    c.sparsity.ff.decay = 1e-2  # alpha(200) = 0.14, alpha(400) = 0.02.
    c.log_every = '50'
    c.eval_every = '200'
    c.checkpoint_every = '200'
  return c
