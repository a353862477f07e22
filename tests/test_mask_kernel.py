"""Tests of the CPU N:M mask kernel (pgf.sparsity.mask_kernel) and of how
`nm_mask` chooses it: bit-equal to the NumPy reference (which the XLA
formulation equals: tests/test_masks.py) on hard groups (ties, zeros,
denormals, inf, NaN), every pattern family and dtype, leading axes, vmap,
jit, grad; and the choice itself.
"""

import os
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

# K = min(N, M - N) = 1 (both directions), lists of 2-16 kept or dropped
# keys, M from 4 to 256 (the kernel reads M at run time).
PATTERNS = [(1, 4), (3, 4), (2, 4), (1, 8), (7, 8), (4, 8), (1, 16),
            (15, 16), (2, 16), (8, 16), (1, 32), (31, 32), (4, 32), (16, 32),
            (8, 64), (61, 64), (1, 128), (8, 128), (8, 256), (3, 48)]

# name -> (group axes, shape for M): inner lengths 48 (a strip of 32 and one
# of 16), 32 and 16, groups across leading axes and straddling heads.
LAYOUTS = {
    'dense_in': (0, lambda m: (2 * m, 48)),
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
  """'auto' on this single-device process: the kernel for groups of 32 and
  more with lists up to 8, from 2^20 weights; below, only for groups of 128
  and more at K >= 2; never for M <= 16, groups along the minor axis, inner
  lengths that are not a multiple of 16, or with 'xla'. Every choice gives
  the same mask (the tests above)."""
  assert len(jax.local_devices(backend='cpu')) == 1
  big = jax.ShapeDtypeStruct((2048, 512), jnp.float32)      # 2^20 weights
  small = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
  cases = {
      ('big', '1:32'): (big, NM(1, 32), 0, None, 1),
      ('big', '31:32'): (big, NM(31, 32), 0, None, 1),
      ('big', '8:64'): (big, NM(8, 64), 0, None, 1),
      ('big', '16:32'): (big, NM(16, 32), 0, None, 0),
      ('big', '2:16'): (big, NM(2, 16), 0, None, 0),
      ('big', '1:16'): (big, NM(1, 16), 0, None, 0),
      ('big', '2:4'): (big, NM(2, 4), 0, None, 0),
      ('big', 'minor axis'): (big, NM(1, 32), 1, None, 0),
      ('big', 'K 32'): (big, NM(32, 64), 0, None, 0),
      ('big', 'xla'): (big, NM(1, 32), 0, 'xla', 0),
      ('small', '8:128'): (small, NM(8, 128), 0, None, 1),
      ('small', '8:64'): (small, NM(8, 64), 0, None, 0),
      ('small', '1:128'): (small, NM(1, 128), 0, None, 0),
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


def test_kernel_route_keeps_the_step_memory_of_the_xla_route(monkeypatch):
  """The kernel writes a bool mask (1 MiB per layer here) where a mask of
  XLA ops may fuse into the packing of its bits; it lives only while that
  layer's bits are made, so the recomputing step needs dense's temporary
  memory plus the masks' bits, as with XLA's mask
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
    calls = text.count('pgf_nm_mask_')
    assert calls >= 8 if impl == 'kernel' else calls == 0, (impl, calls)
  assert mib['kernel'] - dense <= 1.25 * 8 * kernel / 32, (dense, mib)
