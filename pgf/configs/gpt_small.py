r"""GPT-2 small (124M) causal-LM pretraining, N:M sparse FF.

  python -m pgf.train --config=configs/gpt_small.py:mdgf_exp,1:16 \
      --config.data.data_dir=$TFDS_DATA_DIR \
      --config.data.vocab_path=/path/to/sentencepiece.model
  python -m pgf.train --config=configs/gpt_small.py --dry_run
  python -m pgf.train --config=configs/gpt_small.py:srste,2:4,runlocal

The model is GPT-2 small exactly (pgf.models.gpt 'gpt2': 12 layers, width
768, 12 heads, context 1024, vocabulary 50257, tied embeddings, learned
positions: 124,439,808 parameters). Hyperparameters are nanoGPT's GPT-2
reproduction (karpathy/nanoGPT config/train_gpt2.py and train.py):
about 0.5M tokens per step (480 rows of 1024; nanoGPT's 12 x 1024 x 40
gradient-accumulation), AdamW lr 6e-4, betas (0.9, 0.95), weight decay 0.1
on kernels and embeddings, 2000 warm-up steps, cosine decay to 6e-5 at
600,000 steps, gradient clipping 1.0, no dropout, bfloat16 compute.

Data: GPT-2 trained on WebText with its byte-level BPE; neither ships with
pgf (it downloads nothing), so the run reads C4 en (TFDS c4/en prepared in
array_record format, the dataset configs/t5_base.py reads) with a local
SentencePiece model (`data.vocab_path`, T5's ids; its pieces + 100 extra
ids must fit the 50,257 embedding rows: T5's 32,000-piece vocabulary does,
and scripts/train_sentencepiece.py can train one of 50,157 pieces that fills
them). The dry run needs neither: C4's published size and T5's vocabulary
size stand in.

runlocal: a 'nano' GPT (width 128, 4 layers, 4 heads, context 256) on
pgf_pydoc (Python's own pydoc topics, prepared offline) with the byte
vocabulary (359 ids, embedding 384), rows of 128 bytes, batch 16: 300
steps, about a minute of a 2-core CPU (validation loss about 5.8 -> 2.4
nats per byte; the byte frequencies alone give 3.3).
"""

import math

from pgf.configs import base
from pgf.configs import common

STEPS = 600_000
RUNLOCAL_STEPS = 300


def mdgf_decay(recipe: str, total_steps: int, *, at: float = 0.6) -> float:
  """The MdGf coefficient that brings alpha to 0.01 at `at` of the run."""
  t = at * total_steps
  if recipe == 'mdgf_linear':
    return 0.99 / t  # max(1 - c t, 0) = 0.01.
  return math.log(100) / t  # exp(-c t) = 0.01 (unused by other recipes).


def get_config(arg=None):
  recipe, n, m, flags = common.parse_arg(arg, recipe='mdgf_exp', nm='1:16')
  c = base.get_base_config()
  c.task = 'causal_lm'
  c.model.name = 'gpt'
  c.model.variant = 'gpt2'
  c.model.vocab_size = 50257  # GPT-2's (nanoGPT pads to 50304 for speed).
  c.model.dropout = 0.0
  c.model.dtype = 'bfloat16'

  c.data.name = 'c4/en'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation[:20000]'
  c.data.text_key = 'text'
  c.data.vocab = 'sentencepiece'
  c.data.vocab_path = ''  # Set to a local SentencePiece .model file.
  c.data.targets_length = 1024  # Causal-LM row length (GPT-2's context).
  c.data.pack = False

  c.batch_size = 480
  c.eval_batch_size = 480
  c.total_steps = str(STEPS)
  c.z_loss = 0.0
  c.optimizer.name = 'adamw'
  c.optimizer.lr = 6e-4
  c.optimizer.min_lr = 6e-5
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup = '2000'
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = 1.0

  common.set_recipe(c.sparsity.ff, recipe, n, m)
  # 1e-4 as the released ViT-B config: alpha(50k steps) = 0.007.
  c.sparsity.ff.decay = 1e-4

  c.log_every = '100'
  c.eval_every = '5000'
  c.checkpoint_every = '5000'
  c.num_eval_examples = 4

  if 'runlocal' in flags:
    c.model.variant = 'nano'
    c.model.vocab_size = 384  # The byte vocabulary's 359 ids, padded.
    c.model.dtype = 'float32'
    c.data.name = 'pgf_pydoc'
    c.data.eval_split = 'validation'
    c.data.vocab = 'byte'
    c.data.targets_length = 128
    c.batch_size = 16
    c.eval_batch_size = 128
    c.total_steps = str(RUNLOCAL_STEPS)
    # beta2 0.99 as nanoGPT's small character-level model
    # (config/train_shakespeare_char.py: few tokens per step); its lr 1e-3
    # doubled for a run of 300 steps instead of 5000.
    c.optimizer.lr = 2e-3
    c.optimizer.min_lr = 2e-4
    c.optimizer.warmup = '20'
    c.optimizer.b2 = 0.99
    c.sparsity.ff.decay = mdgf_decay(recipe, RUNLOCAL_STEPS)
    c.log_every = '25'
    c.eval_every = '100'
    c.checkpoint_every = '100'
    c.num_eval_examples = 2
  return c
