"""Tests of pgf.models.gpt (GPT-2): sizes, reference forward pass, causal
masking, role regexes, sparsity, decoding."""

import functools
import math
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pgf import sparsity as sp
from pgf.models import gpt

VOCAB = 64


@functools.lru_cache(maxsize=None)
def _jitted(model):
  return jax.jit(model.apply, static_argnames=('train', 'mutable'))


def _apply(model, variables, tokens, **kwargs):
  """model.apply, jitted once per model (much faster than eager on CPU)."""
  kwargs.setdefault('train', False)
  return _jitted(model)(variables, tokens, **kwargs)


def _model(**overrides):
  return gpt.GPT(vocab_size=VOCAB, **{**gpt.decode_variant('mu'),
                                      **overrides})


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


@pytest.fixture(scope='module')
def mu():
  model = _model()
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, VOCAB, (2, 9)),
                       jnp.int32)
  variables = model.init(jax.random.key(0), tokens, train=False)
  return model, flax.linen.unbox(variables), tokens


def _num_params(variant, vocab_size=50257):
  model = gpt.GPT(vocab_size=vocab_size, **gpt.decode_variant(variant))
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32), train=False))
  return sum(x.size for x in jax.tree.leaves(
      flax.linen.unbox(abstract['params'])))


# Published sizes of OpenAI's GPT-2 checkpoints (HF gpt2, gpt2-medium,
# gpt2-large, gpt2-xl; tied embeddings, learned positions).
@pytest.mark.parametrize('variant,count', [
    ('gpt2', 124_439_808), ('gpt2-medium', 354_823_168),
    ('gpt2-large', 774_030_080), ('gpt2-xl', 1_557_611_200)])
def test_parameter_counts_match_published(variant, count):
  assert _num_params(variant) == count


def test_parameter_count_formula_for_small_variants():
  # V D + T D + depth (12 D^2 + 13 D) + 2 D with mlp = 4 D (GPT-2's
  # breakdown: wte, wpe, per block 4 D^2 + 4 D attention, 8 D^2 + 5 D MLP,
  # 4 D LayerNorms; ln_f).
  for variant in ('mu', 'nano'):
    s = gpt.decode_variant(variant)
    d, n = s['width'], s['depth']
    assert s['mlp_dim'] == 4 * d
    want = 384 * d + s['max_len'] * d + n * (12 * d * d + 13 * d) + 2 * d
    assert _num_params(variant, vocab_size=384) == want


def test_decode_variant():
  assert gpt.decode_variant('gpt2') == dict(
      width=768, depth=12, num_heads=12, mlp_dim=3072, max_len=1024)
  with pytest.raises(ValueError, match=r"unknown GPT variant 'gpt5'; "
                     r"choose one of \('mu', 'nano', 'gpt2'"):
    gpt.decode_variant('gpt5')


def test_every_parameter_has_logical_axes(mu):
  model, _, tokens = mu
  boxed = _flat(jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, train=False))['params'])
  expect = {
      'wte/embedding': ((VOCAB, 32), ('vocab', 'embed')),
      'wpe/embedding': ((128, 32), ('length', 'embed')),
      'h_1/ln_1/scale': ((32,), ('embed',)),
      'h_1/ln_2/bias': ((32,), ('embed',)),
      'h_0/attn/query/kernel': ((32, 2, 16), ('embed', 'heads', 'kv')),
      'h_0/attn/query/bias': ((2, 16), ('heads', 'kv')),
      'h_0/attn/value/kernel': ((32, 2, 16), ('embed', 'heads', 'kv')),
      'h_0/attn/out/kernel': ((2, 16, 32), ('heads', 'kv', 'embed')),
      'h_0/attn/out/bias': ((32,), ('embed',)),
      'h_1/mlp/wi/kernel': ((32, 128), ('embed', 'mlp')),
      'h_1/mlp/wi/bias': ((128,), ('mlp',)),
      'h_1/mlp/wo/kernel': ((128, 32), ('mlp', 'embed')),
      'ln_f/scale': ((32,), ('embed',)),
  }
  for path, (shape, names) in expect.items():
    assert boxed[path].value.shape == shape, path
    assert tuple(boxed[path].names) == names, path
  # Every leaf is boxed with one name per axis (sharding needs them all).
  for path, box in boxed.items():
    assert isinstance(box, flax.linen.Partitioned), path
    assert len(box.names) == box.value.ndim, path
  # 2 embeddings + ln_f (2) + per block 2 LN x 2 + 6 layers x 2.
  assert len(boxed) == 2 + 2 + 2 * (4 + 12)


def test_initialisers_follow_gpt2():
  model = gpt.GPT(vocab_size=512, width=256, depth=8, num_heads=4,
                  mlp_dim=1024, max_len=512)
  p = _flat(flax.linen.unbox(model.init(
      jax.random.key(1), jnp.ones((1, 4), jnp.int32), train=False)['params']))
  std = lambda k: float(np.std(np.asarray(p[k])))
  for key in ('wte/embedding', 'wpe/embedding', 'h_3/attn/query/kernel',
              'h_3/attn/value/kernel', 'h_3/mlp/wi/kernel'):
    assert std(key) == pytest.approx(0.02, rel=0.05), key
  # Residual projections: 0.02 / sqrt(2 * depth) = 0.02 / 4.
  for key in ('h_3/attn/out/kernel', 'h_3/mlp/wo/kernel'):
    assert std(key) == pytest.approx(0.005, rel=0.05), key
  for key, value in p.items():
    if key.endswith('/bias'):
      assert not np.asarray(value).any(), key
  assert np.all(np.asarray(p['ln_f/scale']) == 1)


def _reference_forward(params, tokens, num_heads):
  """GPT-2's forward pass in NumPy (openai/gpt-2 model.py's equations, HF
  GPT2Model): float64, written independently of the Flax modules."""
  p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  tokens = np.asarray(tokens)
  length = tokens.shape[1]

  def norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p[name + '/scale'] + p[
        name + '/bias']

  def gelu(x):  # GPT-2's tanh approximation.
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi)
                                  * (x + 0.044715 * x**3)))

  x = p['wte/embedding'][tokens] + p['wpe/embedding'][:length]
  width = x.shape[-1]
  head_dim = width // num_heads

  def proj(y, prefix):  # (B, L, D) -> (B, L, heads, head_dim).
    w = p[prefix + '/kernel'].reshape(width, width)
    return (y @ w + p[prefix + '/bias'].reshape(width)).reshape(
        *y.shape[:2], num_heads, head_dim)

  depth = len({k.split('/')[0] for k in p if k.startswith('h_')})
  for i in range(depth):
    b = f'h_{i}/'
    y = norm(x, b + 'ln_1')
    q, k, v = (proj(y, b + f'attn/{n}') for n in ('query', 'key', 'value'))
    att = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(head_dim)
    att = np.where(np.tril(np.ones((length, length), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    out = np.einsum('bhqk,bkhd->bqhd', att, v).reshape(*x.shape)
    x = x + out @ p[b + 'attn/out/kernel'].reshape(width, width) + p[
        b + 'attn/out/bias']
    y = norm(x, b + 'ln_2')
    h = gelu(y @ p[b + 'mlp/wi/kernel'] + p[b + 'mlp/wi/bias'])
    x = x + h @ p[b + 'mlp/wo/kernel'] + p[b + 'mlp/wo/bias']
  return norm(x, 'ln_f') @ p['wte/embedding'].T


def _perturbed(variables, scale, seed=3):
  """Parameters plus N(0, scale^2) noise: non-zero biases and norms, and
  (large scale) attention that depends strongly on every position."""
  rng = np.random.default_rng(seed)
  return {'params': jax.tree.map(
      lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32),
      variables['params'])}


def test_matches_numpy_reference_with_random_biases(mu):
  model, variables, tokens = mu
  params = _perturbed(variables, 0.1)['params']
  got = _apply(model, {'params': params}, tokens)
  assert got.shape == (2, 9, VOCAB) and got.dtype == jnp.float32
  want = _reference_forward(params, tokens, num_heads=2)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_causal_masking(mu):
  model, variables, tokens = mu
  base = _apply(model, variables, tokens)
  for t in (0, 4, 8):
    changed = _apply(model, variables,
                     tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB))
    # Earlier positions never see a later token: bit-identical logits.
    np.testing.assert_array_equal(base[:, :t], changed[:, :t])
    assert not np.allclose(base[:, t:], changed[:, t:])
  # A prefix is scored exactly as inside the longer sequence.
  np.testing.assert_allclose(_apply(model, variables, tokens[:, :5]),
                             base[:, :5], atol=1e-6, rtol=1e-6)


def test_inputs_longer_than_the_position_table_fail(mu):
  model, variables, _ = mu
  with pytest.raises(ValueError, match='exceed the 128 learned positions'):
    model.apply(variables, jnp.ones((1, 129), jnp.int32), train=False)


def _kernel_paths(params):
  return tuple(k for k in _flat(params) if k.endswith('/kernel'))


def _expected_layers(role):
  leaves = {'ff': ('mlp/wi', 'mlp/wo'), 'q': ('attn/query',),
            'k': ('attn/key',), 'v': ('attn/value',), 'o': ('attn/out',)}
  return {f'h_{i}/{leaf}/kernel' for i in range(2) for leaf in leaves[role]}


def test_role_regexes_select_exactly_their_layers(mu):
  _, variables, _ = mu
  paths = _kernel_paths(variables['params'])
  assert len(paths) == 2 * 6  # Tied logits: no output kernel.
  chosen = set()
  for role, regex in gpt.SPARSITY_LAYERS.items():
    got = {p for p in paths if re.search(regex, p)}
    assert got == _expected_layers(role), role
    assert not got & chosen
    chosen |= got
  assert chosen == set(paths)
  # The embeddings and norms are never selected.
  others = [k for k in _flat(variables['params']) if k not in paths]
  assert not [k for k in others for r in gpt.SPARSITY_LAYERS.values()
              if re.search(r, k)]


@pytest.mark.parametrize('role,nm,axes', [
    ('ff', sp.NM(1, 4), 0), ('q', sp.NM(2, 8), 0), ('k', sp.NM(1, 4), 0),
    ('v', sp.NM(1, 4), 0), ('o', sp.NM(4, 32), (0, 1))])
def test_ste_matches_premasked_dense(mu, role, nm, axes):
  model, variables, tokens = mu
  group = sp.GroupSpec(name=role, layers=gpt.SPARSITY_LAYERS[role], nm=nm,
                       recipe='ste')
  schedule = sp.SparsitySchedule(groups=(group,), total_steps=10)
  plan = schedule.plan(5)
  params = variables['params']
  coll = sp.layer_collection(schedule.values(5), plan, _kernel_paths(params))
  sparse = _apply(model.clone(sparsity=plan),
                  {'params': params, sp.SCHEDULE_COLLECTION: coll}, tokens,
                  train=True)
  flat = _flat(params)
  for key in _expected_layers(role):
    mask = sp.nm_mask(flat[key], nm, axes)
    # N of every M along the contraction axes (for 'o' heads x head_dim,
    # 2 x 16 = 32, jointly: the leading axes flatten in order).
    k = 1 if axes == 0 else len(axes)
    groups = np.asarray(mask).reshape(-1, nm.m, *mask.shape[k:])
    np.testing.assert_array_equal(groups.sum(1), nm.n)
    flat[key] = jnp.where(mask, flat[key], 0)
  dense = _apply(model, {'params': flax.traverse_util.unflatten_dict(
      flat, sep='/')}, tokens)
  np.testing.assert_allclose(sparse, dense, atol=1e-6, rtol=1e-6)
  assert not np.allclose(sparse, _apply(model, variables, tokens))


def test_remat_and_bfloat16(mu):
  model, variables, tokens = mu
  base = _apply(model, variables, tokens)
  remat = model.clone(remat=True)

  @functools.partial(jax.jit, static_argnums=0)
  def grad(m, params):
    return jax.grad(lambda p: m.apply({'params': p}, tokens,
                                      train=True).sum())(params)

  np.testing.assert_allclose(_apply(remat, variables, tokens), base,
                             atol=1e-5, rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
      grad(model, variables['params']), grad(remat, variables['params']))
  bf16 = _apply(model.clone(dtype=jnp.bfloat16), variables, tokens)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, base, atol=0.05 * float(
      jnp.abs(base).max()))


def test_dropout_needs_rng_and_changes_outputs(mu):
  model, variables, tokens = mu
  drop = model.clone(dropout=0.3)
  a = _apply(drop, variables, tokens, train=True,
             rngs={'dropout': jax.random.key(1)})
  b = _apply(drop, variables, tokens, train=True,
             rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(_apply(drop, variables, tokens),
                                _apply(model, variables, tokens))


def test_greedy_decode(mu):
  model, variables, tokens = mu
  # At initialisation a token's own embedding dominates its logits; large
  # weights make every continuation depend on the whole context.
  variables = _perturbed(variables, 1.0)
  prompt = tokens[:, :4]
  out = gpt.greedy_decode(model, variables, prompt, max_new_tokens=5,
                          eos_id=-1)
  assert out.shape == (2, 5) and out.dtype == jnp.int32
  # Each new token is the arg-max of the full forward pass on the prompt
  # and the tokens before it.
  seq = np.asarray(prompt)
  for i in range(5):
    nxt = np.asarray(_apply(model, variables, jnp.asarray(seq)))[:, -1]
    np.testing.assert_array_equal(out[:, i], nxt.argmax(-1))
    seq = np.concatenate([seq, np.asarray(out[:, i:i + 1])], 1)
  # Stops at EOS (kept), zeros after: with eos_id = row 0's first token.
  first = int(out[0, 0])
  stopped = gpt.greedy_decode(model, variables, prompt[:1],
                              max_new_tokens=5, eos_id=first)
  np.testing.assert_array_equal(stopped, [[first, 0, 0, 0, 0]])
  with pytest.raises(ValueError, match='exceed max_len=128'):
    gpt.greedy_decode(model, variables, prompt, max_new_tokens=125)


def test_build_from_config():
  cfg = ml_collections.ConfigDict(dict(
      name='gpt', variant='nano', dropout=0.1, dtype='bfloat16', remat=True))
  plan = sp.SparsityPlan()
  model = gpt.build(cfg, vocab_size=384, sparsity=plan)
  assert (model.vocab_size, model.width, model.depth, model.max_len) == (
      384, 128, 4, 256)
  assert model.dtype == jnp.bfloat16 and model.remat
  assert model.dropout == 0.1 and model.sparsity is plan
  cfg.name = 't5'
  with pytest.raises(ValueError, match="builds only 'gpt'"):
    gpt.build(cfg, vocab_size=384, sparsity=None)
