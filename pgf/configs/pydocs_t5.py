r"""A small T5 on the Python documentation: the study's language config.

  python -m pgf.train --config=configs/pydocs_t5.py:srste,1:32 \
      --config.seed=0 --workdir=workdirs/pydocs/srste_1:32/seed_0
  python -m pgf.train --config=configs/pydocs_t5.py:runlocal

Span corruption (T5's, noise density 0.15, mean span 3) on pgf_python_docs:
the reST sources of the Python 3.11 documentation (`apt-get install -y
python3.11-doc`, or --config.data.source_dir=DIR; about 11 MB of English
about Python), byte vocabulary, inputs of 64 bytes. The model is a 'nano'
T5 v1.1 (width 64, 2 + 2 layers, 4 heads of 16, gated-GELU FF of 256), the
three FF matrices of every layer sparse (contraction lengths 64 and 256).
AdamW with warm-up and cosine decay; MdGf's alpha reaches 0.01 at 60 % of
the run. Besides token accuracy (which sentinels and EOS inflate: they are
easy), evaluation reports `eval/text_accuracy`, the accuracy on the masked
text bytes alone: the evidence that the model learns the language.

The argument: a recipe, an N:M (default dense, 1:32) and runlocal (a short
smoke run). The study: experiments/pydocs/.
"""

from pgf.configs import base
from pgf.configs import common
from pgf.configs import fmnist_vit

STEPS = 2000


def get_config(arg=None):
  recipe, n, m, flags = common.parse_arg(arg, recipe='dense', nm='1:32')
  c = base.get_base_config()
  c.task = 'span_corruption'
  c.model.name = 't5'
  c.model.variant = 'nano'
  c.model.vocab_size = 384  # The byte vocabulary's 359 ids, padded.
  c.model.dropout = 0.0

  c.data.name = 'pgf_python_docs'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.vocab = 'byte'
  c.data.inputs_length = 64
  c.data.targets_length = 16
  c.data.pack = False

  c.batch_size = 32
  c.eval_batch_size = 256
  c.total_steps = str(STEPS)
  c.optimizer.name = 'adamw'
  c.optimizer.lr = 3e-3
  c.optimizer.warmup = '5%'
  c.optimizer.schedule = 'cosine'
  c.optimizer.weight_decay = 0.01
  c.optimizer.clip_norm = 1.0
  c.z_loss = 1e-4

  common.set_recipe(c.sparsity.ff, recipe, n, m)
  c.sparsity.ff.decay = fmnist_vit.decay_for(recipe, STEPS)

  c.log_every = '100'
  c.eval_every = '500'
  c.checkpoint_every = '500'
  c.keep_checkpoints = 2
  c.num_eval_examples = 4

  if 'runlocal' in flags:
    c.total_steps = '200'
    c.sparsity.ff.decay = fmnist_vit.decay_for(recipe, 200)
    c.eval_every = c.checkpoint_every = '100'
  return c
