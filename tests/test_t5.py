"""Tests of pgf.models.t5 (T5 v1.1): sizes, masks, sparsity, decoding."""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pgf import sparsity as sp
from pgf.models import t5

VOCAB = 64


@functools.lru_cache(maxsize=None)
def _jitted(model):
  return jax.jit(model.apply, static_argnames=('train', 'method', 'mutable'))


def _apply(model, variables, *args, **kwargs):
  """model.apply, jitted once per model (much faster than eager on CPU)."""
  return _jitted(model)(variables, *args, **kwargs)


def _init(model, rng, enc, dec):
  return model.init(rng, enc, dec, train=False)


def _model(**overrides):
  return t5.T5(vocab_size=VOCAB, **{**t5.decode_variant('mu'), **overrides})


def _tokens(rng, shape, low=2):
  return jnp.asarray(rng.integers(low, VOCAB, size=shape), jnp.int32)


@pytest.fixture(scope='module')
def mu():
  model = _model()
  rng = np.random.default_rng(0)
  enc = _tokens(rng, (2, 7))
  dec = _tokens(rng, (2, 5)).at[:, 0].set(0)
  variables = _init(model, jax.random.key(0), enc, dec)
  return model, flax.linen.unbox(variables), enc, dec


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _num_params(variant):
  model = t5.T5(vocab_size=32128, **t5.decode_variant(variant))
  tokens = jnp.ones((1, 4), jnp.int32)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, tokens, train=False))
  leaves = jax.tree.leaves(flax.linen.unbox(abstract['params']))
  return sum(x.size for x in leaves)


# Published sizes of the T5 v1.1 checkpoints (HF google/t5-v1_1-*, T5X).
@pytest.mark.parametrize('variant,count', [
    ('small', 76_961_152), ('base', 247_577_856), ('large', 783_150_080)])
def test_parameter_counts_match_published(variant, count):
  n = _num_params(variant)
  if variant == 'base':
    assert abs(n - count) / count < 0.005
  assert n == count


def test_decode_variant():
  assert t5.decode_variant('base') == dict(
      emb_dim=768, mlp_dim=2048, num_encoder_layers=12,
      num_decoder_layers=12, num_heads=12, head_dim=64)
  assert t5.decode_variant('mu')['emb_dim'] == 32
  with pytest.raises(ValueError, match='unknown T5 variant'):
    t5.decode_variant('xxl9')


def test_mu_shapes_and_logical_axes(mu):
  model, variables, enc, dec = mu
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.key(0), enc, dec, train=False))['params']
  flat = _flat(boxed)
  expect = {
      'token_embedder/embedding': ((VOCAB, 32), ('vocab', 'embed')),
      'encoder/relpos_bias/rel_embedding': ((2, 32),
                                            ('heads', 'relpos_buckets')),
      'decoder/relpos_bias/rel_embedding': ((2, 32),
                                            ('heads', 'relpos_buckets')),
      'encoder/layers_1/attention/query/kernel': ((32, 2, 16),
                                                  ('embed', 'heads', 'kv')),
      'encoder/layers_1/attention/out/kernel': ((2, 16, 32),
                                                ('heads', 'kv', 'embed')),
      'decoder/layers_0/encoder_decoder_attention/value/kernel': (
          (32, 2, 16), ('embed', 'heads', 'kv')),
      'decoder/layers_1/mlp/wi_0/kernel': ((32, 64), ('embed', 'mlp')),
      'decoder/layers_1/mlp/wo/kernel': ((64, 32), ('mlp', 'embed')),
      'decoder/layers_1/pre_cross_attention_layer_norm/scale': ((32,),
                                                                ('embed',)),
      'encoder/encoder_norm/scale': ((32,), ('embed',)),
      'decoder/decoder_norm/scale': ((32,), ('embed',)),
      'decoder/logits_dense/kernel': ((32, VOCAB), ('embed', 'vocab')),
  }
  for path, (shape, names) in expect.items():
    assert flat[path].value.shape == shape, path
    assert tuple(flat[path].names) == names, path
  # No biases anywhere; 2 + 2 layers; one relpos table per stack.
  assert not [k for k in flat if k.endswith('/bias')]
  assert {k.split('/')[1] for k in flat if '/layers_' in k} == {
      'layers_0', 'layers_1'}
  assert len([k for k in flat if 'rel_embedding' in k]) == 2
  logits = _apply(model, variables, enc, dec, train=False)
  assert logits.shape == (2, 5, VOCAB) and logits.dtype == jnp.float32


def test_initialisers_follow_t5x():
  model = t5.T5(vocab_size=512, emb_dim=256, num_heads=4, head_dim=64,
                mlp_dim=512, num_encoder_layers=1, num_decoder_layers=1)
  tokens = jnp.ones((1, 4), jnp.int32)
  p = _flat(flax.linen.unbox(_init(model, jax.random.key(1), tokens,
                           tokens)['params']))
  std = lambda k: float(np.std(np.asarray(p[k])))
  layer = 'encoder/layers_0/'
  assert std('token_embedder/embedding') == pytest.approx(1.0, rel=0.05)
  # fan_in = 256: 1/16; the query also takes head_dim**-0.5 = 1/8.
  assert std(layer + 'attention/key/kernel') == pytest.approx(1 / 16, rel=0.05)
  assert std(layer + 'attention/query/kernel') == pytest.approx(
      1 / 128, rel=0.05)
  # out: fan_in = heads * head_dim = 256.
  assert std(layer + 'attention/out/kernel') == pytest.approx(1 / 16, rel=0.05)
  assert std(layer + 'mlp/wo/kernel') == pytest.approx(512**-0.5, rel=0.05)
  assert np.all(np.asarray(p[layer + 'pre_mlp_layer_norm/scale']) == 1)


def test_causality(mu):
  model, variables, enc, dec = mu
  base = _apply(model, variables, enc, dec, train=False)
  changed = _apply(model, variables, enc, dec.at[:, 3].set(VOCAB - 1),
                        train=False)
  np.testing.assert_array_equal(base[:, :3], changed[:, :3])
  assert not np.allclose(base[:, 3:], changed[:, 3:])


def test_encoder_padding_is_ignored(mu):
  model, variables, enc, dec = mu
  base = _apply(model, variables, enc, dec, train=False)
  padded = jnp.pad(enc, ((0, 0), (0, 5)))
  np.testing.assert_allclose(_apply(model, variables, padded, dec, train=False),
                             base, atol=1e-5, rtol=1e-5)


def test_packing_matches_separate_examples(mu):
  model, variables, _, _ = mu
  rng = np.random.default_rng(1)
  enc_a, enc_b = _tokens(rng, (1, 5)), _tokens(rng, (1, 4))
  dec_a = _tokens(rng, (1, 4)).at[:, 0].set(0)
  dec_b = _tokens(rng, (1, 3)).at[:, 0].set(0)
  sep_a = _apply(model, variables, enc_a, dec_a, train=False)
  sep_b = _apply(model, variables, enc_b, dec_b, train=False)

  def pack(a, b, pad):
    z = jnp.zeros((1, pad), jnp.int32)
    tokens = jnp.concatenate([a, b, z], 1)
    seg = jnp.asarray([[1] * a.shape[1] + [2] * b.shape[1] + [0] * pad])
    pos = jnp.asarray([list(range(a.shape[1])) + list(range(b.shape[1]))
                       + [0] * pad])
    return tokens, seg, pos

  enc, enc_seg, enc_pos = pack(enc_a, enc_b, 2)
  dec, dec_seg, dec_pos = pack(dec_a, dec_b, 1)
  packed = _apply(model, variables, enc, dec, encoder_segment_ids=enc_seg,
                       decoder_segment_ids=dec_seg, encoder_positions=enc_pos,
                       decoder_positions=dec_pos, train=False)
  np.testing.assert_allclose(packed[:, :4], sep_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[:, 4:7], sep_b, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='both'):
    _apply(model, variables, enc, dec, encoder_segment_ids=enc_seg, train=False)


def test_relative_position_bucket_bidirectional():
  # relative position = key - query. 16 buckets per direction, 8 exact;
  # keys after the query go to 16 + bucket; log buckets up to distance 128:
  # bucket(n) = 8 + floor(log(n / 8) / log(16) * 8) for 8 <= n < 128.
  expect = {0: 0, -1: 1, -7: 7, -8: 8, -12: 9, -16: 10, -32: 12, -64: 14,
            -127: 15, -128: 15, -1000: 15, 1: 17, 7: 23, 8: 24, 16: 26,
            127: 31, 128: 31, 5000: 31}
  rel = np.asarray(list(expect), np.int32)
  want = np.asarray(list(expect.values()))
  np.testing.assert_array_equal(
      t5.relative_position_bucket(rel, bidirectional=True), want)
  np.testing.assert_array_equal(
      t5.relative_position_bucket(jnp.asarray(rel), bidirectional=True), want)


def test_relative_position_bucket_causal():
  # All 32 buckets look back; 16 exact; future keys share bucket 0;
  # bucket(n) = 16 + floor(log(n / 16) / log(8) * 16) for 16 <= n < 128.
  expect = {5: 0, 1: 0, 0: 0, -1: 1, -15: 15, -16: 16, -32: 21, -64: 26,
            -127: 31, -128: 31, -1000: 31}
  rel = np.asarray(list(expect), np.int32)
  want = np.asarray(list(expect.values()))
  np.testing.assert_array_equal(
      t5.relative_position_bucket(rel, bidirectional=False), want)
  np.testing.assert_array_equal(
      t5.relative_position_bucket(jnp.asarray(rel), bidirectional=False), want)


def _expected_layers(role):
  enc = [f'encoder/layers_{i}/attention' for i in range(2)]
  dec = [f'decoder/layers_{i}/{a}' for i in range(2)
         for a in ('self_attention', 'encoder_decoder_attention')]
  if role == 'ff':
    return {f'{s}/layers_{i}/mlp/{w}' for s in ('encoder', 'decoder')
            for i in range(2) for w in ('wi_0', 'wi_1', 'wo')}
  leaf = dict(q='query', k='key', v='value', o='out')[role]
  return {f'{a}/{leaf}' for a in enc + dec}


def _kernel_paths(params):
  return tuple(k for k in _flat(params) if k.endswith('/kernel'))


def test_role_regexes_select_exactly_their_layers(mu):
  _, variables, _, _ = mu
  paths = _kernel_paths(variables['params'])
  assert 'decoder/logits_dense/kernel' in paths
  chosen = set()
  for role, regex in t5.SPARSITY_LAYERS.items():
    got = {p for p in paths if re.search(regex, p)}
    assert got == {f'{k}/kernel' for k in _expected_layers(role)}, role
    assert not got & chosen
    chosen |= got
  assert set(paths) - chosen == {'decoder/logits_dense/kernel'}


def _schedule(role, nm):
  group = sp.GroupSpec(name=role, layers=t5.SPARSITY_LAYERS[role], nm=nm,
                       recipe='ste')
  return sp.SparsitySchedule(groups=(group,), total_steps=10)


def _sparse_vs_premasked(mu, role, nm, axes):
  model, variables, enc, dec = mu
  schedule = _schedule(role, nm)
  plan = schedule.plan(5)
  params = variables['params']
  paths = _kernel_paths(params)
  coll = sp.layer_collection(schedule.values(5), plan, paths)
  sparse = model.clone(sparsity=plan)
  logits = _apply(sparse,
      {'params': params, sp.SCHEDULE_COLLECTION: coll}, enc, dec,
      train=True)
  flat = _flat(params)
  masks = {}
  for key in sorted(f'{k}/kernel' for k in _expected_layers(role)):
    masks[key] = want = sp.nm_mask(flat[key], nm, axes)
    flat[key] = jnp.where(want, flat[key], 0)
  dense = _apply(model, {'params': flax.traverse_util.unflatten_dict(
      flat, sep='/')}, enc, dec, train=False)
  np.testing.assert_allclose(logits, dense, atol=1e-6, rtol=1e-6)
  return masks


def test_ff_ste_matches_premasked_dense(mu):
  masks = _sparse_vs_premasked(mu, 'ff', sp.NM(1, 4), 0)
  # 1:4 along the contraction axis: one weight in 4 per output.
  for m in masks.values():
    np.testing.assert_array_equal(
        np.asarray(m).reshape(-1, 4, m.shape[-1]).sum(1), 1)


def test_o_groups_run_over_heads_and_head_dim_jointly(mu):
  # 4:32 needs groups of 32 = heads (2) x head_dim (16): only possible when
  # the groups run over both contraction axes of the (heads, kv, embed)
  # kernel.
  model, variables, enc, dec = mu
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.key(0), enc, dec, train=False))
  sites = sp.kernel_sites(boxed['params'])
  out = sites['decoder/layers_0/encoder_decoder_attention/out/kernel']
  assert out.in_axes == (0, 1) and out.out_axes == (2,)
  masks = _sparse_vs_premasked(mu, 'o', sp.NM(4, 32), (0, 1))
  for m in masks.values():
    assert m.shape == (2, 16, 32)
    np.testing.assert_array_equal(np.asarray(m).sum((0, 1)), 4)


def test_remat_and_bfloat16(mu):
  model, variables, enc, dec = mu
  base = _apply(model, variables, enc, dec, train=False)
  remat = model.clone(remat=True)

  @functools.partial(jax.jit, static_argnums=0)
  def grad(m, params):
    return jax.grad(
        lambda p: m.apply({'params': p}, enc, dec, train=True).sum())(params)

  np.testing.assert_allclose(
      _apply(remat, variables, enc, dec, train=False), base, atol=1e-5,
      rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
      grad(model, variables['params']), grad(remat, variables['params']))
  bf16 = _apply(model.clone(dtype=jnp.bfloat16), variables, enc, dec,
                train=False)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, base, atol=0.1 * float(
      jnp.abs(base).max()))


def test_dropout_needs_rng_and_changes_outputs(mu):
  model, variables, enc, dec = mu
  drop = model.clone(dropout=0.3)
  a = _apply(drop, variables, enc, dec, train=True,
                 rngs={'dropout': jax.random.key(1)})
  b = _apply(drop, variables, enc, dec, train=True,
                 rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(
      _apply(drop, variables, enc, dec, train=False),
      _apply(model, variables, enc, dec, train=False))


def test_encode_decode_methods(mu):
  model, variables, enc, dec = mu
  encoded = _apply(model, variables, enc, train=False, method='encode')
  assert encoded.shape == (2, 7, 32)
  logits = _apply(model, variables, encoded, enc, dec, train=False,
                       method='decode')
  np.testing.assert_allclose(
      logits, _apply(model, variables, enc, dec, train=False), atol=1e-6)


def test_greedy_decode(mu):
  model, variables, enc, _ = mu
  out = t5.greedy_decode(model, variables, enc, max_length=6)
  assert out.shape == (2, 6) and out.dtype == jnp.int32
  np.testing.assert_array_equal(
      out, t5.greedy_decode(model, variables, enc, max_length=6))
  # Step by step, each token is the arg-max given the previous ones.
  dec = jnp.zeros((2, 6), jnp.int32).at[:, 1:].set(out[:, :-1])
  want = _apply(model, variables, enc, dec, train=False).argmax(-1)
  for row, w in zip(np.asarray(out), np.asarray(want)):
    stop = list(row).index(1) + 1 if 1 in row else len(row)
    np.testing.assert_array_equal(row[:stop], w[:stop])
    assert not row[stop:].any()
  # Stops at EOS: with eos_id = the first token, every row is [eos, 0, ...].
  first = int(out[0, 0])
  stopped = t5.greedy_decode(model, variables, enc[:1], max_length=6,
                             eos_id=first)
  np.testing.assert_array_equal(stopped, [[first, 0, 0, 0, 0, 0]])


def test_build_from_config():
  cfg = ml_collections.ConfigDict(dict(
      name='t5', variant='mu', dropout=0.1, dtype='bfloat16', remat=True))
  plan = sp.SparsityPlan()
  model = t5.build(cfg, vocab_size=384, sparsity=plan)
  assert (model.vocab_size, model.emb_dim, model.num_decoder_layers) == (
      384, 32, 2)
  assert model.dtype == jnp.bfloat16 and model.remat
  assert model.dropout == 0.1 and model.sparsity is plan
  cfg.dtype = 'float16'
  with pytest.raises(ValueError, match='model.dtype'):
    t5.build(cfg, vocab_size=384, sparsity=None)
