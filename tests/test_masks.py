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
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  axes = tuple(sorted(a % x.ndim for a in axes))
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


# -- every pattern, every group layout, hard inputs ----------------------------

# The targets and the SdGf frames of the recipes (stepwise: (M-1):M, M/2:M,
# M/4:M, ...; geometric: 8N:8M, 4N:4M, 2N:2M) with M up to 256, plus patterns
# that exercise the odd corners (M not a power of two, words and chunks that
# are only partly used, the sort path for long lists in wide groups).
ALL_PATTERNS = [
    (1, 2), (1, 3), (2, 3), (2, 4), (1, 4), (3, 4), (1, 8), (2, 8), (3, 8),
    (4, 8), (5, 8), (7, 8), (1, 16), (2, 16), (4, 16), (8, 16), (15, 16),
    (2, 6), (5, 12), (1, 32), (2, 32), (4, 32), (8, 32), (16, 32), (31, 32),
    (3, 48), (1, 48), (1, 64), (2, 64), (4, 64), (8, 64), (32, 64), (63, 64),
    (4, 96), (1, 128), (8, 128), (16, 128), (64, 128), (127, 128), (3, 192),
    (1, 256), (8, 256), (16, 256),
]

# name -> (group axes, shape for M): every way a pgf layer groups its kernel.
LAYOUTS = {
    'dense_in': (0, lambda m: (2 * m, 6)),
    'qkv_in': (0, lambda m: (m, 3, 4)),
    'out_in': ((0, 1), lambda m: _split2(2 * m) + (5,)),
    'out_in_neg': ((-3, -2), lambda m: _split2(m) + (4,)),
    'dense_out': (1, lambda m: (5, 2 * m)),
    'qkv_out': ((1, 2), lambda m: (3,) + _split2(m)),
    'out_out_neg': (-1, lambda m: (3, 2, 2 * m)),
}
# Groups over 8 compile slowly (a network per pattern): these cover their
# code paths (contraction / output axes, straddling heads; both dtypes).
WIDE_LAYOUTS = (('dense_in', np.float32), ('dense_in', jnp.bfloat16),
                ('dense_out', np.float32), ('dense_out', jnp.bfloat16),
                ('out_in', np.float32))


def _split2(length):
  """(heads, head_dim) of `length` with heads > 1 where possible, so that
  groups straddle heads."""
  heads = max(h for h in (1, 2, 3, 4) if length % h == 0)
  return heads, length // heads


def _ungroup(groups, shape, axes):
  """Inverse of `_groups`: the (num_groups, m) rows written into `shape`."""
  ndim = len(shape)
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  axes = tuple(sorted(a % ndim for a in axes))
  perm = [a for a in range(ndim) if a not in axes] + list(axes)
  x = groups.reshape([shape[a] for a in perm])
  return np.transpose(x, np.argsort(perm))


def _hard_groups(rng, num, m):
  """`num` groups of `m` magnitudes, cycling through kinds that break naive
  selections: Gaussian, small integers with +-0 (many ties), one repeated
  magnitude with random signs, every value twice, +-inf/NaN/float32 max
  among Gaussians, denormals and zeros, and a plateau of equal values that
  straddles the N-th place."""
  f32 = np.finfo(np.float32)
  rows = []
  for i in range(num):
    kind = i % 7
    if kind == 0:
      row = rng.normal(size=m)
    elif kind == 1:
      row = rng.integers(-2, 3, size=m).astype(np.float64)
      row[rng.random(m) < 0.2] = -0.0
    elif kind == 2:
      row = np.full(m, 1.5) * rng.choice([-1, 1], size=m)
    elif kind == 3:
      row = rng.permutation(np.repeat(rng.normal(size=(m + 1) // 2), 2)[:m])
    elif kind == 4:
      row = rng.normal(size=m)
      special = [np.inf, -np.inf, np.nan, f32.max, -f32.max]
      spots = rng.choice(m, size=min(m, 3), replace=False)
      row[spots] = rng.choice(special, size=spots.size)
    elif kind == 5:
      row = rng.choice([0.0, -0.0, 1e-45, -2e-45, 3e-45, 1e-40, -1e-39],
                       size=m)
    else:
      row = np.where(rng.random(m) < 0.3, rng.normal(size=m) * 4, 0.5)
    rows.append(row)
  return np.stack(rows)


def _check_mask(mask, w, nm, axes, what):
  mask = np.asarray(mask)
  ref = nm_mask_reference(w, nm, axes)
  assert mask.dtype == bool and mask.shape == w.shape, what
  np.testing.assert_array_equal(mask, ref, err_msg=what)
  assert (_groups(mask, axes, nm.m).sum(axis=1) == nm.n).all(), what


def _cases(n, m, seed_text):
  rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
  if m <= 8:
    layouts = [(name, d) for name in sorted(LAYOUTS)
               for d in (np.float32, jnp.bfloat16)]
  else:
    layouts = WIDE_LAYOUTS
  cases = []
  for name, dtype in layouts:
    axes, shape_fn = LAYOUTS[name]
    shape = shape_fn(m)
    groups = _hard_groups(rng, int(np.prod(shape)) // m, m)
    w = _ungroup(groups, shape, axes).astype(np.float32)
    cases.append((f'{name} {shape} {jnp.dtype(dtype).name}', axes,
                  np.asarray(jnp.asarray(w, dtype))))
  return cases


@pytest.mark.parametrize('n,m', ALL_PATTERNS, ids=lambda v: str(v))
def test_every_pattern_and_layout_equals_reference(n, m):
  """Exact equality with the NumPy reference for every recipe pattern, every
  group layout (contraction and output axes, straddling heads, negative
  axes), float32 and bfloat16, on groups full of ties, zeros, denormals,
  inf and NaN. Under jit: one compilation per pattern."""
  nm = NM(n, m)
  cases = _cases(n, m, f'every {n}:{m}')
  masks = jax.jit(lambda ws: [nm_mask(w, nm, axes) for (_, axes, _), w
                              in zip(cases, ws)])([w for *_, w in cases])
  for (what, axes, w), mask in zip(cases, masks):
    _check_mask(mask, w, nm, axes, what)


@pytest.mark.parametrize('n,m', [(2, 4), (1, 16), (15, 16), (8, 64),
                                 (8, 128)], ids=lambda v: str(v))
def test_eager_equals_reference(n, m):
  nm = NM(n, m)
  for what, axes, w in _cases(n, m, f'eager {n}:{m}')[:2]:
    _check_mask(nm_mask(jnp.asarray(w), nm, axes), w, nm, axes, what)


def test_all_equal_groups_keep_the_first_n():
  """Plateaus in every word and chunk of a wide group: the lowest indices
  win, also in drop mode (N > M/2) and when the plateau is split."""
  for n, m in [(3, 4), (2, 8), (5, 16), (40, 64), (8, 128), (100, 128),
               (1, 64), (63, 64)]:
    w = np.full((m, 3), -2.0, np.float32)
    w[:, 2] = np.where(np.arange(m) % 3 == 0, 5.0, 2.0)   # plateau of 2.0
    mask = np.asarray(jax.jit(lambda w, n=n, m=m: nm_mask(w, NM(n, m)))(w))
    np.testing.assert_array_equal(mask, nm_mask_reference(w, NM(n, m)))
    np.testing.assert_array_equal(mask[:, 0], np.arange(m) < n)


def test_inf_and_nan_rank_as_float32_max():
  """inf and NaN weights tie with the largest finite float32 (lowest index
  wins); a bfloat16 inf (or NaN) still beats the largest finite bfloat16."""
  top = np.finfo(np.float32).max
  cols = np.array([[1.0, top, 0.0],
                   [np.nan, -np.inf, np.inf],
                   [3.0, np.nan, -np.nan],
                   [np.inf, 2.0, 5.0]], np.float32)
  want = {1: [[0, 1, 0], [1, 0, 1], [0, 0, 0], [0, 0, 0]],
          2: [[0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0]],
          3: [[0, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 1]]}
  for n, expected in want.items():
    mask = np.asarray(nm_mask(jnp.asarray(cols), NM(n, 4)))
    np.testing.assert_array_equal(mask, np.array(expected, bool))
    np.testing.assert_array_equal(mask, nm_mask_reference(cols, NM(n, 4)))
  big = float(jnp.finfo(jnp.bfloat16).max)
  w = jnp.asarray([[big], [np.inf], [np.nan], [0.0]], jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(nm_mask(w, NM(1, 4)))[:, 0],
                                [False, True, False, False])
  np.testing.assert_array_equal(np.asarray(nm_mask(w, NM(2, 4)))[:, 0],
                                [False, True, True, False])
  np.testing.assert_array_equal(nm_mask(w, NM(2, 4)),
                                nm_mask_reference(np.asarray(w), NM(2, 4)))


def test_denormals_are_ordered_exactly():
  """Magnitudes are compared as integers: a float compare that flushes
  denormals to zero would see ties here."""
  w = np.array([0.0, 1e-45, -0.0, -3e-45, 2e-45, 0.0, 0.0, 1e-44],
               np.float32)[:, None]
  for n in (1, 2, 3, 6, 7):
    mask = np.asarray(nm_mask(jnp.asarray(w), NM(n, 8)))
    np.testing.assert_array_equal(mask, nm_mask_reference(w, NM(n, 8)))
  np.testing.assert_array_equal(
      np.asarray(nm_mask(jnp.asarray(w), NM(2, 8)))[:, 0],
      [0, 0, 0, 1, 0, 0, 0, 1])


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


@pytest.mark.parametrize('axes,shape', [((0, 1), (3, 4, 16)), (-1, (16, 12)),
                                        ((1, 2), (16, 3, 2)), (0, (12, 3))])
def test_indivisible_length_raises_for_every_layout(axes, shape):
  with pytest.raises(ValueError, match=r'not divisible by M=8 \(pattern 1:8\)'):
    nm_mask(jnp.zeros(shape), NM(1, 8), axes)
  with pytest.raises(ValueError, match=r'not divisible by M=8'):
    jax.jit(lambda w: nm_mask(w, NM(1, 8), axes))(jnp.zeros(shape))


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
