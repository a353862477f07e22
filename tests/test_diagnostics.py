"""The opt-in gradient-noise diagnostics of the train loop against values
computed here by hand from the same step: gradient std, AdamW's second
moment, the sub-batch noise-to-signal ratio and the per-kernel mask
change."""

import jax
import numpy as np
import pytest

from pgf import sharding
from pgf import sparsity as sp
from pgf import step as step_lib
from pgf import train as train_lib
from pgf.configs import vit_base

FF = ('Transformer/encoderblock_0/mlp/wi/kernel',
      'Transformer/encoderblock_0/mlp/wo/kernel',
      'Transformer/encoderblock_1/mlp/wi/kernel')


def _config(data_dir, recipe='srste,1:4', **kw):
  c = vit_base.get_config(f'{recipe},runlocal')
  c.data.data_dir = data_dir
  c.model.variant = 'mu/2'
  c.total_steps = '6'
  c.batch_size = 16
  c.eval_batch_size = 128
  c.log_every = c.eval_every = c.checkpoint_every = '3'
  c.optimizer.clip_norm = 0.5  # Active: the second moment sees clipped g.
  c.optimizer.weight_decay = 0.0
  c.diagnostics.enabled = True
  c.diagnostics.sub_batches = 4
  for k, v in kw.items():
    c.diagnostics[k] = v
  return c


def _flat(tree):
  return sp.trees.flatten(tree)


def _with_random_head(state):
  """ViT's head starts at zero, which zeroes every other gradient."""
  head = state.params['head']['kernel']
  params = dict(state.params, head=dict(
      state.params['head'], kernel=jax.random.normal(
          jax.random.key(5), head.shape, head.dtype)))
  return state.replace(params=params)


def test_diagnostics_equal_hand_computed_values(data_dir):
  c = _config(data_dir)
  s = step_lib.setup(c)
  assert s.diagnosed == tuple(sorted(
      f'Transformer/encoderblock_{i}/mlp/{w}/kernel' for i in range(2)
      for w in ('wi', 'wo')))
  state = _with_random_head(step_lib.init_state(s, jax.random.key(0)))
  it = s.task.pipeline.make_train_iterator(
      c, global_batch_size=16, process_index=0, process_count=1)
  batch = sharding.global_batch(next(it), sharding.batch_sharding(s.mesh))
  params = jax.device_get(state.params)
  plan = s.schedule.plan(0)
  new_state, m = jax.jit(
      lambda st, b: step_lib.train_step(s, st, b, plan, diagnose=True))(
          state, batch)
  m = jax.device_get(m)

  # The gradient of the step, computed here from the task's loss.
  values = s.schedule.values(0)
  coll = sp.layer_collection(values, plan, s.kernel_paths)
  model = s.task.build_model(plan)
  rng = step_lib.step_rng(c, 0)

  @jax.jit  # Eager, every op of the backward pass would compile on its own.
  def grad(batch, rng):
    def loss(p):
      out = s.task.apply(model, {'params': p, sp.SCHEDULE_COLLECTION: coll},
                         batch, train=True, rngs={'dropout': rng})
      return s.task.loss(out, batch)[0]
    return _flat(jax.grad(loss)(params))

  g = grad(batch, rng)
  for path in FF:
    layer = path.rsplit('/', 1)[0]
    np.testing.assert_allclose(m[f'diag/{layer}/grad_std'],
                               np.std(np.asarray(g[path])), rtol=1e-5)
  # AdamW's nu after the first step: (1 - b2) g_c^2, g_c the gradient after
  # SR-STE's term and global-norm clipping.
  masks = s.sparsifier.masks(params, plan)
  flat_p = _flat(params)
  g_in = dict(g)
  for path, mask in masks.items():
    g_in[path] = g[path] + 2e-4 * np.where(mask, 0, flat_p[path])
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(v))) for v in g_in.values()))
  scale = min(1.0, 0.5 / norm)
  b2 = c.optimizer.b2
  for path in FF:
    layer = path.rsplit('/', 1)[0]
    nu = (1 - b2) * np.square(np.asarray(g_in[path]) * scale)
    np.testing.assert_allclose(m[f'diag/{layer}/nu_var'], np.var(nu),
                               rtol=1e-4)
  # Noise-to-signal: 4 sub-batches of 4 consecutive examples.
  subs = [grad(jax.tree.map(lambda x, i=i: x[4 * i:4 * i + 4], batch),
               jax.random.fold_in(rng, i + 1000)) for i in range(4)]
  for path in FF:
    layer = path.rsplit('/', 1)[0]
    gk = np.stack([np.asarray(sg[path]) for sg in subs])
    mean = gk.mean(0)
    want = np.sum((gk - mean) ** 2) / (3 * np.sum(mean ** 2))
    np.testing.assert_allclose(m[f'diag/{layer}/noise_to_signal'], want,
                               rtol=1e-3)
  # Diagnostics do not change the step itself.
  plain, m2 = jax.jit(lambda st, b: step_lib.train_step(s, st, b, plan))(
      _with_random_head(step_lib.init_state(s, jax.random.key(0))), batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               jax.device_get(plain.params), jax.device_get(new_state.params))
  assert not any(k.startswith('diag/') for k in m2)


def test_loop_logs_diagnostics_at_log_steps(data_dir, tmp_path):
  c = _config(data_dir)
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(c, workdir)
  records = [r for r in train_lib.metrics_lib.read_jsonl(workdir)
             if 'train/loss' in r]
  assert [r['step'] for r in records] == [3, 6]
  for r in records:
    for path in FF:
      layer = path.rsplit('/', 1)[0]
      for key in ('grad_std', 'nu_var', 'noise_to_signal', 'mask_change'):
        assert np.isfinite(r[f'diag/{layer}/{key}']), (layer, key)
  # The per-kernel mask changes add up to the group's.
  r = records[-1]
  sizes = {p: np.prod(s) for p, s in (
      (p, (32, 64) if 'wi' in p else (64, 32)) for p in (
          f'Transformer/encoderblock_{i}/mlp/{w}/kernel' for i in range(2)
          for w in ('wi', 'wo')))}
  total = sum(r[f'diag/{p.rsplit("/", 1)[0]}/mask_change'] * n
              for p, n in sizes.items()) / sum(sizes.values())
  assert total == pytest.approx(r['sparsity/ff/mask_change'], rel=1e-6)


def test_dense_run_has_curves_and_off_costs_nothing(data_dir):
  s = step_lib.setup(_config(data_dir, recipe='dense'))
  assert len(s.diagnosed) == 4  # The FF kernels, though dense.
  off = _config(data_dir)
  off.diagnostics.enabled = False
  assert step_lib.setup(off).diagnosed == ()
  with pytest.raises(ValueError, match='diagnostics.sub_batches=3'):
    step_lib.setup(_config(data_dir, sub_batches=3))
