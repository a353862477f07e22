"""Every config key pgf reads, with its default and a one-line comment.

Experiment files import `get_base_config()` and override. Library code never
uses `config.get(key, default)`: the defaults live here, once. Durations
(e.g. `sparsity.dense_warmup`, `optimizer.warmup`) are strings read by
`pgf.durations.to_steps`: '1000' steps, '0.1' or '10%' of the run, '5ep'.
"""

import ml_collections

ROLES = ('ff', 'q', 'k', 'v', 'o')


def sparsity_group(**overrides) -> ml_collections.ConfigDict:
  """Sparsity settings of one role (FF, Q, K, V or attention output)."""
  group = ml_collections.ConfigDict(dict(
      # A name in pgf.sparsity.recipes.RECIPES: dense | ste | srste |
      # mdgf_linear | mdgf_exp | sdgf_stepwise | sdgf_geometric.
      recipe='dense',
      n=1,  # N of the target N:M pattern.
      m=16,  # M of the target N:M pattern.
      # SdGf frame map added to the recipe (e.g. mdgf_exp + stepwise):
      # none | stepwise | geometric | custom; the sdgf_* recipes imply theirs.
      sdgf='none',
      # For sdgf=custom: 'start:N:M,...' with start a duration from the start
      # of the sparse phase, e.g. '0:4:8,25%:2:8,50%:1:8'.
      custom_frames='',
      # MdGf decay coefficient c; 1e-4 in the released ViT-B config.
      decay=1e-4,
      # straight_through (released code) | scaled (autodiff: alpha * g).
      mdgf_grad='straight_through',
      srste_lambda=2e-4,  # SR-STE refill coefficient (Zhou et al. 2021).
      axis='in',  # in: group along contraction axes | out: output axes.
      # Explicit group axes, overriding axis: '0', '0,1' or logical names
      # such as 'embed'; '' = by axis.
      group_axes='',
      # Regex on parameter paths ('.../mlp/wi/kernel'); '' = the model's
      # default for the role.
      layers='',
  ))
  group.update(overrides)
  return group


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameters, dropout and data order (one seed, one run).
  # What is trained (pgf.tasks.<task>): classification | span_corruption.
  c.task = 'classification'

  # ---- Model -------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.name = 'vit'  # vit | swin | t5
  c.model.variant = 'Ti/16'  # vit: Ti|S|B|L/16|32; swin: T|S|B; t5: small|..
  c.model.num_classes = 10  # Classification heads; ignored by t5.
  c.model.pool = 'tok'  # vit: tok (class token) | gap (global avg pool).
  c.model.dropout = 0.0  # Dropout rate inside the blocks.
  c.model.drop_path = 0.0  # Stochastic depth rate (vit/swin).
  c.model.dtype = 'float32'  # Compute dtype: float32 | bfloat16.
  c.model.remat = False  # Rematerialise blocks (sparsity stays exact).
  c.model.window_size = 8  # swin: attention window.
  c.model.vocab_size = 32128  # t5: embedding rows (byte vocab: 384).

  # ---- Data --------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = 'pgf_digits'  # Any TFDS name; pgf_digits, pgf_pydoc built in.
  # TFDS data_dir; '' = $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  c.data.data_dir = ''
  # Local files pgf_fashion_mnist/pgf_python_docs are made from; '' = Debian's.
  c.data.source_dir = ''
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 32  # Model input resolution (vision).
  # simple (resize, no flip) | imagenet (inception crop, flip, RandAugment).
  c.data.preprocess = 'simple'
  c.data.randaugment_n = 0  # RandAugment layers (0 = off); ViT-B recipe: 2.
  c.data.randaugment_m = 15  # RandAugment magnitude; ViT-B recipe: 15.
  c.data.mixup_alpha = 0.0  # Mixup Beta(a, a); ViT-B recipe: 0.5 (0 = off).
  c.data.num_workers = 0  # grain worker processes (0 = in the main process).
  # Data order seed; -1 = config.seed. The order is a function of the seed
  # and the step alone, whatever the number of processes (state is saved).
  c.data.shuffle_seed = -1
  # Vision: hold the whole split in memory, preprocessed once (preprocess
  # 'simple', no RandAugment); the same batches as the grain pipeline.
  c.data.in_memory = False
  # Text (t5): span corruption as in T5.
  c.data.text_key = 'text'  # Feature holding the text.
  c.data.vocab = 'byte'  # byte | sentencepiece
  c.data.vocab_path = ''  # SentencePiece .model path (t5 standard vocab).
  c.data.inputs_length = 512
  c.data.targets_length = 114
  c.data.noise_density = 0.15
  c.data.mean_noise_span_length = 3.0
  c.data.pack = False  # Pack several examples per row.

  # ---- Training ----------------------------------------------------------
  c.batch_size = 64  # Global batch (all hosts together).
  c.grad_accum_steps = 1  # Micro-batches per step (batch_size divisible).
  c.total_steps = '1000'  # Duration of the run ('350ep' allowed).
  c.eval_batch_size = 256  # Global evaluation batch.
  c.loss = 'softmax_xent'  # softmax_xent | sigmoid_xent (vision).
  c.label_smoothing = 0.0
  c.z_loss = 0.0  # t5: auxiliary z-loss coefficient.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'  # adamw | adafactor
  c.optimizer.lr = 1e-3  # Peak learning rate.
  c.optimizer.lr_batch_scaling = 'none'  # none | sqrt | linear (ref 4096).
  c.optimizer.schedule = 'cosine'  # cosine | rsqrt (T5X) | constant
  c.optimizer.warmup = '0'  # Linear warm-up duration.
  c.optimizer.cooldown = '0'  # Final constant phase at min_lr (timm).
  c.optimizer.min_lr = 0.0  # Final lr of the cosine schedule.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0  # Decoupled; never on biases or norms.
  c.optimizer.clip_norm = 0.0  # Global-norm clipping (0 = off).

  # ---- Sparsity (docs/recipes.md) ---------------------------------------
  c.sparsity = ml_collections.ConfigDict()
  c.sparsity.dense_warmup = '0'  # Dense phase at the start (no mask).
  c.sparsity.fine_tune = '0'  # Hard-mask STE phase at the end.
  # Recompute N:M masks and effective kernels in the backward pass instead
  # of keeping them (same results; no extra memory over a dense step).
  c.sparsity.recompute = True
  for role in ROLES:
    c.sparsity[role] = sparsity_group()

  # ---- Parallelism -------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Devices on the data axis (-1 = all the others).
  c.mesh.model = 1  # Devices on the model (tensor) axis.
  # Logical axis name -> mesh axis (or None), for nn.logical_axis_rules.
  c.mesh.rules = (
      ('batch', 'data'), ('embed', None), ('mlp', 'model'),
      ('heads', 'model'), ('kv', None), ('vocab', 'model'),
      ('length', None), ('classes', None), ('patch', None),
      ('channels', None), ('relpos_buckets', None),
  )

  # ---- Logging, evaluation, checkpoints ----------------------------------
  c.log_every = '50'  # Train metrics interval.
  c.eval_every = '500'  # Evaluation interval (and at the end).
  c.checkpoint_every = '500'  # Checkpoint interval (and at the end).
  c.keep_checkpoints = 3  # Checkpoints kept on disk.
  c.num_eval_examples = 0  # t5: decoded examples written per eval (0=off).

  # ---- Gradient-noise diagnostics (opt-in; at log steps only) ------------
  # Per kernel: gradient std, mask change, variance of AdamW's second
  # moment, minibatch noise-to-signal ratio (docs/recipes.md section 8).
  # Cost when on: log steps compile a second step that also computes
  # `sub_batches` sub-batch gradients (about one extra backward pass).
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.enabled = False
  c.diagnostics.sub_batches = 4  # Sub-batches of the noise-to-signal ratio.
  # Regex on kernel paths; '' = the FF kernels (sparsity.ff's selection).
  c.diagnostics.layers = ''
  return c


def get_config(arg=None):
  del arg
  return get_base_config()
