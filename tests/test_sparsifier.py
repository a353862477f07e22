"""The model-agnostic way in (Sparsifier) against pgf's own sparse layers:
the same weights give the same outputs, gradients, optimizer updates and
sparsity metrics, on a stock flax.linen model and on plain JAX params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pgf import sparsity as sp
from pgf.sparsity import NM

IN, HEADS, HEAD_DIM, OUT, CLASSES, BATCH = 16, 4, 4, 8, 3, 6


class PgfLayers(nn.Module):
  """Written with pgf's sparse layers."""

  plan: sp.SparsityPlan | None = None

  @nn.compact
  def __call__(self, x):
    h = sp.SparseDense(features=HEADS * HEAD_DIM, sparsity=self.plan,
                       name='fc1')(x)
    h = jnp.tanh(h).reshape(x.shape[:-1] + (HEADS, HEAD_DIM))
    h = sp.SparseDenseGeneral(features=OUT, axis=(-2, -1), sparsity=self.plan,
                              name='out')(h)
    return nn.Dense(CLASSES, name='head')(jnp.tanh(h))


class Stock(nn.Module):
  """The same network from stock flax.linen layers, knowing nothing of pgf."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(HEADS * HEAD_DIM, name='fc1')(x)
    h = jnp.tanh(h).reshape(x.shape[:-1] + (HEADS, HEAD_DIM))
    h = nn.DenseGeneral(OUT, axis=(-2, -1), name='out')(h)
    return nn.Dense(CLASSES, name='head')(jnp.tanh(h))


def _data():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(BATCH, IN)), jnp.float32),
          jnp.asarray(rng.normal(size=(BATCH, CLASSES)), jnp.float32))


def _params():
  x, _ = _data()
  params = Stock().init(jax.random.key(0), x)['params']
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), params)


def _groups(recipe, **kw):
  # The stock DenseGeneral kernel (heads, head_dim, out) is 3-D: its
  # contraction axes are given explicitly.
  return (sp.GroupSpec('fc', layers=r'^fc1/kernel$', nm=NM(1, 4),
                       recipe=recipe, decay=0.05, **kw),
          sp.GroupSpec('o', layers=r'^out/kernel$', nm=NM(2, 8),
                       recipe=recipe, decay=0.05, group_axes=(0, 1), **kw))


def _close(a, b, **kw):
  # Float32 reduction order differs between the two programs.
  kw.setdefault('rtol', 1e-5)
  kw.setdefault('atol', 1e-6)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), **kw), a, b)


RECIPES = ['ste', 'srste', 'mdgf_linear', 'mdgf_exp', 'sdgf_stepwise',
           'sdgf_geometric']


@pytest.mark.parametrize('recipe', RECIPES)
def test_stock_flax_model_equals_sparse_layers(recipe):
  x, target = _data()
  params = _params()
  kw = dict(mdgf_grad='scaled') if recipe.startswith('mdgf') else {}
  if recipe == 'sdgf_geometric':
    # Frames 8:64 ... 1:8 on 16-long groups do not fit; use 1:2 (8:16, ...).
    groups = (sp.GroupSpec('fc', layers=r'^fc1/kernel$', nm=NM(1, 2),
                           recipe=recipe),
              sp.GroupSpec('o', layers=r'^out/kernel$', nm=NM(1, 2),
                           recipe=recipe, group_axes=(0, 1)))
  else:
    groups = _groups(recipe, **kw)
  agnostic = sp.Sparsifier.create(params, groups, total_steps=40,
                                  dense_steps=4)
  # pgf's own layers: the Sparsifier of their boxed params (the same groups).
  boxed = PgfLayers().init(jax.random.key(0), x)['params']
  layered = sp.Sparsifier(agnostic.schedule, sp.kernel_sites(boxed))
  tx_a = agnostic.gradient_transform()
  tx_l = layered.gradient_transform()

  @jax.jit
  def stock_step(params, step):
    def loss(p):
      y = Stock().apply({'params': agnostic.apply(p, step)}, x)
      return jnp.mean((y - target) ** 2), y
    (loss_value, y), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, _ = tx_a.update(g, tx_a.init(params), params, step=step)
    return loss_value, y, g, u

  def layer_step(params, step):
    plan = layered.schedule.plan(step)
    coll = sp.layer_collection(layered.schedule.values(step), plan,
                               tuple(layered.sites))

    def loss(p):
      y = PgfLayers(plan).apply(
          {'params': p, sp.SCHEDULE_COLLECTION: coll}, x)
      return jnp.mean((y - target) ** 2), y
    (loss_value, y), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, _ = tx_l.update(g, tx_l.init(params), params, step=step, plan=plan)
    return loss_value, y, g, u

  # Dense warm-up, the start of the sparse phase, late (alpha small, other
  # SdGf frames): one compile of the stock step covers every frame.
  for step in (2, 4, 17, 39):
    want = layer_step(params, step)
    got = stock_step(params, jnp.int32(step))
    for a, b in zip(got, want):
      _close(a, b)
  assert stock_step._cache_size() == 1
  # The gradients are those of the effective weights (straight-through), and
  # really differ from the dense model's once the sparse phase starts.
  dense_g = jax.grad(lambda p: jnp.mean(
      (Stock().apply({'params': p}, x) - target) ** 2))(params)
  assert not np.allclose(stock_step(params, jnp.int32(39))[2]['fc1']['kernel'],
                         dense_g['fc1']['kernel'])


def test_metrics_come_from_the_same_core():
  x, _ = _data()
  params = _params()
  agnostic = sp.Sparsifier.create(params, _groups('mdgf_exp'),
                                  total_steps=40)
  boxed = PgfLayers().init(jax.random.key(0), x)['params']
  layered = sp.Sparsifier(agnostic.schedule, sp.kernel_sites(boxed))
  plan = agnostic.schedule.plan(10)
  a = agnostic.stats(params, step=10, plan=plan)
  b = layered.stats(params, step=10, plan=plan)
  _close(a[0], b[0], rtol=0, atol=0)
  assert float(a[0]['sparsity/fc/mask_density']) == pytest.approx(1 / 4)
  assert float(a[0]['sparsity/o/mask_density']) == pytest.approx(2 / 8)
  # alpha > 0: no effective weight is zero yet (a soft mask).
  assert float(a[0]['sparsity/fc/density']) == 1.0
  # Before any log every mask entry counts as True: the change is what the
  # mask prunes; against its own masks, nothing changed.
  assert float(a[0]['sparsity/fc/mask_change']) == pytest.approx(3 / 4)
  again = agnostic.stats(params, step=11, plan=plan, prev_masks=a[1])
  assert float(again[0]['sparsity/fc/mask_change']) == 0.0
  assert agnostic.pattern_metrics(plan) == {
      'sparsity/fc/n': 1, 'sparsity/fc/m': 4, 'sparsity/o/n': 2,
      'sparsity/o/m': 8}
  values = agnostic.schedule.values(10)
  assert float(agnostic.step_metrics(values)['sparsity/fc/alpha']) == (
      pytest.approx(np.exp(-0.5)))


def test_plain_jax_params_and_logical_names():
  rng = np.random.default_rng(2)
  # No Flax at all: a dict of arrays; a 2-D kernel groups along axis 0.
  params = {'w1': jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
            'w2': jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)}
  s = sp.Sparsifier.create(
      params, [sp.GroupSpec('ff', layers='^w1$', nm=NM(2, 4), recipe='ste')],
      total_steps=10)
  eff = s.apply(params, 3)
  np.testing.assert_array_equal(
      eff['w1'], params['w1'] * sp.nm_mask_reference(params['w1'], NM(2, 4),
                                                     0))
  np.testing.assert_array_equal(eff['w2'], params['w2'])
  # Logical axis names (nn.Partitioned boxes) select the group axes.
  boxed = {'k': nn.Partitioned(jnp.asarray(rng.normal(size=(4, 8, 3)),
                                           jnp.float32),
                               names=('heads', 'embed', 'kv'))}
  s = sp.Sparsifier.create(
      boxed, [sp.GroupSpec('q', layers='^k$', nm=NM(1, 4), recipe='ste',
                           group_axes=('embed',))], total_steps=10)
  assert s.sites['k'].names == ('heads', 'embed', 'kv')
  w = nn.unbox(boxed)['k']
  np.testing.assert_array_equal(
      s.masks(nn.unbox(boxed), s.schedule.plan(0))['k'],
      sp.nm_mask_reference(w, NM(1, 4), 1))


def test_unknown_axes_and_misses_fail_clearly():
  params = _params()
  with pytest.raises(ValueError, match=r'out/kernel: cannot tell the '
                     r'contraction axes of a kernel of shape \(4, 4, 8\)'):
    sp.Sparsifier.create(params, [sp.GroupSpec(
        'o', layers='^out/kernel$', nm=NM(1, 4), recipe='ste')],
                         total_steps=10)
  with pytest.raises(ValueError, match=r"sparsity.ff.layers='nothing' "
                     'matches no sparse-capable kernel'):
    sp.Sparsifier.create(params, [sp.GroupSpec(
        'ff', layers='nothing', nm=NM(1, 4), recipe='ste')], total_steps=10)
  with pytest.raises(ValueError, match=r"group axis name 'mlp' is not one"):
    sp.Sparsifier.create(params, [sp.GroupSpec(
        'ff', layers='^fc1/kernel$', nm=NM(1, 4), recipe='ste',
        group_axes=('mlp',))], total_steps=10)


def test_check_sharding_uses_flax_rule_resolution():
  # A T5X/MaxText-style rule set: 'embed' has two candidate mesh axes. Flax
  # gives the first one not yet used by the array, so the FF kernel
  # ('embed', 'mlp') is sharded P('model', None): blocks of 64 / 2 = 32
  # along the contraction axis. (A dict of the rules would say embed ->
  # data, a mesh axis of size 1 here, and miss the problem.)
  rules = (('embed', 'model'), ('embed', 'data'), ('mlp', 'model'))
  assert sp.sparsifier.mesh_axes(('embed', 'mlp'), rules) == ('model', None)
  boxed = {'wi': {'kernel': nn.Partitioned(jnp.zeros((64, 256)),
                                           names=('embed', 'mlp'))}}
  ok = sp.Sparsifier.create(boxed, [sp.GroupSpec(
      'ff', layers='wi/kernel$', nm=NM(1, 32), recipe='ste')],
                            total_steps=10)
  ok.check_sharding({'data': 1, 'model': 2}, rules)
  bad = sp.Sparsifier.create(boxed, [sp.GroupSpec(
      'ff', layers='wi/kernel$', nm=NM(1, 64), recipe='ste')],
                             total_steps=10)
  with pytest.raises(ValueError, match=r'wi/kernel \(64, 256\): sharding '
                     r'over the mesh .* leaves blocks of 32 weights .* not a '
                     r'multiple of M=64'):
    bad.check_sharding({'data': 1, 'model': 2}, rules)
  bad.check_sharding({'data': 2, 'model': 1}, rules)  # Not sharded: fine.


def test_readme_example_runs():
  # The README's "any Flax model" section, verbatim in spirit.
  model = Stock()
  x, target = _data()
  params = model.init(jax.random.key(0), x)['params']
  sparsifier = sp.Sparsifier.create(
      params, [sp.GroupSpec('ff', layers=r'fc1/kernel$', nm=NM(1, 4),
                            recipe='srste')], total_steps=100)
  tx = optax.chain(sparsifier.gradient_transform(), optax.adamw(1e-2))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, step):
    def loss_fn(p):
      y = model.apply({'params': sparsifier.apply(p, step)}, x)
      return jnp.mean((y - target) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, step=step)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for step in range(30):
    params, opt_state, loss = train_step(params, opt_state, step)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  hard = sparsifier.hard_masked(params)
  report = sp.verify_nm({'fc1/kernel': hard['fc1']['kernel']},
                        sparsifier.export_patterns())
  assert report['fc1/kernel'].is_nm
