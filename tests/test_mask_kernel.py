"""Tests of the CPU N:M mask kernel (pgf.sparsity.mask_kernel) and of how
`nm_mask` chooses it: bit-equal to the NumPy reference (which the XLA
formulation equals: tests/test_masks.py) on hard groups (ties, zeros,
denormals, inf, NaN), every pattern family and dtype, leading axes, vmap,
jit, grad; and the choice itself.
"""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_masks import _hard_groups
from test_masks import _ungroup

from pgf.sparsity import NM
from pgf.sparsity import masks
from pgf.sparsity import nm_mask
from pgf.sparsity import nm_mask_reference

# K = min(N, M - N) = 1 (both directions), lists of 2-32 kept or dropped
# keys, M from 4 to 256 (the kernel reads M at run time): groups of two
# chunks (2:4 to 32:64, the last chunk read apart), of many, with rows past
# the last whole chunk (4:10, 3:48: lists longer than K).
PATTERNS = [(1, 4), (3, 4), (2, 4), (1, 8), (7, 8), (4, 8), (6, 8), (1, 16),
            (15, 16), (2, 16), (8, 16), (1, 32), (31, 32), (4, 32), (16, 32),
            (8, 64), (61, 64), (32, 64), (1, 128), (8, 128), (8, 256), (3, 48),
            (4, 10)]

# name -> (group axes, shape for M): inner lengths 144 (wide strips of 128,
# 64 or 32 columns and narrow ones of 16), 32 and 16, groups across leading
# axes and straddling heads.
LAYOUTS = {
    'dense_in': (0, lambda m: (2 * m, 144)),
    'qkv_in': (0, lambda m: (m, 2, 16)),
    'out_in': ((0, 1), lambda m: (2, m, 16)),
    'conv_in': (1, lambda m: (3, m, 32)),
}


def _kernel_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count('pgf_nm_mask_')


def _case(n, m, layout, dtype, seed):
  axes, shape_fn = LAYOUTS[layout]
  shape = shape_fn(m)
  rng = np.random.default_rng(seed)
  groups = _hard_groups(rng, int(np.prod(shape)) // m, m)
  w = _ungroup(groups, shape, axes).astype(np.float32)
  return axes, np.asarray(jnp.asarray(w, dtype))


@pytest.mark.parametrize('n,m', PATTERNS, ids=lambda v: str(v))
def test_kernel_equals_reference(n, m):
  """Every layout in float32; one in bfloat16 and float16 (their keys are
  16-bit, their caps the infinity's bits)."""
  nm = NM(n, m)
  cases = [(layout, jnp.float32) for layout in LAYOUTS]
  cases += [('dense_in', jnp.bfloat16), ('out_in', jnp.float16)]
  for i, (layout, dtype) in enumerate(cases):
    axes, w = _case(n, m, layout, dtype, seed=1000 * m + 10 * n + i)
    what = f'{n}:{m} {layout} {w.shape} {jnp.dtype(dtype).name}'
    fn = lambda w, axes=axes: nm_mask(w, nm, axes, impl='kernel')
    assert _kernel_calls(fn, w) == 1, what
    got = np.asarray(jax.jit(fn)(w))
    want = nm_mask_reference(w, nm, axes)
    np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize('n', [1, 3, 13, 15])
def test_kernel_plateaus_keep_the_first(n):
  """A plateau straddling the N-th place in every column: the lowest indices
  win, whether the kernel keeps a list of kept keys (n <= 8) or of dropped
  ones, and with K = 1 in both directions."""
  m = 16
  w = np.full((2 * m, 32), -2.0, np.float32)
  w[:, 1] = np.where(np.arange(2 * m) % 3 == 0, 5.0, 2.0)
  w[::2, 2] = 7.0
  got = np.asarray(nm_mask(jnp.asarray(w), NM(n, m), impl='kernel'))
  np.testing.assert_array_equal(got, nm_mask_reference(w, NM(n, m)))
  np.testing.assert_array_equal(got[:m, 0], np.arange(m) < n)


@pytest.mark.parametrize('n,m', [(6, 8), (13, 16), (61, 64), (8, 64)])
def test_kernel_caps_infinite_keys_before_the_write_pass(n, m):
  """Keys are capped at the largest finite value's bits (inf and NaN tie
  with it), but the selection and the first write pass compare uncapped
  magnitudes. Every column here has K magnitudes at most the cap (K - 1 of
  them the largest finite value, in rows that move with the column) and
  the rest inf or NaN, so the K-th key is the cap and a count of uncapped
  magnitudes would not see the ties with it; the second group has finite
  keys as well."""
  k = min(n, m - n)
  w = np.full((2 * m, 32), np.inf, np.float32)
  w[1::3, :] = -np.nan
  rng = np.random.default_rng(m + n)
  for j in range(32):
    rows = rng.permutation(m)[:k]
    w[rows[:-1], j] = np.finfo(np.float32).max * (-1) ** j
    w[rows[-1], j] = 0.5 + j
  w[m:] = np.where(rng.random((m, 32)) < 0.5, w[m:],
                   rng.normal(size=(m, 32)).astype(np.float32))
  got = np.asarray(nm_mask(jnp.asarray(w), NM(n, m), impl='kernel'))
  np.testing.assert_array_equal(got, nm_mask_reference(w, NM(n, m)))


@pytest.mark.parametrize('n,m,dtype', [(8, 128, jnp.float32),
                                        (120, 128, jnp.float32),
                                        (16, 96, jnp.bfloat16),
                                        (3, 80, jnp.float32)])
def test_kernel_phased_selection_equals_reference(n, m, dtype):
  """Groups of PHASE_FROM rows and more: the selection a phase of rows at a
  time over a block of strips, their lists kept in memory. At 8:128 and
  120:128 rows of two blocks, the second part full (1072 = 33 wide strips of
  32 float32 columns, 32 to a block, and one narrow strip); hard groups."""
  from pgf.sparsity import mask_kernel
  k = min(n, m - n)
  assert m >= mask_kernel.PHASE_FROM and 1 < k <= mask_kernel.PHASED_K
  shape = (2 * m, 1072)
  rng = np.random.default_rng(m + n)
  w = _ungroup(_hard_groups(rng, 2 * 1072, m), shape, 0)
  w = np.asarray(jnp.asarray(w.astype(np.float32), dtype))
  got = np.asarray(nm_mask(jnp.asarray(w), NM(n, m), impl='kernel'))
  np.testing.assert_array_equal(got, nm_mask_reference(w, NM(n, m)))


def test_kernel_large_kernel_runs_in_parallel_and_equals_reference():
  """A ViT-B FF kernel (768 x 3072: past PARALLEL_ELEMENTS, so the strips
  run on all cores) at the authors' 1:32 and an SdGf frame."""
  from pgf.sparsity import mask_kernel
  w = np.random.default_rng(3).normal(size=(768, 3072)).astype(np.float32)
  assert w.size >= mask_kernel.PARALLEL_ELEMENTS
  for nm in (NM(1, 32), NM(8, 64)):
    got = np.asarray(jax.jit(lambda w, nm=nm: nm_mask(w, nm, impl='kernel'))(
        w))
    np.testing.assert_array_equal(got, nm_mask_reference(w, nm))


@pytest.mark.skipif(sys.platform != 'linux' or platform.machine() != 'x86_64'
                    or bool(os.environ.get('NUMBA_THREADING_LAYER')),
                    reason='pgf installs tbb on Linux x86-64 (setup.py)')
def test_kernels_run_on_tbb_where_pgf_installs_it():
  """A fresh process runs the parallel mask kernel on TBB, whose caller
  works while the pool's threads wake, not on OpenMP's fork and join. (In a
  test worker the layer is the one the first parallel kernel of any earlier
  test chose: a whole-suite run once saw another there, cause not found.)"""
  code = (
      'import jax, numpy as np, numba\n'
      'from pgf.sparsity import NM, nm_mask\n'
      'w = np.random.default_rng(0).normal(size=(768, 3072))'
      '.astype(np.float32)\n'
      'jax.block_until_ready(jax.jit(lambda w: nm_mask(w, NM(1, 32), '
      'impl="kernel"))(w))\n'
      'print(numba.threading_layer())\n')
  out = subprocess.run([sys.executable, '-c', code], check=True,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True).stdout
  assert out.split() == ['tbb']


def test_kernel_under_vmap_grad_and_eager():
  rng = np.random.default_rng(4)
  ws = jnp.asarray(rng.normal(size=(3, 64, 32)), jnp.float32)
  nm = NM(2, 16)
  batched = jax.vmap(lambda w: nm_mask(w, nm, impl='kernel'))(ws)
  for w, got in zip(ws, batched):
    np.testing.assert_array_equal(got, nm_mask_reference(np.asarray(w), nm))
  eager = nm_mask(ws[0], nm, impl='kernel')
  np.testing.assert_array_equal(eager, batched[0])
  # No gradient flows through the selection: only the where's.
  loss = lambda w: jnp.sum(jnp.where(nm_mask(w, nm, impl='kernel'), w, 0) ** 2)
  grad = jax.jit(jax.grad(loss))(ws[0])
  np.testing.assert_array_equal(grad, 2 * jnp.where(batched[0], ws[0], 0))


def test_auto_takes_the_kernel_where_it_was_faster():
  """'auto' on this single-device process: the kernel for lists up to 32
  from 2^19 weights; below, at K >= 2 from 2^17 weights or for groups of
  128 and more; never past K = 32, for groups along the minor axis, inner
  lengths that are not a multiple of 16, or with 'xla'. Every choice gives
  the same mask (the tests above)."""
  assert len(jax.local_devices(backend='cpu')) == 1
  big = jax.ShapeDtypeStruct((1024, 512), jnp.float32)      # 2^19 weights
  small = jax.ShapeDtypeStruct((1024, 496), jnp.float32)
  smaller = jax.ShapeDtypeStruct((256, 496), jnp.float32)   # < 2^17
  cases = {
      ('big', '1:32'): (big, NM(1, 32), 0, None, 1),
      ('big', '31:32'): (big, NM(31, 32), 0, None, 1),
      ('big', '8:64'): (big, NM(8, 64), 0, None, 1),
      ('big', '16:32'): (big, NM(16, 32), 0, None, 1),
      ('big', '2:16'): (big, NM(2, 16), 0, None, 1),
      ('big', '1:16'): (big, NM(1, 16), 0, None, 1),
      ('big', '2:4'): (big, NM(2, 4), 0, None, 1),
      ('big', '8:16'): (big, NM(8, 16), 0, None, 1),
      ('big', '9:32'): (big, NM(9, 32), 0, None, 1),
      ('big', 'minor axis'): (big, NM(1, 32), 1, None, 0),
      ('big', 'K 32'): (big, NM(32, 64), 0, None, 1),
      ('big', 'K 64'): (big, NM(64, 128), 0, None, 0),
      ('big', 'xla'): (big, NM(1, 32), 0, 'xla', 0),
      ('small', '8:128'): (small, NM(8, 128), 0, None, 1),
      ('small', '8:64'): (small, NM(8, 64), 0, None, 1),
      ('small', '2:4'): (small, NM(2, 4), 0, None, 1),
      ('small', '1:16'): (small, NM(1, 16), 0, None, 0),
      ('small', '1:128'): (small, NM(1, 128), 0, None, 0),
      ('smaller', '8:64'): (smaller, NM(8, 64), 0, None, 0),
      ('smaller', '8:128'): (smaller, NM(8, 128), 0, None, 1),
      ('small', 'kernel'): (small, NM(2, 4), 0, 'kernel', 1),
      ('small', 'kernel K 16'): (small, NM(16, 32), 0, 'kernel', 1),
  }
  for what, (w, nm, axes, impl, want) in cases.items():
    fn = lambda w, nm=nm, axes=axes, impl=impl: nm_mask(w, nm, axes,
                                                        impl=impl)
    assert _kernel_calls(fn, w) == want, what
  odd = jax.ShapeDtypeStruct((2048, 520), jnp.float32)
  assert _kernel_calls(lambda w: nm_mask(w, NM(2, 16), impl='kernel'),
                       odd) == 0


def test_environment_switch_and_bad_values(monkeypatch):
  """Read when a function is traced (a fresh function each time here: jit
  caches what it traced)."""
  w = jnp.zeros((32, 16), jnp.float32)
  monkeypatch.setenv('PGF_MASK_KERNEL', 'kernel')
  assert _kernel_calls(lambda w: nm_mask(w, NM(1, 16)), w) == 1
  monkeypatch.setenv('PGF_MASK_KERNEL', 'xla')
  assert _kernel_calls(lambda w: nm_mask(w, NM(1, 16)), w) == 0
  monkeypatch.setenv('PGF_MASK_KERNEL', 'on')
  with pytest.raises(ValueError, match=r"PGF_MASK_KERNEL='on' is not one of "
                     r"\('auto', 'xla', 'kernel'\)"):
    nm_mask(w, NM(1, 16))
  monkeypatch.delenv('PGF_MASK_KERNEL')
  with pytest.raises(ValueError, match=r"impl='cpu' is not one of"):
    nm_mask(w, NM(1, 16), impl='cpu')
  assert masks.IMPLS == ('auto', 'xla', 'kernel')


def test_auto_keeps_xla_where_a_mesh_can_shard_the_kernel():
  """With several CPU devices a jitted step may shard the kernel, and XLA
  would gather it for a custom call: 'auto' stays with XLA ops there."""
  code = (
      'import jax, jax.numpy as jnp\n'
      'from pgf.sparsity import NM, nm_mask\n'
      'w = jnp.zeros((256, 16))\n'
      'for impl in ("auto", "kernel"):\n'
      '  text = jax.jit(lambda w: nm_mask(w, NM(8, 128), impl=impl))'
      '.lower(w).as_text()\n'
      '  print(impl, text.count("pgf_nm_mask_"))\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.split('\n')[:2] == ['auto 0', 'kernel 1']


_DENORMAL_CODE = """
import os
import jax, jax.numpy as jnp, numpy as np
from pgf.sparsity import NM, core
rng = np.random.default_rng(0)
w = rng.normal(size=(64, 32)).astype(np.float32)
# Columns 0-15: groups of two denormals and two zeros (the denormals kept).
w[::2, :16] = rng.choice([1e-40, -1e-39, 3e-45, -1e-45], size=(32, 16))
w[1::2, :16] = rng.choice([0.0, -0.0], size=(32, 16))
w = jnp.asarray(w)
x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
out = {}
for impl in ('kernel', 'xla'):
  os.environ['PGF_MASK_KERNEL'] = impl
  for alpha in (0.0, 0.37):
    w_eff, bits = jax.jit(lambda w, a: core.kernel_and_bits(
        w, NM(2, 4), (0,), a))(w, alpha)
    back = jax.jit(core.kernel_from_bits)(w, bits, jnp.float32(alpha))
    eff, mask = jax.jit(lambda w, a: core.effective_kernel(
        w, NM(2, 4), (0,), alpha=a))(w, alpha)
    grad = jax.jit(jax.grad(lambda w, a: jnp.sum(jnp.dot(
        x, core.effective_kernel(w, NM(2, 4), (0,), alpha=a)[0]) ** 2)))(
            w, alpha)
    out[impl, alpha] = [np.asarray(a).view(np.uint32) if a.dtype == np.float32
                        else np.asarray(a) for a in (w_eff, bits, back, eff,
                                                     mask, grad)]
    kept = np.asarray(mask) & (np.abs(np.asarray(w)) < 1e-37)
    assert kept.sum() > 100, kept.sum()
    for a in (w_eff, back, eff):
      assert (np.asarray(a)[kept].view(np.uint32)
              == np.asarray(w)[kept].view(np.uint32)).all(), (impl, alpha)
for alpha in (0.0, 0.37):
  for a, b in zip(out['kernel', alpha], out['xla', alpha]):
    assert (a == b).all(), alpha
print('ok')
"""


def test_kept_denormal_weights_stay_with_avx2_code():
  """XLA:CPU runs with denormals flushed to zero; where its code multiplies
  kept weights by 1 (AVX2, --xla_cpu_max_isa=AVX2, as on CPUs without
  AVX-512) a denormal weight would become 0. w_eff on both routes, from
  the bits and through effective_kernel keeps every kept weight bit for
  bit, and the kernel and XLA routes (effective_kernel's gradient
  included) agree. (`sparse_product`'s XLA route still flushes them in
  `core._after`'s tie under such code.)"""
  env = dict(os.environ, XLA_FLAGS='--xla_cpu_max_isa=AVX2',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _DENORMAL_CODE], env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr


def test_kernel_route_keeps_the_step_memory_of_the_xla_route(monkeypatch):
  """On the kernel route the forward pass's w_eff and bits come from the
  fused kernel (no bool mask at all); the recomputing step needs dense's
  temporary memory plus the masks' bits, as with XLA's route
  (tests/test_layers_transforms.py), and the step does call the kernel."""
  from test_layers_transforms import _step_temp_mib

  from pgf import sparsity as sp
  kernel = 1024 * 1024 * 4 / 2**20
  rule = sp.LayerRule('g', '^l', NM(4, 32), 'in')   # 2^20 weights each
  plan = sp.SparsityPlan((rule,), recompute=True)
  dense = _step_temp_mib(None)
  mib = {}
  for impl in ('kernel', 'xla'):
    monkeypatch.setenv('PGF_MASK_KERNEL', impl)
    mib[impl], text = _step_temp_mib(plan, hlo=True)
    calls = text.count('pgf_nm_fused_')
    assert calls >= 8 if impl == 'kernel' else calls == 0, (impl, calls)
  assert mib['kernel'] - dense <= 1.25 * 8 * kernel / 32, (dense, mib)
  assert mib['kernel'] <= mib['xla'] + 0.01, mib


# -- w_eff and bits in one kernel (core.kernel_and_bits) ----------------------

# name -> (group axes, shape for M): 'rows' bits (the kernel's first axis is
# its only group axis; words of 32 rows hold whole groups) and 'cols' bits
# (packed along the last axis, outside the group axes).
FUSED_LAYOUTS = {
    'dense_rows': (0, lambda m: (2 * max(m, 32), 144)),
    'qkv_rows': (0, lambda m: (max(m, 32), 2, 32)),
    'out_cols': ((0, 1), lambda m: (2, m, 160)),
    'conv_cols': (1, lambda m: (3, m, 32)),
}


def _both_routes(w, nm, axes, alpha, monkeypatch):
  """kernel_and_bits on the fused kernel ('kernel') and on XLA's route, with
  the number of fused calls in the first."""
  from pgf.sparsity import core
  out, calls = {}, {}
  for impl in ('kernel', 'xla'):
    monkeypatch.setenv('PGF_MASK_KERNEL', impl)
    fn = lambda w, a: core.kernel_and_bits(w, nm, axes, a)
    calls[impl] = jax.jit(fn).lower(w, alpha).as_text().count('pgf_nm_fused')
    out[impl] = [np.asarray(x) for x in jax.jit(fn)(w, alpha)]
  return out['kernel'], out['xla'], calls['kernel']


def _same_bits(a, b):
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
      a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


@pytest.mark.parametrize('n,m', [p for p in PATTERNS if p[1] in (4, 8, 16, 32,
                                                                64, 128, 256)],
                         ids=lambda v: str(v))
def test_fused_kernel_equals_xla_route(n, m, monkeypatch):
  """w_eff (to the bit, NaN payloads included) and the packed bits equal
  XLA's route (mask, pack_mask, kernel_from_bits) on hard groups, in both
  packings, with alpha 0 (hard mask) and MdGf's alpha."""
  nm = NM(n, m)
  for i, (layout, (axes, shape_fn)) in enumerate(FUSED_LAYOUTS.items()):
    shape = shape_fn(m)
    rng = np.random.default_rng(7000 * m + 10 * n + i)
    groups = _hard_groups(rng, int(np.prod(shape)) // m, m)
    w = jnp.asarray(_ungroup(groups, shape, axes).astype(np.float32))
    for alpha in (0.0, 0.37):
      what = f'{n}:{m} {layout} {shape} alpha {alpha}'
      got, want, calls = _both_routes(w, nm, axes, jnp.float32(alpha),
                                      monkeypatch)
      assert calls == 1, what
      assert _same_bits(got[0], want[0]), what
      assert _same_bits(got[1], want[1]), what


def test_fused_kernel_large_parallel_vmapped_and_grad(monkeypatch):
  """A T5-Base FF kernel (parallel strips) at 1:32 and 8:64; a stack of
  kernels under vmap, each with its own alpha; and sparse_product's
  gradients, equal to XLA's route bit for bit."""
  from pgf.sparsity import core
  from pgf.sparsity import mask_kernel
  rng = np.random.default_rng(11)
  w = jnp.asarray(rng.normal(size=(2048, 768)), jnp.float32)
  assert w.size >= mask_kernel.PARALLEL_ELEMENTS
  for nm in (NM(1, 32), NM(8, 64)):
    got, want, calls = _both_routes(w, nm, (0,), jnp.float32(0.5),
                                    monkeypatch)
    assert calls == 1 and all(map(_same_bits, got, want)), nm
  stack = jnp.asarray(rng.normal(size=(3, 64, 48)), jnp.float32)
  alphas = jnp.asarray([0.0, 0.25, 0.5], jnp.float32)
  out = {}
  for impl in ('kernel', 'xla'):
    monkeypatch.setenv('PGF_MASK_KERNEL', impl)
    out[impl] = jax.jit(jax.vmap(lambda w, a: core.kernel_and_bits(
        w, NM(2, 16), (0,), a)))(stack, alphas)
  assert all(_same_bits(np.asarray(a), np.asarray(b))
             for a, b in zip(out['kernel'], out['xla']))

  x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(256, 96)), jnp.float32)

  def loss(x, w):
    y = core.sparse_product(lambda x, w: x @ w, x, w, NM(1, 16), (0,),
                            alpha=0.2)
    return jnp.sum(jnp.sin(y))

  grads = {}
  for impl in ('kernel', 'xla'):
    monkeypatch.setenv('PGF_MASK_KERNEL', impl)
    fn = jax.grad(loss, argnums=(0, 1))
    text = jax.jit(fn).lower(x, w).as_text()
    assert text.count('pgf_nm_fused') == (impl == 'kernel'), impl
    grads[impl] = jax.jit(fn)(x, w)
  for a, b in zip(grads['kernel'], grads['xla']):
    assert _same_bits(np.asarray(a), np.asarray(b))


def test_auto_takes_the_fused_kernel_where_it_applies(monkeypatch):
  """'auto' on this single-device process: float32 kernels with K up to 32
  whose bits pack along rows of whole groups or along columns; XLA's route
  for bfloat16, K over the kernel's 32, N = M, groups along the minor axis,
  words that would split groups (M = 48), an odd number of rows, and under
  'xla'. SR-STE's refill: the kernel up to K = 8 (past it the kernel was
  not faster)."""
  from pgf.sparsity import core
  monkeypatch.delenv('PGF_MASK_KERNEL', raising=False)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  cases = {
      '1:32 rows': (f32(768, 2048), NM(1, 32), (0,), 1),
      '2:4 rows': (f32(64, 32), NM(2, 4), (0,), 1),
      '8:64 cols': (f32(12, 64, 768), NM(8, 64), (0, 1), 1),
      'bfloat16': (jax.ShapeDtypeStruct((64, 32), jnp.bfloat16), NM(2, 4),
                   (0,), 0),
      'K 16': (f32(64, 32), NM(16, 32), (0,), 1),
      'K 32': (f32(128, 32), NM(32, 64), (0,), 1),
      'K 64': (f32(256, 32), NM(64, 128), (0,), 0),
      'N = M': (f32(64, 32), NM(4, 4), (0,), 0),
      'minor axis': (f32(64, 32), NM(1, 16), (1,), 0),
      'M 48': (f32(96, 32), NM(3, 48), (0,), 0),
      'rows 80': (f32(80, 48), NM(1, 16), (0,), 0),
  }
  for what, (w, nm, axes, want) in cases.items():
    fn = lambda w, nm=nm, axes=axes: core.kernel_and_bits(w, nm, axes, 0.0)
    assert _fused_calls(fn, w) == want, what
  refill = lambda nm: (lambda g, w: core.srste_gradient(g, w, nm, (0,), 2e-4))
  gw = (f32(128, 32), f32(128, 32))
  for nm, want in ((NM(8, 64), 1), (NM(16, 32), 0), (NM(32, 64), 0)):
    assert _refill_calls(refill(nm), *gw) == want, nm
  monkeypatch.setenv('PGF_MASK_KERNEL', 'kernel')
  assert _refill_calls(refill(NM(16, 32)), *gw) == 1
  monkeypatch.setenv('PGF_MASK_KERNEL', 'xla')
  assert _fused_calls(lambda w: core.kernel_and_bits(w, NM(1, 32), (0,), 0.0),
                      f32(768, 2048)) == 0


def _fused_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count('pgf_nm_fused')


def _refill_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count('pgf_nm_refill')


@pytest.mark.parametrize('n,m', [(1, 4), (2, 4), (6, 8), (1, 16), (8, 16),
                                 (1, 32), (4, 32), (16, 32), (31, 32), (8, 64),
                                 (32, 64), (8, 128)], ids=lambda v: str(v))
def test_srste_kernel_equals_xla_route(n, m, monkeypatch):
  """SR-STE's gradient g + lambda (1 - m) w from one CPU kernel equals XLA's
  route to the bit on hard groups of w and gradients with -0, NaN and inf
  (g + 0 makes -0 into +0 where the mask keeps a weight), under both
  kernel layouts of the tests above."""
  from pgf.sparsity import core
  nm = NM(n, m)
  for i, layout in enumerate(('dense_rows', 'out_cols')):
    axes, shape_fn = FUSED_LAYOUTS[layout]
    shape = shape_fn(m)
    rng = np.random.default_rng(9000 * m + 10 * n + i)
    groups = _hard_groups(rng, int(np.prod(shape)) // m, m)
    w = jnp.asarray(_ungroup(groups, shape, axes).astype(np.float32))
    g = rng.normal(size=shape).astype(np.float32)
    g.reshape(-1)[::3] = -0.0
    g.reshape(-1)[7:12] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
    got = {}
    for impl in ('kernel', 'xla'):
      monkeypatch.setenv('PGF_MASK_KERNEL', impl)
      fn = lambda g, w, axes=axes: core.srste_gradient(g, w, nm, axes, 2e-4)
      calls = _refill_calls(fn, g, w)
      assert calls == (impl == 'kernel'), (impl, layout)
      got[impl] = np.asarray(jax.jit(fn)(g, w))
    assert _same_bits(got['kernel'], got['xla']), (n, m, layout)


@pytest.mark.parametrize('n,m', [(1, 4), (2, 4), (8, 16), (4, 32), (8, 64),
                                 (31, 32)], ids=lambda v: str(v))
def test_srste_kernel_writes_over_a_donated_gradient(n, m, monkeypatch):
  """Top K (N <= M - N) writes the refilled gradient over g's buffer, with
  the tie rule in its one write pass: on hard groups (ties at the K-th key
  in most columns) a donated g gives XLA's route's bits. Bottom K (31:32)
  writes a new array."""
  from pgf.sparsity import core
  nm = NM(n, m)
  axes, shape_fn = FUSED_LAYOUTS['dense_rows']
  shape = shape_fn(m)
  rng = np.random.default_rng(70 * m + n)
  groups = _hard_groups(rng, int(np.prod(shape)) // m, m)
  w = jnp.asarray(_ungroup(groups, shape, axes).astype(np.float32))
  g = rng.normal(size=shape).astype(np.float32)
  g.reshape(-1)[::3] = -0.0
  # A function per route: jit's trace cache would give the second the
  # first's trace.
  route = lambda: (lambda g, w: core.srste_gradient(g, w, nm, axes, 2e-4))
  monkeypatch.setenv('PGF_MASK_KERNEL', 'xla')
  want = np.asarray(jax.jit(route())(g, w))
  monkeypatch.setenv('PGF_MASK_KERNEL', 'kernel')
  donated = jax.jit(route(), donate_argnums=0)
  text = donated.lower(g, w).compile().as_text()
  call = next(line for line in text.splitlines() if 'pgf_nm_refill' in line)
  assert ('output_to_operand_aliasing' in call) == (n <= m - n), call
  assert _same_bits(np.asarray(donated(jnp.asarray(g), w)), want), (n, m)


def test_srste_kernel_waits_for_after_instead_of_copying(monkeypatch):
  """A gradient read twice (the refill, a norm) gets copied before the
  refill writes over it, unless the norm is passed as `after`: then XLA
  computes it first and the kernel writes over the gradient itself."""
  from pgf.sparsity import core
  monkeypatch.setenv('PGF_MASK_KERNEL', 'kernel')
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 144)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 144)), jnp.float32)

  def fn(wait):
    def step(x, y, w):
      g = x.T @ y                               # A dot: no copy fuses in.
      norm = jnp.sqrt(jnp.sum(g * g))
      new = core.srste_gradient(g, w, NM(1, 4), (0,), 2e-4,
                                after=norm if wait else None)
      return new, norm
    return step

  got = {}
  for wait in (False, True):
    text = jax.jit(fn(wait)).lower(x, y, w).compile().as_text()
    line = next(t for t in text.splitlines() if 'pgf_nm_refill' in t)
    operand = line.split('custom-call(')[1].split(', ')[1]
    assert operand.startswith('%copy') != wait, (wait, operand)
    got[wait] = jax.jit(fn(wait))(x, y, w)
  for a, b in zip(got[False], got[True]):
    assert _same_bits(np.asarray(a), np.asarray(b))


def test_effective_kernel_takes_the_fused_kernel(monkeypatch):
  """effective_kernel (recompute off, the Sparsifier) gets w_eff from the
  fused kernel: the same value and straight-through gradients as XLA's
  route, and no mask is computed when the caller drops it."""
  from pgf.sparsity import core
  rng = np.random.default_rng(12)
  w = jnp.asarray(rng.normal(size=(256, 96)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)

  def loss(x, w, alpha):
    w_eff, _ = core.effective_kernel(w, NM(2, 16), (0,), alpha=alpha)
    return jnp.sum(jnp.sin(x @ w_eff))

  out = {}
  for impl in ('kernel', 'xla'):
    monkeypatch.setenv('PGF_MASK_KERNEL', impl)
    fn = jax.value_and_grad(loss, argnums=(0, 1))
    text = jax.jit(fn).lower(x, w, 0.3).compile().as_text()
    assert text.count('pgf_nm_fused') == (impl == 'kernel'), impl
    assert text.count('pgf_nm_mask') == 0, impl
    out[impl] = jax.jit(fn)(x, w, 0.3)
  for a, b in zip(jax.tree.leaves(out['kernel']), jax.tree.leaves(out['xla'])):
    assert _same_bits(np.asarray(a), np.asarray(b))


def test_variants_with_other_constants_get_other_names(monkeypatch):
  """numba's disk cache keys a function by its name and bytecode, not by the
  constants formatted into it: a variant compiled with another prefetch
  distance (experiments/bench/ff_passes.py --no_prefetch) or strip width
  must not be cached under the default's name."""
  from pgf.sparsity import mask_kernel
  names = {mask_kernel._tag(8), mask_kernel._tag(1)}
  monkeypatch.setattr(mask_kernel, 'PREFETCH_AHEAD', 1 << 40)
  assert not names & {mask_kernel._tag(8), mask_kernel._tag(1)}
  assert len(names) == 2          # K = 1 and K = 8 strips differ in width.
