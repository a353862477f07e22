"""Compressed N:M inference: the matmul of every backend equals x @ W with W
decompressed, and exported ViT / T5 runs computed with it equal the dense
hard-masked models.

Tolerances (float32): the backends sum the kept products in other orders
than a dense dot (the CPU kernel with fastmath reassociation), so outputs
agree to rtol 1e-5 and atol 1e-5 * sqrt(K) (inputs and weights ~ N(0, 1));
model logits to 1e-4.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgf import export
from pgf import train as train_lib
from pgf.configs import t5_base
from pgf.configs import vit_base
from pgf.inference import cpu
from pgf.inference import lookup
from pgf.inference import nm
from pgf.inference import pallas
from pgf.inference.model import CompressedModel
from pgf.inference.model import build_model
from pgf.inference.model import load
from pgf.inference.model import read_config


def _compressed(rng, k, out_shape, n, m):
  """Random exported-layout arrays and the dense kernel they encode."""
  g = k // m
  o = int(np.prod(out_shape))
  idx = np.sort(np.argsort(rng.random((g, o, m)), -1)[..., :n], -1)
  idx = idx.reshape((g,) + tuple(out_shape) + (n,)).astype(np.uint8)
  vals = rng.normal(size=idx.shape).astype(np.float32)
  return vals, idx, nm.dense_kernel(vals, idx, m=m)


def _reference(x, w):
  return np.tensordot(np.asarray(x, np.float64), w.astype(np.float64), 1)


# (K, out axes, N, M, x's leading shape): batch 1, odd row counts through
# every CPU path (on x86 with AVX2 / AVX-512: up to 16 rows the lookup
# kernel, with windows of 8 (K = 24), 16, 32 and 64; groups of 12 have no
# lookup layout: 1 row the gather kernel, 5 a tile of 8; 20: padded tile of
# 32; 70: two tiles of 32 + 6), 2:4, 1:32, several output axes, N > 1.
CASES = [
    (64, (48,), 2, 4, (1,)),
    (128, (40,), 1, 32, (3,)),
    (96, (70,), 1, 8, (5,)),
    (24, (20,), 3, 8, (16,)),
    (192, (9,), 5, 64, (2,)),
    (96, (21,), 1, 12, (1,)),
    (96, (21,), 2, 12, (5,)),
    (96, (3, 5), 2, 8, (2, 10)),
    (256, (33,), 1, 16, (70,)),
    (32, (17,), 3, 4, (1, 1)),
]


@pytest.mark.parametrize('backend', ['cpu', 'xla', 'pallas'])
@pytest.mark.parametrize('k,out_shape,n,m,lead', CASES)
def test_nm_matmul_equals_dense_matmul(backend, k, out_shape, n, m, lead):
  rng = np.random.default_rng(k + n + m)
  vals, idx, w = _compressed(rng, k, out_shape, n, m)
  x = rng.normal(size=lead + (k,)).astype(np.float32)
  y = nm.nm_matmul(jnp.asarray(x), vals, idx, m=m, backend=backend,
                   interpret=backend == 'pallas')
  assert y.shape == lead + out_shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), _reference(x, w), rtol=1e-5,
                             atol=1e-5 * np.sqrt(k))


def test_cpu_kernel_under_jit_and_wide_contraction():
  # K > 65536 (rows past uint16); the FFI call runs inside jit and vmap.
  rng = np.random.default_rng(1)
  k = 65536 + 64
  vals, idx, w = _compressed(rng, k, (3,), 1, 32)
  weights = nm.NMWeights.prepare(vals, idx, m=32, backend='cpu')
  assert weights.data[1].dtype == jnp.uint32
  x = rng.normal(size=(4, 2, k)).astype(np.float32)
  y = jax.jit(nm.apply)(jnp.asarray(x), weights)
  np.testing.assert_allclose(np.asarray(y), _reference(x, w), rtol=1e-5,
                             atol=1e-5 * np.sqrt(k))
  # The same kernels straight from NumPy.
  direct = cpu.run(x.reshape(8, k), *(np.asarray(a) for a in weights.data))
  np.testing.assert_allclose(direct.reshape(4, 2, 3), np.asarray(y),
                             rtol=1e-6, atol=1e-6)
  yv = jax.vmap(nm.apply, in_axes=(0, None))(jnp.asarray(x), weights)
  np.testing.assert_allclose(np.asarray(yv), np.asarray(y), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.skipif(lookup.LANES is None,
                    reason='the lookup kernel needs x86 with AVX2')
@pytest.mark.parametrize('n,m', [(1, 2), (2, 4), (1, 8), (3, 8), (1, 16),
                                 (2, 16), (1, 32), (1, 64)])
def test_lookup_kernel_at_both_vector_widths(n, m):
  # Every window the kernel takes (8, 16, 32, 64 inputs; 1 to 4 registers),
  # at 8 and (with AVX-512) 16 lanes, 1 to 5 rows (blocks of 2 and a single
  # row), outputs not a multiple of the lanes.
  rng = np.random.default_rng(n * 100 + m)
  k = 128
  vals, idx, w = _compressed(rng, k, (37,), n, m)
  x = rng.normal(size=(5, k)).astype(np.float32)
  for lanes in (8, 16)[:lookup.LANES // 8]:
    wn = lookup.window_size(k, m, lanes)
    if wn is None:
      assert m == 64 and lanes == 8   # 8 registers: more than the kernel's 4
      continue
    assert wn == max(m, lanes)
    lvals, lpos = lookup.layout(vals, idx, m=m, wn=wn)
    assert lvals.shape == (k // wn, wn // m * n if m < wn else n, 48)
    for rows in (1, 2, 5):
      y = lookup.run(x[:rows], np.asarray(lvals), np.asarray(lpos), lanes)
      np.testing.assert_allclose(y[:, :37], _reference(x[:rows], w),
                                 rtol=1e-5, atol=1e-5 * np.sqrt(k))
      np.testing.assert_array_equal(y[:, 37:], 0)


@pytest.mark.parametrize('n,m,limit', [(1, 16, cpu.LOOKUP_ROWS),
                                       (1, 8, cpu.LOOKUP_ROWS_DENSE)])
def test_cpu_kernels_switch_from_lookup_to_tiles(n, m, limit):
  rng = np.random.default_rng(3)
  vals, idx, w = _compressed(rng, 256, (40,), n, m)
  weights = nm.NMWeights.prepare(vals, idx, m=m, backend='cpu')
  has_lookup = lookup.LANES is not None
  assert len(weights.data) == (4 if has_lookup else 2)
  apply = jax.jit(nm.apply)
  for rows in (1, limit, limit + 1):
    x = rng.normal(size=(rows, 256)).astype(np.float32)
    y = apply(jnp.asarray(x), weights)
    np.testing.assert_allclose(np.asarray(y), _reference(x, w), rtol=1e-5,
                               atol=1e-5 * 16)
    # The gather (1 row) and tile kernels without the lookup layout.
    np.testing.assert_allclose(cpu.run(x, *map(np.asarray, weights.data[:2])),
                               np.asarray(y), rtol=1e-5, atol=1e-4)
    if has_lookup:
      ops = apply.lower(jnp.asarray(x), weights).as_text()
      target = 'pgf_nm_lookup' if rows <= limit else 'pgf_nm_matmul'
      assert target in ops and ops.count('pgf_nm_') == 1


def test_bfloat16_inputs_keep_their_dtype():
  rng = np.random.default_rng(2)
  vals, idx, w = _compressed(rng, 64, (16,), 1, 8)
  x = rng.normal(size=(3, 64)).astype(np.float32)
  for backend in ('cpu', 'xla'):
    weights = nm.NMWeights.prepare(vals, idx, m=8, backend=backend)
    y = nm.apply(jnp.asarray(x, jnp.bfloat16), weights, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), _reference(x, w),
                               rtol=2e-2, atol=0.1)


def test_output_axis_grouping_is_refused_clearly():
  with pytest.raises(ValueError, match='Output-axis grouping is not'):
    nm.check_contraction_grouping('layer/kernel', (64, 4, 16), (1, 2))
  with pytest.raises(ValueError, match='leading contraction axes'):
    nm.check_contraction_grouping('conv/kernel', (2, 2, 3, 8), (2,))
  assert nm.check_contraction_grouping('o/kernel', (4, 16, 64), (0, 1)) == 2
  rng = np.random.default_rng(3)
  vals, idx, _ = _compressed(rng, 64, (8,), 1, 8)
  with pytest.raises(ValueError, match='K = G \\* M = 64'):
    nm.nm_matmul(jnp.ones((2, 32)), vals, idx, m=8, backend='xla')
  with pytest.raises(ValueError, match='backend='):
    nm.nm_matmul(jnp.ones((2, 64)), vals, idx, m=8, backend='tpu')


def test_pallas_kernel_lowers_to_triton_for_cuda():
  rng = np.random.default_rng(4)
  vals, idx, _ = _compressed(rng, 256, (96,), 1, 8)
  w = nm.NMWeights.prepare(vals, idx, m=8, backend='pallas',
                           dtype=jnp.bfloat16)
  text = pallas.lower_for_gpu(jnp.zeros((8, 256), jnp.bfloat16), *w.data,
                              n=1, m=8, k=256, out=96)
  assert 'xla.gpu.triton' in text


def _short_run(c, data_dir, workdir):
  c.data.data_dir = data_dir
  c.total_steps = '2'
  c.log_every = c.eval_every = c.checkpoint_every = '2'
  c.batch_size = 16
  c.eval_batch_size = 32
  train_lib.train_and_evaluate(c, workdir)
  return export.export_run(workdir)


@pytest.fixture(scope='module')
def vit_run(data_dir, tmp_path_factory):
  # FF 1:8, Q 2:4, attention output 1:4 (groups over heads x head_dim) and
  # V 2:4 along its output axes, which runs dense.
  c = vit_base.get_config('ste,1:8,runlocal')
  for role, (n, m, axis) in dict(q=(2, 4, 'in'), o=(1, 4, 'in'),
                                 v=(2, 4, 'out')).items():
    c.sparsity[role].update(recipe='ste', n=n, m=m, axis=axis)
  workdir = str(tmp_path_factory.mktemp('vit_run'))
  return workdir, _short_run(c, data_dir, workdir)


@pytest.fixture(scope='module')
def t5_run(data_dir, tmp_path_factory):
  c = t5_base.get_config('ste,1:8,runlocal')
  for role, (n, m) in dict(q=(2, 4), o=(1, 4)).items():
    c.sparsity[role].update(recipe='ste', n=n, m=m, axis='in')
  c.num_eval_examples = 0
  workdir = str(tmp_path_factory.mktemp('t5_run'))
  return workdir, _short_run(c, data_dir, workdir)


def _dense(workdir, path):
  arrays = dict(np.load(path))
  params = jax.tree.map(jnp.asarray, export.decompress(arrays))
  return build_model(read_config(workdir)), params, arrays


@pytest.mark.parametrize('backend', ['cpu', 'xla'])
def test_vit_classification_equals_dense_hard_masked_model(vit_run, backend):
  workdir, path = vit_run
  model, params, _ = _dense(workdir, path)
  cm, arrays, _ = load(workdir, backend=backend)
  manifest = json.loads(bytes(arrays[export.MANIFEST]).decode())
  # 4 blocks x (wi, wo, query, out) compressed; the 4 value kernels dense.
  assert len(cm.kernels) == 16 and len(cm.dense_paths) == 4
  assert all('/attn/value/' in p for p in cm.dense_paths)
  assert set(manifest) == set(cm.dense_paths) | {
      f'{p}/kernel' for p in cm.kernels}
  # The params given to apply hold no compressed layer at all.
  flat = jax.tree_util.tree_flatten_with_path(cm.params)[0]
  names = ['/'.join(str(k.key) for k in p) for p, _ in flat]
  assert not any(n.startswith(tuple(cm.kernels)) for n in names)
  images = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
  want = model.apply({'params': params}, images, train=False)
  got = cm.classify(images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                             atol=1e-4)
  assert np.array_equal(np.argmax(got, -1), np.argmax(want, -1))


def test_t5_greedy_decoding_equals_dense_hard_masked_model(t5_run):
  from pgf.models import t5
  workdir, path = t5_run
  model, params, arrays = _dense(workdir, path)
  cm = CompressedModel(model, arrays, backend='cpu')
  manifest = json.loads(bytes(arrays[export.MANIFEST]).decode())
  # FF (wi_0, wi_1, wo), queries and attention outputs of both stacks.
  assert len(cm.kernels) == len(manifest) == 24 and not cm.dense_paths
  tokens = jax.random.randint(jax.random.key(1), (3, 20), 2, 250)
  tokens = tokens.at[0, 15:].set(0)  # Padding.
  want = t5.greedy_decode(model, {'params': params}, tokens, max_length=6)
  got = cm.greedy_decode(tokens, max_length=6)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # A second compressed model of the same architecture (other weights: the
  # pruned kernels' values negated) decodes with its own weights, not with
  # a decoder traced for the first one.
  other = dict(arrays)
  for key in cm.kernels:
    other[f'{key}/kernel/values'] = -arrays[f'{key}/kernel/values']
  cm2 = CompressedModel(model, other, backend='cpu')
  params2 = jax.tree.map(jnp.asarray, export.decompress(other))
  want2 = t5.greedy_decode(model.clone(), {'params': params2}, tokens,
                           max_length=6)
  np.testing.assert_array_equal(
      np.asarray(cm2.greedy_decode(tokens, max_length=6)), np.asarray(want2))
  dec = jnp.concatenate([jnp.zeros((3, 1), jnp.int32), want[:, :-1]], 1)
  logits = jax.jit(cm.apply, static_argnames='train')(
      cm.params, cm.kernels, cm.biases, tokens, dec, train=False)
  ref = model.apply({'params': params}, tokens, dec, train=False)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-4,
                             atol=1e-4)


def test_cli_reports_timing(vit_run, capsys):
  from pgf.inference import __main__ as cli
  workdir, path = vit_run
  report = cli.run(workdir, export_path=path, batch=4, repeats=2)
  assert report['max_abs_diff'] < 1e-4 and report['agree'] == 1.0
  assert report['compressed_ms'] > 0 and report['dense_ms'] > 0
