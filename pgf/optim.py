"""Learning-rate schedules and the optimizer chain.

The chain is: recipe gradient changes (pgf.sparsity: decaying-mask flow, then
SR-STE refill, both on the raw gradient) -> global-norm clipping -> AdamW or
Adafactor. Weight decay never touches biases, norms, position embeddings or
class tokens (timm's no_weight_decay, used by the authors' ViT-B recipe).
"""

from __future__ import annotations

import flax
import jax.numpy as jnp
import optax

from pgf import sparsity as sp
from pgf.config_lib import RunSteps

REFERENCE_BATCH = 4096  # The released ViT-B recipe: lr 1e-3 at batch 4096.


def peak_lr(config) -> float:
  o = config.optimizer
  ratio = config.batch_size / REFERENCE_BATCH
  scale = {'none': 1.0, 'sqrt': ratio**0.5, 'linear': ratio}
  return o.lr * scale[o.lr_batch_scaling]


def lr_schedule(config, run: RunSteps) -> optax.Schedule:
  """warmup + cosine to min_lr | rsqrt (T5X: constant, then 1/sqrt decay)."""
  o, lr = config.optimizer, peak_lr(config)
  warmup = run.warmup
  if o.schedule == 'rsqrt':
    # T5X's default: lr * min(1, sqrt(warmup / step)): constant for the
    # first `warmup` steps, then inverse square root decay.
    w = max(warmup, 1)
    return lambda step: lr * jnp.sqrt(w / jnp.maximum(step, w))
  cooldown = run.cooldown
  if o.schedule == 'constant':
    main = optax.constant_schedule(lr)
  else:
    main = optax.cosine_decay_schedule(
        lr, max(run.total - warmup - cooldown, 1), alpha=o.min_lr / lr)
  parts, bounds = [main], []
  if warmup:
    # Linear warm-up from 0 (timm warms up from 1e-6; within rounding).
    parts, bounds = [optax.linear_schedule(0.0, lr, warmup)] + parts, [warmup]
  if cooldown:
    parts.append(optax.constant_schedule(o.min_lr))
    bounds.append(run.total - cooldown)
  return optax.join_schedules(parts, bounds) if bounds else main


def decay_mask(params) -> dict:
  """True for weights that get weight decay: kernels and embedding tables."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return flax.traverse_util.unflatten_dict(
      {k: k[-1] in ('kernel', 'embedding') for k in flat})


def make_optimizer(config, run: RunSteps, sparsifier: sp.Sparsifier
                   ) -> tuple[optax.GradientTransformationExtraArgs,
                              optax.Schedule]:
  """The full chain; `update` takes the extra args step= and plan=."""
  o = config.optimizer
  schedule = lr_schedule(config, run)
  parts = [sparsifier.gradient_transform()]
  if o.clip_norm:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  if o.name == 'adamw':
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay_mask))
  else:
    # T5X's Adafactor defaults (decay_rate 0.8, update clipping 1.0,
    # parameter-scale multiplication, no momentum).
    parts.append(optax.adafactor(
        schedule, decay_rate=0.8, clipping_threshold=1.0,
        multiply_by_parameter_scale=True, momentum=None,
        weight_decay_rate=o.weight_decay or None,
        weight_decay_mask=decay_mask if o.weight_decay else None))
  return optax.chain(*parts), schedule
