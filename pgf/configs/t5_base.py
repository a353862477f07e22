r"""T5 v1.1 Base (T5X-Base) span-corruption pretraining on C4, N:M sparse FF.

  python -m pgf.train --config=configs/t5_base.py:mdgf_exp,1:16 \
      --config.data.data_dir=$TFDS_DATA_DIR \
      --config.data.vocab_path=/path/to/t5/sentencepiece.model
  python -m pgf.train --config=configs/t5_base.py:srste,1:16,runlocal

Hyperparameters: T5X's base pretraining defaults (t5x/examples/t5/t5_1_1/
base.gin and t5x/configs/runs/pretrain.gin): C4 en, span corruption with
noise density 0.15, mean span 3, inputs 512, targets 114, packing, batch 128,
Adafactor (decay 0.8, update clipping 1.0, parameter scaling), lr 0.01
constant for 10k steps then 1/sqrt decay (T5X 'constant * rsqrt_decay' with
base 1.0), z-loss 1e-4, no dropout, 2^19 steps, the standard T5 vocabulary
(32,000 pieces + 100 sentinels; 32,128 embedding rows). The paper's exact
language benchmark is not known (docs/recipes.md section 6).

runlocal: a 'mu' T5 on pgf_pydoc (the standard library's topic docs) with a
byte-level vocabulary, inputs 128 / targets 32.
"""

from pgf.configs import base
from pgf.configs import common


def get_config(arg=None):
  recipe, n, m, flags = common.parse_arg(arg, recipe='mdgf_exp', nm='1:16')
  runlocal = 'runlocal' in flags
  c = base.get_base_config()
  c.task = 'span_corruption'
  c.model.name = 't5'
  c.model.variant = 'base'
  c.model.vocab_size = 32128
  c.model.dropout = 0.0
  c.model.dtype = 'bfloat16'

  c.data.name = 'c4/en'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.text_key = 'text'
  c.data.vocab = 'sentencepiece'
  c.data.vocab_path = ''  # Set to the T5 vocabulary's .model file.
  c.data.inputs_length = 512
  c.data.targets_length = 114
  c.data.noise_density = 0.15
  c.data.mean_noise_span_length = 3.0
  c.data.pack = True

  c.batch_size = 128
  c.eval_batch_size = 128
  c.total_steps = '524288'
  c.z_loss = 1e-4
  c.optimizer.name = 'adafactor'
  c.optimizer.lr = 0.01
  c.optimizer.schedule = 'rsqrt'
  c.optimizer.warmup = '10000'
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 0.0

  common.set_recipe(c.sparsity.ff, recipe, n, m)
  # 1e-4 as the released ViT-B config; the paper's T5 value is not known.
  c.sparsity.ff.decay = 1e-4

  c.log_every = '100'
  c.eval_every = '5000'
  c.checkpoint_every = '5000'
  c.num_eval_examples = 8

  if runlocal:
    c.model.variant = 'mu'
    c.model.vocab_size = 384
    c.model.dtype = 'float32'
    c.data.name = 'pgf_pydoc'
    c.data.vocab = 'byte'
    c.data.inputs_length = 128
    c.data.targets_length = 32
    c.data.pack = False
    c.batch_size = 32
    c.eval_batch_size = 64
    c.total_steps = '2000'
    c.z_loss = 1e-4
    c.optimizer.lr = 0.01
    c.optimizer.warmup = '100'
    c.sparsity.ff.decay = 4e-3  # alpha(1000) = 0.02.
    c.log_every = '50'
    c.eval_every = '500'
    c.checkpoint_every = '500'
    c.num_eval_examples = 4
  return c
