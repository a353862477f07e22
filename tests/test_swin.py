"""SwinV2: parameter counts, shapes, shifted windows, sparsity wiring."""

import itertools
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgf import sparsity as sp
from pgf.configs.base import get_base_config
from pgf.models import swin

# Exact counts of timm's swinv2_{tiny,small,base}_window8_256 (1000 classes),
# summed layer by layer from timm/models/swin_transformer_v2.py; timm's
# results/results-imagenet.csv lists 28.35, 49.73 and 87.92 (M), the paper
# (Liu et al. 2022) 28.3M, 49.7M and 87.9M.
TIMM_COUNTS = {'T': 28_347_154, 'S': 49_728_418, 'B': 87_918_816}
PUBLISHED_M = {'T': 28.3, 'S': 49.7, 'B': 87.9}

# 'mu' with two blocks per stage, so stage 0 (8x8 map, window 4) has a
# shifted block and stage 1 (4x4 map) clamps its window to the map.
MU2 = dict(swin.decode_variant('mu'), depths=(2, 2))
IMAGES = np.random.default_rng(42).standard_normal((2, 32, 32, 3), np.float32)


def _mu(**kwargs) -> swin.SwinV2:
  return swin.SwinV2(**{'num_classes': 10, 'window_size': 4, **MU2,
                        **kwargs})


def _randomize(tree, seed: int = 0, scale: float = 0.3):
  """Random values of the shapes of `tree` (NumPy: no compile per shape).

  At init the res-post-norms are zero and every block is the identity, which
  would make most checks vacuous.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
      tree)


def _params(model, seed: int = 0):
  return _randomize(nn.unbox(_abstract_params(model, 32)), seed)


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _abstract_params(model, size: int):
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda r, x: model.init(r, x, train=False),
                        jax.random.key(0), images)['params']


def _block_paths(depths, suffixes) -> set[str]:
  return {f'stage_{i}/block_{j}/{s}' for i, d in enumerate(depths)
          for j in range(d) for s in suffixes}


# ---- Structure ---------------------------------------------------------


@pytest.mark.parametrize('variant', ['T', 'S', 'B'])
def test_parameter_counts_match_timm(variant):
  model = swin.SwinV2(num_classes=1000, window_size=8,
                      **swin.decode_variant(variant))
  params = nn.unbox(_abstract_params(model, 256))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert count == TIMM_COUNTS[variant]
  assert abs(count / 1e6 - PUBLISHED_M[variant]) / PUBLISHED_M[variant] < .01


def test_every_param_has_logical_axis_names():
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(_abstract_params(_mu(), 32)), sep='/',
      is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  for path, box in flat.items():
    assert isinstance(box, nn.Partitioned), path
    assert len(box.names) == box.value.ndim, path


def test_decode_variant():
  assert swin.decode_variant('B') == dict(
      embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
  with pytest.raises(ValueError, match='unknown SwinV2 variant'):
    swin.decode_variant('L')


def test_build_from_config():
  config = get_base_config().model
  config.update(name='swin', variant='mu', window_size=4, dtype='bfloat16',
                dropout=0.1, drop_path=0.2, remat=True)
  model = swin.build(config, num_classes=7, sparsity=None)
  assert (model.embed_dim, model.depths, model.num_heads) == (16, (1, 1),
                                                              (1, 2))
  assert (model.window_size, model.dropout, model.drop_path, model.remat) == (
      4, 0.1, 0.2, True)
  logits = jax.eval_shape(
      lambda p, x: model.apply({'params': p}, x, train=True,
                               rngs={'dropout': jax.random.key(0)}),
      _params(model), IMAGES)
  assert logits.shape == (2, 7) and logits.dtype == jnp.bfloat16
  config.window_size = 0
  with pytest.raises(ValueError, match='window_size'):
    swin.build(config, num_classes=7, sparsity=None)


# ---- Forward -----------------------------------------------------------


def test_mu_shapes_train_and_eval():
  model = _mu(dropout=0.1, drop_path=0.3)
  params = _params(model)
  apply = jax.jit(lambda key, train: model.apply(
      {'params': params}, IMAGES, train=train, rngs={'dropout': key}),
                  static_argnums=1)
  keys = jax.random.split(jax.random.key(0), 2)
  eval_logits = apply(keys[0], False)
  assert eval_logits.shape == (2, 10)
  np.testing.assert_array_equal(eval_logits, apply(keys[1], False))
  train_logits = apply(keys[0], True)
  assert train_logits.shape == (2, 10)
  assert np.isfinite(train_logits).all()
  assert not np.allclose(train_logits, eval_logits)
  assert not np.allclose(train_logits, apply(keys[1], True))


def test_drop_path_rises_linearly_over_blocks():
  rates = []

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, swin.SwinBlock)
        and context.method_name == '__call__'):
      rates.append(context.module.drop_path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _abstract_params(_mu(drop_path=0.3), 32)
  np.testing.assert_allclose(rates, [0, 0.1, 0.2, 0.3])


def test_remat_keeps_outputs_and_sparse_masks():
  plan = sp.SparsityPlan((sp.LayerRule(
      'ff', swin.SPARSITY_LAYERS['ff'], sp.NM(2, 4), 'out'),))
  depths = (1, 1)  # One block per stage keeps the backward compile short.
  params = _params(_mu(depths=depths))

  def loss(params, remat):
    logits = _mu(depths=depths, remat=remat, sparsity=plan).apply(
        {'params': params}, IMAGES, train=False)
    return (logits ** 2).sum()

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = grad(params, True)
  want_value, want_grads = grad(params, False)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5), grads, want_grads)
  grads = _flat(grads)
  assert grads.keys() == _flat(params).keys()
  for path in _block_paths(depths, ('mlp/wi', 'mlp/wo')):
    g = grads[f'{path}/kernel']
    assert np.isfinite(g).all() and np.abs(g).max() > 0, path


def test_window_clamps_to_small_maps():
  assert swin.window_and_shift((16, 16), 8) == ((8, 8), (4, 4))
  assert swin.window_and_shift((8, 8), 8) == ((8, 8), (0, 0))
  assert swin.window_and_shift((4, 4), 8) == ((4, 4), (0, 0))
  assert swin.window_and_shift((16, 4), 8) == ((8, 4), (4, 0))
  # At 32x32 the maps are 8x8 and 4x4: windows 8 and 16 clamp to the same
  # windows (the position-bias MLP does not depend on the window size).
  params = _params(_mu())
  out8 = _mu(window_size=8).apply({'params': params}, IMAGES, train=False)
  out16 = _mu(window_size=16).apply({'params': params}, IMAGES, train=False)
  np.testing.assert_allclose(out8, out16, rtol=1e-6)
  assert not np.allclose(
      out8, _mu(window_size=4).apply({'params': params}, IMAGES, train=False))


# ---- Shifted windows ---------------------------------------------------


def test_shifted_window_mask_by_hand():
  # 4x4 map, window 2, shift 1: rows and columns fall in regions 0, 0, 1, 2.
  mask = swin.shifted_window_mask((4, 4), (2, 2), (1, 1))
  assert mask.shape == (4, 4, 4)
  t, f = True, False
  np.testing.assert_array_equal(mask[0], np.ones((4, 4), bool))
  # Window 1 (rows 0-1, columns 2-3): column 2 is region 1, column 3 region 2.
  np.testing.assert_array_equal(mask[1], [[t, f, t, f], [f, t, f, t],
                                          [t, f, t, f], [f, t, f, t]])
  # Window 2 (rows 2-3, columns 0-1): row 2 is region 1, row 3 region 2.
  np.testing.assert_array_equal(mask[2], [[t, t, f, f], [t, t, f, f],
                                          [f, f, t, t], [f, f, t, t]])
  np.testing.assert_array_equal(mask[3], np.eye(4, dtype=bool))
  assert swin.shifted_window_mask((4, 4), (2, 2), (0, 0)) is None


def _naive_attention(params, x, heads, window, shift, *, cut_wrap=True):
  """Token by token: token i attends to the tokens j in its window of the
  rolled map that are also within a window's reach of i in the original map
  (with cut_wrap, i.e. not brought together by the wrap-around)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  _, hh, ww, c = x.shape
  d = c // heads
  q = np.einsum('bhwc,cnd->bhwnd', x, p['query']['kernel']) + p['query'][
      'bias']
  k = np.einsum('bhwc,cnd->bhwnd', x, p['key']['kernel'])
  v = np.einsum('bhwc,cnd->bhwnd', x, p['value']['kernel']) + p['value'][
      'bias']
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  scale = np.exp(np.minimum(p['logit_scale'], np.log(100)))

  def bias(dr, dc):  # Paper eq. 4: log-spaced offsets -> MLP -> 16 sigmoid.
    rel = np.array([dr / max(window[0] - 1, 1), dc / max(window[1] - 1, 1)])
    rel = np.sign(rel * 8) * np.log2(np.abs(rel * 8) + 1) / 3
    hidden = np.maximum(rel @ p['cpb_mlp_0']['kernel'] + p['cpb_mlp_0'][
        'bias'], 0)
    return 16 / (1 + np.exp(-(hidden @ p['cpb_mlp_1']['kernel'])))

  cells = list(itertools.product(range(hh), range(ww)))

  def win(r, col):
    return ((r - shift[0]) % hh // window[0],
            (col - shift[1]) % ww // window[1])

  out = np.zeros((x.shape[0], hh, ww, heads, d))
  win_w = window[1]
  for r, col in cells:
    js = [(r2, c2) for r2, c2 in cells if win(r2, c2) == win(r, col) and (
        not cut_wrap or (abs(r2 - r) < window[0] and abs(c2 - col) < win_w))]
    # Offsets in the rolled window; equal to the original ones unless wrapped.
    offs = [(((r - shift[0]) % hh) - ((r2 - shift[0]) % hh),
             ((col - shift[1]) % ww) - ((c2 - shift[1]) % ww)) for r2, c2 in js]
    logits = np.stack([
        np.einsum('bnd,bnd->bn', q[:, r, col], k[:, r2, c2]) * scale
        + bias(*o) for (r2, c2), o in zip(js, offs)], axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    vs = np.stack([v[:, r2, c2] for r2, c2 in js], axis=-2)  # b, n, J, d
    out[:, r, col] = np.einsum('bnj,bnjd->bnd', probs, vs)
  return np.einsum('bhwnd,ndc->bhwc', out, p['out']['kernel']) + p['out'][
      'bias']


@pytest.mark.parametrize('shift', [(0, 0), (2, 2)])
def test_window_attention_matches_naive_reference(shift):
  heads, window = 2, (4, 4)
  layer = swin.WindowAttention(heads, window, shift)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8))
  abstract = jax.eval_shape(layer.init, jax.random.key(0), x)['params']
  params = _randomize(nn.unbox(abstract), scale=0.5)
  got = layer.apply({'params': params}, x)
  want = _naive_attention(params, x, heads, window, shift)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  if any(shift):
    # Sensitivity: without the region mask, wrapped tokens would mix.
    leaky = _naive_attention(params, x, heads, window, shift, cut_wrap=False)
    assert not np.allclose(got, leaky, atol=1e-3)


def test_relative_coords_table_is_constant_not_param():
  table = swin.relative_coords_table((8, 8))
  assert table.shape == (15, 15, 2)
  np.testing.assert_allclose(table[7, 7], [0, 0])
  # Offsets (-7, 7) of 8x8 windows scale to (-8, 8): +-log2(9) / log2(8).
  np.testing.assert_allclose(table[0, 14], np.array([-1, 1]) * np.log2(9) / 3,
                             rtol=1e-6)
  params = _flat(_params(_mu()))
  assert not any('coords' in k or 'index' in k for k in params)


# ---- Sparsity ----------------------------------------------------------


@pytest.mark.parametrize('role,suffixes', [
    ('ff', ('mlp/wi', 'mlp/wo')), ('q', ('attn/query',)),
    ('k', ('attn/key',)), ('v', ('attn/value',)), ('o', ('attn/out',))])
@pytest.mark.parametrize('variant', ['mu2', 'T'])
def test_sparsity_layer_regexes_select_exactly_the_blocks(
    role, suffixes, variant):
  if variant == 'T':
    kw = dict(num_classes=1000, window_size=8, **swin.decode_variant('T'))
    model, size = swin.SwinV2(**kw), 256
  else:
    model, size = _mu(), 32
  boxed = _abstract_params(model, size)
  paths = [k for k in _flat(nn.unbox(boxed)) if k.endswith('/kernel')]
  assert any('cpb_mlp' in p for p in paths)
  assert any('merge/reduction' in p for p in paths)
  matched = {p for p in paths if re.search(swin.SPARSITY_LAYERS[role], p)}
  assert matched == {f'{p}/kernel' for p in _block_paths(model.depths,
                                                         suffixes)}
  assert matched <= set(sp.kernel_sites(boxed))  # All sparse-capable.


def test_ff_2to4_out_axis_equals_dense_with_premasked_kernels():
  nm = sp.NM(2, 4)
  plan = sp.SparsityPlan((sp.LayerRule(
      'ff', swin.SPARSITY_LAYERS['ff'], nm, 'out'),))
  params = _params(_mu())
  # No `sparsity` collection: the layers use the hard mask (alpha = 0).
  sparse = _mu(sparsity=plan).apply({'params': params}, IMAGES, train=False)
  ff = _block_paths(MU2['depths'], ('mlp/wi', 'mlp/wo'))
  flat = _flat(params)
  for path in ff:
    w = flat[f'{path}/kernel']  # (embed, mlp) or (mlp, embed)
    mask = sp.nm_mask(w, nm, axes=1)  # Groups along the output axis.
    np.testing.assert_array_equal(
        mask, sp.nm_mask_reference(np.asarray(w).T, nm, 0).T)
    flat[f'{path}/kernel'] = jnp.where(mask, w, 0)
  premasked = flax.traverse_util.unflatten_dict(flat, sep='/')
  dense = _mu().apply({'params': premasked}, IMAGES, train=False)
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)
  unmasked = _mu().apply({'params': params}, IMAGES, train=False)
  assert not np.allclose(sparse, unmasked, atol=1e-3)


def test_qkv_layers_get_masks_and_alpha_in_every_block():
  # The authors' SwinV2 Q/K/V never received the step (their defect).
  nm, decay, step = sp.NM(2, 4), 0.05, 10
  groups = tuple(sp.GroupSpec(role, swin.SPARSITY_LAYERS[role], nm,
                              recipe='mdgf_exp', decay=decay)
                 for role in ('q', 'k', 'v'))
  schedule = sp.SparsitySchedule(groups, total_steps=100)
  plan = schedule.plan(step)
  params = _params(_mu())
  coll = sp.layer_collection(
      schedule.values(step), plan,
      [k for k in _flat(params) if k.endswith('/kernel')])
  qkv = _block_paths(MU2['depths'], ('attn/query', 'attn/key', 'attn/value'))
  alpha = np.exp(-decay * step)
  flat_coll = _flat(coll)
  assert {k.rsplit('/', 1)[0] for k in flat_coll} == qkv
  for path in qkv:
    np.testing.assert_allclose(flat_coll[f'{path}/alpha'], alpha, rtol=1e-6)

  logits = _mu(sparsity=plan).apply(
      {'params': params, sp.SCHEDULE_COLLECTION: coll}, IMAGES, train=True,
      rngs={'dropout': jax.random.key(0)})

  flat = _flat(params)
  for path in qkv:
    w = flat[f'{path}/kernel']  # (embed, heads, head_dim); groups on embed.
    mask = sp.nm_mask(w, nm, axes=0)
    flat[f'{path}/kernel'] = w * jnp.where(mask, 1.0, alpha)
  dense = _mu().apply(
      {'params': flax.traverse_util.unflatten_dict(flat, sep='/')}, IMAGES,
      train=True, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_allclose(logits, dense, atol=1e-5, rtol=1e-5)
  hard = _mu(sparsity=plan).apply({'params': params}, IMAGES, train=False)
  assert not np.allclose(logits, hard, atol=1e-4)  # alpha reached them.
