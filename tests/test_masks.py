"""Tests of pgf.sparsity.masks: N:M masks, their reference, errors, verify_nm.

Tie rule (documented in masks.py): among weights of equal magnitude inside a
group, the one with the lower index (row-major over the group axes) is kept.
"""

import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgf.sparsity import NM
from pgf.sparsity import nm_mask
from pgf.sparsity import nm_mask_reference
from pgf.sparsity import verify_nm

PATTERNS = [(2, 4), (1, 4), (3, 4), (1, 8), (1, 16), (15, 16), (1, 32),
            (1, 128), (8, 64), (4, 32), (4, 4), (16, 16)]

# name -> (group axes, function (rng, m) -> random kernel shape).
FORMS = {
    'dense_in': (0, lambda r, m: (m * _k(r), _k(r, 5))),
    'dense_out': (1, lambda r, m: (_k(r, 5), m * _k(r))),
    'qkv_embed': (0, lambda r, m: (m * _k(r), _k(r, 3), _k(r, 4))),
    'qkv_heads': ((1, 2), lambda r, m: _heads_shape(r, m, front=_k(r, 3))),
    'out_heads': ((0, 1), lambda r, m: _heads_shape(r, m, back=_k(r, 3))),
    'out_embed': (2, lambda r, m: (_k(r, 3), _k(r, 3), m * _k(r))),
    'conv_cin': (2, lambda r, m: (_k(r, 3), _k(r, 3), m * _k(r), _k(r, 3))),
}


def _k(rng, hi=3):
  return int(rng.integers(1, hi + 1))


def _heads_shape(rng, m, front=None, back=None):
  """(heads, head_dim) with heads * head_dim divisible by m; groups may
  straddle heads."""
  heads = int(rng.integers(1, 5))
  head_dim = m // math.gcd(m, heads) * _k(rng, 2)
  shape = (heads, head_dim)
  return ((front,) if front else ()) + shape + ((back,) if back else ())


def _groups(x, axes, m):
  """(num_groups, m) view of x: the group axes flattened in row-major order,
  moved last and cut into consecutive runs of m (written independently of
  masks.py's reshape)."""
  x = np.asarray(x)
  axes = (axes,) if isinstance(axes, int) else tuple(a % x.ndim for a in axes)
  perm = [a for a in range(x.ndim) if a not in axes] + list(axes)
  return np.transpose(x, perm).reshape(-1, m)


@pytest.mark.parametrize('n,m', PATTERNS, ids=lambda v: str(v))
def test_mask_matches_reference_random_shapes(n, m):
  """Every axis form, a random shape each, twice: Gaussian weights and small
  signed integers (many ties and zeros). One jit per pattern keeps it fast."""
  rng = np.random.default_rng(zlib.crc32(f'{n}:{m}'.encode()))
  nm = NM(n, m)
  cases = []
  for form in sorted(FORMS):
    axes, shape_fn = FORMS[form]
    shape = shape_fn(rng, m)
    cases.append((form, axes, rng.normal(size=shape).astype(np.float32)))
    cases.append((form, axes, rng.integers(-2, 3, size=shape).astype(
        np.float32)))
  masks = jax.jit(lambda ws: [nm_mask(w, nm, axes) for (_, axes, _), w
                              in zip(cases, ws)])([w for *_, w in cases])
  for (form, axes, w), mask in zip(cases, masks):
    mask = np.asarray(mask)
    ref = nm_mask_reference(w, nm, axes)
    assert mask.dtype == bool and mask.shape == w.shape
    np.testing.assert_array_equal(mask, ref, err_msg=f'{form} {w.shape}')
    keep = _groups(mask, axes, m)
    assert (keep.sum(axis=1) == n).all(), (form, w.shape)
    # The kept weights dominate the pruned ones in every group.
    mag = _groups(np.abs(w), axes, m)
    if n < m:
      kept_min = np.where(keep, mag, np.inf).min(axis=1)
      pruned_max = np.where(keep, -np.inf, mag).max(axis=1)
      assert (kept_min >= pruned_max).all(), (form, w.shape)


def test_mask_jit_and_negative_axes_agree():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 4, 8, 5)), jnp.float32)
  nm = NM(2, 8)
  eager = nm_mask(w, nm, 2)
  jitted = jax.jit(lambda w: nm_mask(w, nm, -2))(w)
  np.testing.assert_array_equal(eager, jitted)
  w2 = jnp.asarray(rng.normal(size=(6, 4, 4)), jnp.float32)
  np.testing.assert_array_equal(nm_mask(w2, NM(1, 8), (1, 2)),
                                nm_mask(w2, NM(1, 8), (-2, -1)))


def test_mask_does_not_change_grad_and_is_bool():
  w = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)), jnp.float32)
  grad = jax.grad(lambda w: jnp.sum(w * nm_mask(w, NM(1, 4))))(w)
  np.testing.assert_array_equal(grad, nm_mask(w, NM(1, 4)))


def test_hand_computed_groups_dense_in():
  # Dense (in=8, out=2), groups of 4 along 'in'; column 0 then column 1.
  w = np.array([[0.1, -5.0],
                [-0.9, 1.0],
                [0.5, 1.0],
                [0.3, -1.0],
                [2.0, 0.0],
                [-2.0, 0.0],
                [1.0, 0.0],
                [0.0, 0.0]], np.float32)
  got = np.asarray(nm_mask(jnp.asarray(w), NM(2, 4), 0))
  want = np.array([[0, 1],
                   [1, 1],   # column 1: 1.0, 1.0, -1.0 tie: lower index kept
                   [1, 0],
                   [0, 0],
                   [1, 1],   # +-2.0 tie in column 0: both kept (N=2)
                   [1, 1],   # column 1 all zeros: lowest two indices kept
                   [0, 0],
                   [0, 0]], bool)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('n', [1, 2, 3])
def test_ties_keep_lower_index(n):
  # Equal magnitudes (with both signs) in one group of 4: keep indices < n.
  w = np.array([-1.0, 1.0, -1.0, 1.0], np.float32)[:, None]
  got = np.asarray(nm_mask(jnp.asarray(w), NM(n, 4), 0))[:, 0]
  np.testing.assert_array_equal(got, np.arange(4) < n)
  # A larger weight at the end wins; the remaining ties go low-index first.
  w = np.array([3.0, 3.0, 3.0, -7.0], np.float32)[:, None]
  got = np.asarray(nm_mask(jnp.asarray(w), NM(n, 4), 0))[:, 0]
  np.testing.assert_array_equal(got, [n >= 2, n >= 3, False, True])


@pytest.mark.parametrize('n,m', [(1, 16), (15, 16), (13, 16), (5, 8)])
def test_zeros_and_infinities_still_keep_exactly_n(n, m):
  zeros = jnp.zeros((m, 3), jnp.float32)
  mask = np.asarray(nm_mask(zeros, NM(n, m), 0))
  np.testing.assert_array_equal(mask, np.repeat((np.arange(m) < n)[:, None],
                                                3, axis=1))
  # A diverged kernel: inf weights must not be picked twice.
  rng = np.random.default_rng(n * m)
  w = rng.normal(size=(m, 4)).astype(np.float32)
  w[rng.random(w.shape) < 0.7] = np.inf
  w[:, 0] = -np.inf
  mask = np.asarray(nm_mask(jnp.asarray(w), NM(n, m), 0))
  assert (mask.sum(axis=0) == n).all()
  np.testing.assert_array_equal(mask, nm_mask_reference(w, NM(n, m), 0))


def test_negative_values_use_magnitude():
  w = np.array([[-4.0], [1.0], [3.0], [-0.5]], np.float32)
  np.testing.assert_array_equal(
      np.asarray(nm_mask(jnp.asarray(w), NM(1, 4)))[:, 0],
      [True, False, False, False])
  np.testing.assert_array_equal(
      np.asarray(nm_mask(jnp.asarray(w), NM(2, 4)))[:, 0],
      [True, False, True, False])


def test_bfloat16_kernel():
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
  np.testing.assert_array_equal(
      nm_mask(w, NM(2, 8), 0),
      nm_mask_reference(np.asarray(w.astype(jnp.float32)), NM(2, 8), 0))


# -- errors -------------------------------------------------------------------


def test_indivisible_length_names_layer_shape_and_m():
  w = jnp.zeros((12, 5))
  with pytest.raises(ValueError, match=re.escape(
      'mlp/wi/kernel: shape (12, 5) has group length 12')) as e:
    nm_mask(w, NM(1, 8), 0, name='mlp/wi/kernel')
  assert 'M=8' in str(e.value)
  # Output proj (heads=3, head_dim=4, embed): 12 is not divisible by 8.
  with pytest.raises(ValueError, match=r'attn/out/kernel: shape \(3, 4, 16\)'
                     r'.*not divisible by M=8'):
    nm_mask(jnp.zeros((3, 4, 16)), NM(2, 8), (0, 1), name='attn/out/kernel')
  with pytest.raises(ValueError, match=r'not divisible by M=32'):
    nm_mask_reference(np.zeros((16, 2)), NM(1, 32), 0)


@pytest.mark.parametrize('n,m,shown', [(5, 4, '5:4'), (0, 4, '0:4'),
                                       (-1, 4, '-1:4'), (1, 0, '1:0'),
                                       (0, 0, '0:0'), (1, -2, '1:-2')])
def test_invalid_pattern(n, m, shown):
  with pytest.raises(ValueError, match=re.escape(f'Invalid N:M pattern {shown}'
                                                 ': need 1 <= N <= M')):
    NM(n, m)


def test_non_integer_pattern():
  with pytest.raises(ValueError, match=re.escape('got 1.5:4')):
    NM(1.5, 4)


@pytest.mark.parametrize('axes,ndim,bad', [(2, 2, 2), (-3, 2, -3), (5, 4, 5),
                                           ((0, 3), 3, 3)])
def test_axis_that_does_not_exist(axes, ndim, bad):
  w = jnp.zeros((4,) * ndim)
  with pytest.raises(ValueError, match=re.escape(
      f'qkv: group axis {bad} does not exist for a rank-{ndim} kernel')):
    nm_mask(w, NM(1, 4), axes, name='qkv')


@pytest.mark.parametrize('axes', [(0, 2), (2, 0), (0, 0)])
def test_non_contiguous_axes(axes):
  with pytest.raises(ValueError, match=re.escape(
      f'k: group axes {axes} must be contiguous')):
    nm_mask(jnp.zeros((4, 4, 4)), NM(1, 4), axes, name='k')


def test_empty_axes():
  with pytest.raises(ValueError, match='k: group axes must not be empty'):
    nm_mask(jnp.zeros((4, 4)), NM(1, 4), (), name='k')


# -- NM.parse -----------------------------------------------------------------


def test_nm_parse_and_properties():
  assert NM.parse('1:16') == NM(1, 16)
  assert NM.parse(' 2 : 4 ') == NM(2, 4)
  assert str(NM(1, 32)) == '1:32'
  assert NM(1, 16).density == 1 / 16
  assert 1 - NM(1, 32).density == pytest.approx(0.96875)
  for text in ('1/16', '1:', 'a:b', '1:2:3', '-1:4', ''):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
      NM.parse(text)
  with pytest.raises(ValueError, match='Invalid N:M pattern 5:4'):
    NM.parse('5:4')


# -- verify_nm ----------------------------------------------------------------


def test_verify_nm_exact_density_and_violation():
  rng = np.random.default_rng(7)
  fc = rng.normal(size=(32, 6)).astype(np.float32)
  qkv = rng.normal(size=(8, 4, 8)).astype(np.float32)
  out = rng.normal(size=(4, 8, 16)).astype(np.float32)
  pats = {'fc/kernel': (NM(1, 16), (0,)),
          'q/kernel': (NM(2, 8), (1, 2)),
          'o/kernel': (NM(1, 4), (0, 1))}
  kernels = {'fc/kernel': fc, 'q/kernel': qkv, 'o/kernel': out,
             'unrelated/kernel': np.ones((3, 3))}
  hard = {}
  for path, (nm, axes) in pats.items():
    hard[path] = np.where(nm_mask_reference(kernels[path], nm, axes),
                          kernels[path], 0)
  reports = verify_nm(hard, pats)
  assert set(reports) == set(pats)
  for path, (nm, _) in pats.items():
    r = reports[path]
    assert r.is_nm and r.max_nonzeros == nm.n and r.nm == nm
    assert r.density == pytest.approx(nm.density)
    assert r.shape == kernels[path].shape and r.path == path
  # One extra non-zero in a single group of the output projection.
  bad = dict(hard)
  bad['o/kernel'] = hard['o/kernel'].copy()
  group = bad['o/kernel'][:, :, 5].reshape(-1)[:4]
  assert np.count_nonzero(group) == 1
  bad['o/kernel'][0, :4, 5] = 1.0   # the first group of column 5
  reports = verify_nm(bad, pats)
  assert not reports['o/kernel'].is_nm
  assert reports['o/kernel'].max_nonzeros == 4
  assert reports['o/kernel'].density == pytest.approx(
      np.count_nonzero(bad['o/kernel']) / bad['o/kernel'].size)
  assert reports['fc/kernel'].is_nm and reports['q/kernel'].is_nm
  # The dense kernel is not N:M; an all-zero kernel is (at most N).
  assert not verify_nm(kernels, pats)['fc/kernel'].is_nm
  zero = verify_nm({'z': np.zeros((8, 2))}, {'z': (NM(1, 8), 0)})['z']
  assert zero.is_nm and zero.density == 0 and zero.max_nonzeros == 0


def test_verify_nm_errors():
  with pytest.raises(ValueError, match=re.escape("no kernel at 'a/kernel'")):
    verify_nm({}, {'a/kernel': (NM(1, 4), 0)})
  with pytest.raises(ValueError, match=r'b/kernel: shape \(6, 2\).*M=4'):
    verify_nm({'b/kernel': np.ones((6, 2))}, {'b/kernel': (NM(1, 4), 0)})
