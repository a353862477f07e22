"""N:M masks: pure functions of a weight array.

An N:M mask keeps the N largest-magnitude weights of every group of M
consecutive weights along the *group axes* of a kernel. By default the group
axes are the contraction (input) axes of the layer, the layout sparse tensor
cores use.

Ties: among weights of equal magnitude the one with the lower index inside its
group is kept. Magnitudes are compared in float32, as the IEEE bits of |w|
(exact, denormals included); inf and NaN rank as the largest finite float32,
so a diverged kernel still gets exactly N per group. `nm_mask_reference` (a
stable NumPy sort) defines the result and `nm_mask` equals it bit for bit.

`nm_mask` runs inside the jitted step, so it reads the kernel once and keeps
every reduction narrow (XLA:CPU's code for reductions wider than 16 is an
order of magnitude slower). Per pattern family:

* 1:M and (M-1):M: one arg-max (arg-min) of (key, index) per group, in
  levels of at most 16 for wide groups (for 8 <= M <= 16 along a major
  axis: one in-order pass over the group's columns); the mask compares the
  index.
* M <= 8: every weight of a group is ranked against the others.
* otherwise: a sorting network per group finds the K-th largest key
  (K = min(N, M - N)); the decisions become bits of per-group words, ties at
  the threshold resolved by index on the bits, and the words are unpacked
  into the mask. Groups over 64 are done in chunks of 64. For K > 32 (or
  K > 8 in groups over 128) networks get too deep to compile, and a bitwise
  search over the key bits (31 passes) finds the K-th key instead.

Every step is elementwise across groups (the group is never the vectorised
axis), which suits GPUs as well; there are no host callbacks and no
data-dependent control flow.

On a process with one CPU device, groups along a major axis take a CPU
kernel instead where it was measured faster (`pgf.sparsity.mask_kernel`:
an XLA custom call that reads each group once and keeps its best keys in
vector registers; chosen by `_kernel_applies`, switched by `impl` or the
environment variable PGF_MASK_KERNEL). Its masks are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class NM:
  """An N:M pattern: at most `n` non-zeros in every group of `m` weights."""

  n: int
  m: int

  def __post_init__(self):
    if not (isinstance(self.n, int) and isinstance(self.m, int)):
      raise ValueError(f'N:M must be integers, got {self.n}:{self.m}.')
    if self.m < 1 or not 1 <= self.n <= self.m:
      raise ValueError(
          f'Invalid N:M pattern {self.n}:{self.m}: need 1 <= N <= M.')

  @property
  def density(self) -> float:
    return self.n / self.m

  def __str__(self) -> str:
    return f'{self.n}:{self.m}'

  @classmethod
  def parse(cls, text: str) -> NM:
    """Parses '1:16' into NM(1, 16)."""
    match = re.fullmatch(r'\s*(\d+)\s*:\s*(\d+)\s*', text)
    if not match:
      raise ValueError(f'Cannot parse N:M pattern {text!r}; expected "N:M".')
    return cls(int(match.group(1)), int(match.group(2)))


def _normalize_axes(axes: int | Sequence[int], ndim: int,
                    name: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not axes:
    raise ValueError(f'{name}: group axes must not be empty.')
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f'{name}: group axis {a} does not exist for a rank-{ndim} kernel.')
    out.append(a % ndim)
  out = tuple(sorted(out))
  if out != tuple(range(out[0], out[0] + len(out))):
    raise ValueError(f'{name}: group axes {axes} must be contiguous.')
  return out


def check_groupable(shape: Sequence[int], nm: NM, axes: int | Sequence[int],
                    *, name: str = 'kernel') -> tuple[int, ...]:
  """Checks that `shape` can be split in groups of `nm.m` along `axes`.

  Returns the normalised axes. Raises ValueError naming `name`, the shape and
  M when the group length is not divisible by M (the authors' code silently
  lets groups straddle rows; pgf refuses).
  """
  axes = _normalize_axes(axes, len(shape), name)
  length = int(np.prod([shape[a] for a in axes]))
  if length % nm.m:
    raise ValueError(
        f'{name}: shape {tuple(shape)} has group length {length} along axes '
        f'{axes}, which is not divisible by M={nm.m} (pattern {nm}).')
  return axes


def _grouped(x: jax.Array, axes: tuple[int, ...], m: int) -> jax.Array:
  """Reshapes so the group axes become (length // m, m); group axis is a0+1."""
  a0, a1 = axes[0], axes[-1]
  length = int(np.prod(x.shape[a0:a1 + 1]))
  return x.reshape(x.shape[:a0] + (length // m, m) + x.shape[a1 + 1:])


def nm_mask(w: jax.Array, nm: NM, axes: int | Sequence[int] = 0, *,
            name: str = 'kernel', impl: str | None = None) -> jax.Array:
  """Boolean N:M mask of `w`, keeping the N largest |w| of each group.

  Exact: equal to `nm_mask_reference` for every input. Among equal
  magnitudes the lower index in the group is kept; inf and NaN weights rank
  as the float32 maximum. No gradient flows through the selection.

  Args:
    w: weights of any shape, e.g. a Dense kernel `(in, out)`.
    nm: the pattern.
    axes: contiguous axes along which groups of M consecutive weights are
      taken (flattened in row-major order). 0 for a Dense kernel's input axis.
    name: used in error messages.
    impl: 'auto' (the default; the environment variable PGF_MASK_KERNEL,
      read when the caller is traced, sets it for a process): on a process
      with a single CPU device, the CPU mask kernel
      (`pgf.sparsity.mask_kernel`) where it was measured faster, XLA ops
      elsewhere; 'xla': XLA ops everywhere; 'kernel': the CPU kernel on any
      CPU wherever it applies (it sees whole arrays: under a multi-device
      mesh XLA would gather a sharded kernel for it). Every choice gives the
      same mask; on other backends it is always XLA's. The kernel is a
      custom call registered by this process: a function serialized with
      `jax.export` needs 'xla'.

  Returns:
    bool array of `w.shape` with exactly `nm.n` True values per group.
  """
  impl = implementation(impl)
  axes = check_groupable(w.shape, nm, axes, name=name)
  n, m = nm.n, nm.m
  if n == m:
    return jnp.ones(w.shape, bool)
  # (A, M, B): A = groups before the last group axis, B = the axes after it.
  # B > 1 (groups along the contraction axes): every step below is
  # elementwise along B, the contiguous axis. B == 1 (groups along the last
  # axis): the group is the minor axis and A takes its place.
  g = jax.lax.stop_gradient(w).reshape(group_view(w.shape, m, axes))
  if impl != 'xla' and _kernel_applies(g, n, impl):
    from pgf.sparsity import mask_kernel  # numba: imported on first use.
    keep = jax.lax.platform_dependent(
        g, cpu=lambda g: mask_kernel.mask(g, n),
        default=lambda g: _xla_mask(g, n))
  else:
    keep = _xla_mask(g, n)
  return keep.reshape(w.shape)


IMPLS = ('auto', 'xla', 'kernel')


def implementation(impl: str | None) -> str:
  source = 'impl'
  if impl is None:
    impl, source = os.environ.get('PGF_MASK_KERNEL', 'auto'), 'PGF_MASK_KERNEL'
  if impl not in IMPLS:
    raise ValueError(f'nm_mask: {source}={impl!r} is not one of {IMPLS}.')
  return impl


def _kernel_applies(g: jax.Array, n: int, impl: str) -> bool:
  """Whether `nm_mask` takes the CPU kernel for the (A, M, B) view g (on a
  CPU; `jax.lax.platform_dependent` keeps XLA's ops for other backends)."""
  if not kernel_possible(g.shape, g.dtype, n, impl):
    return False
  if impl == 'kernel':
    return True
  # Where it was faster than the XLA ops (python -m pgf.bench.masks, the
  # ViT-B and T5-Base kernels, float32; the `kernel` and `xla` columns of
  # experiments/bench/masks_cpu_xeon.md, 2-core Xeon, 2026-12-07): every
  # pattern from _KERNEL_MIN_SIZE weights (the run of 17:58 UTC, after the
  # kernel read a group's last chunk apart and wrote ties again only where
  # they straddle the K-th key: 0.50-1.13x the XLA ops' min time on the
  # four FF kernels, medians 0.72-0.88x per kernel; 0.59-1.06x on the
  # 768 x 768 ones, medians 0.86x and 0.87x, where an earlier kernel had
  # been even with XLA's ops) and, on smaller ones (not measured), groups of
  # _KERNEL_MIN_WIDE at K >= 2 (0.57-0.74x on the 768 x 768 kernels, 15:37
  # UTC). (On the AMD VM of 2026-12-04, with the kernel's narrower strips of
  # then, XLA's masks were as fast or faster for M <= 16.) Since numba's
  # kernels run on TBB (2026-12-08), K >= 2 from _KERNEL_MIN_SIZE_K2 too:
  # on ViT-Ti/16's 24 FF kernels of 147,456 weights in one call
  # (`PGF_MASK_KERNEL=kernel` and `=xla`, `python -m pgf.bench.masks
  # --shapes=vit_ti_ff --impls=xla`, two alternating runs) the kernel took
  # 0.75-0.87x XLA's min time at 2:4, 4:8, 1:32, 8:64 and 32:64, but
  # 0.97-1.13x at 1:8 and 1:16.
  m = g.shape[1]
  k = min(n, m - n)
  size = int(np.prod(g.shape))
  return (size >= _KERNEL_MIN_SIZE
          or (k >= 2 and (m >= _KERNEL_MIN_WIDE
                          or size >= _KERNEL_MIN_SIZE_K2)))


def kernel_possible(shape: Sequence[int], dtype, n: int, impl: str) -> bool:
  """Whether a CPU kernel of `pgf.sparsity.mask_kernel` can take the
  (A, M, B) view of this shape under `impl` ('auto' or 'kernel'): groups
  along a major axis (B > 1, a multiple of its 16 lanes), K = min(N, M - N)
  from 1 to _KERNEL_MAX_K, float32 or 16-bit float keys, and under 'auto'
  a process with a single CPU device."""
  if impl == 'xla' or len(shape) != 3:
    return False          # Groups along the minor axis: XLA.
  try:
    cpus = len(jax.local_devices(backend='cpu'))
  except RuntimeError:    # No CPU backend in this process.
    return False
  if impl == 'auto' and (jax.process_count() > 1 or cpus > 1):
    return False          # A mesh may shard the kernel: XLA partitions it.
  if dtype != jnp.float32 and jnp.dtype(dtype) not in _HALF_INF_BITS:
    return False          # The kernel's keys: float32 and 16-bit floats.
  m, inner = shape[1], shape[2]
  k = min(n, m - n)
  return 1 <= k <= _KERNEL_MAX_K and inner % 16 == 0


def group_view(shape: Sequence[int], m: int,
               axes: tuple[int, ...]) -> tuple[int, ...]:
  """The (A, M, B) view `nm_mask` takes of a kernel (groups along axis 1),
  or (A, M) where the groups run along the last axis."""
  a1 = axes[-1]
  outer = int(np.prod(shape[:a1 + 1])) // m
  inner = int(np.prod(shape[a1 + 1:]))
  return (outer, m, inner) if inner > 1 else (outer, m)


def _xla_mask(g: jax.Array, n: int) -> jax.Array:
  """The mask of g (A, M[, B]), groups along axis 1, from XLA ops."""
  m = g.shape[1]
  if min(n, m - n) == 1:
    return _select_one(g, top=n == 1)
  if m <= _MAX_RANKED:
    return _select_by_rank(g, n)
  return _select_many(g, n)


# Magnitudes become int32 keys: the IEEE bits of |w| order non-negative
# floats exactly (float compares may flush denormals to zero), and integer
# min/max vectorise on every backend. inf and NaN are capped at the largest
# finite float32 (NaN: at the 16-bit float's inf, which ranks the same way).
_F32_MAX_BITS = 0x7F7FFFFF
_HALF_INF_BITS = {jnp.dtype(jnp.bfloat16): 0x7F80,
                  jnp.dtype(jnp.float16): 0x7C00}
# XLA:CPU emits fast code for reductions up to this width and a slow loop
# beyond (measured: arg-max over 32 is 20x slower than over 16).
_MAX_REDUCE = 16
# 1:M and (M-1):M groups from this width up to _MAX_REDUCE, along a major
# axis, take one in-order pass (_index_by_chain): 0.77-0.89x the
# arg-max's time at M = 8 and 16 (medians over the ViT-B and T5-Base kernels,
# two interleaved runs, idle); at M = 4 neither was consistently faster, and
# from M = 32 the pass was slower than the levels of arg-max.
_MIN_CHAIN = 8
# Groups up to this width rank every weight against the others: M(M-1)/2
# compares per group beat a network and a tie pass (measured at 4 and 8).
_MAX_RANKED = 8
# Groups wider than this are processed in chunks of it (two words of bits).
_CHUNK = 64
# Values stored by one variadic reduction (see _kth_of_chunks).
_MAX_STORED = 8
# Longest sorted lists merged by a network (see _select_many).
_MAX_NETWORK = 32
# K = min(N, M - N) up to which the CPU kernel runs (its sorted lists of 16
# fill the registers, those of 32 spill to L1 but were still faster than
# XLA's ops; pgf.sparsity.mask_kernel is not imported here: it needs numba).
_KERNEL_MAX_K = 32
_KERNEL_MIN_SIZE = 1 << 19
_KERNEL_MIN_SIZE_K2 = 1 << 17
_KERNEL_MIN_WIDE = 128


def _keys(x: jax.Array) -> jax.Array:
  """int32 keys ordered like |x| (same shape)."""
  inf_bits = _HALF_INF_BITS.get(jnp.dtype(x.dtype))
  if inf_bits is not None:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)
    return jnp.minimum(bits & 0x7FFF, inf_bits)
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.minimum(bits & 0x7FFFFFFF, _F32_MAX_BITS)


def _index_bits(dtype, m: int) -> int | None:
  """Bits that make 16-bit float keys unique: key * 2^b + in-group rank.

  15 magnitude bits leave 16 for the index. float32 keys use 31 bits, so
  they stay non-unique and ties are resolved on bit masks instead.
  """
  if jnp.dtype(dtype) not in _HALF_INF_BITS:
    return None
  b = max(1, (m - 1).bit_length())
  return b if b <= 16 else None


# -- N = 1 or N = M - 1: one arg-max (or arg-min) per group ------------------


def _select_one(g: jax.Array, top: bool) -> jax.Array:
  """Keeps the largest (top) or drops the smallest |g| of each group (axis 1).

  Ties keep the lower index: arg-max takes the lowest, arg-min the highest
  index among equals. Groups wider than _MAX_REDUCE are reduced in levels
  (sub-groups, then their winners), each level a narrow reduction.
  """
  m = g.shape[1]
  if g.ndim == 3 and _MIN_CHAIN <= m <= _MAX_REDUCE:
    best = _stored([_index_by_chain(g, top)])[0]
  else:
    best = _index_by_reduce(g, top)
  pos = jax.lax.broadcasted_iota(jnp.int32, g.shape, 1)
  hit = pos == jnp.expand_dims(best, 1)
  return hit if top else ~hit


def _index_by_reduce(g: jax.Array, top: bool) -> jax.Array:
  """In-group index of the kept (top) or dropped weight: a variadic arg-max
  (arg-min) of (key, index), in levels of at most _MAX_REDUCE."""
  m = g.shape[1]
  keys = _keys(g)
  idx = jax.lax.broadcasted_iota(jnp.int32, g.shape, 1)

  def better(a, b):
    (ka, ia), (kb, ib) = a, b
    if top:
      take_b = (kb > ka) | ((kb == ka) & (ib < ia))
    else:
      take_b = (kb < ka) | ((kb == ka) & (ib > ia))
    return (jax.lax.select(take_b, kb, ka), jax.lax.select(take_b, ib, ia))

  init = (jnp.int32(-1 if top else np.iinfo(np.int32).max), jnp.int32(0))
  width = m
  while width > _MAX_REDUCE:
    sub = max((d for d in range(2, _MAX_REDUCE + 1) if width % d == 0),
              default=width)
    if sub == width:
      break   # no narrow divisor: one wide reduction
    split = keys.shape[:1] + (width // sub, sub) + keys.shape[2:]
    keys, idx = jax.lax.reduce((keys.reshape(split), idx.reshape(split)),
                               init, better, (2,))
    width //= sub
  return jax.lax.reduce((keys, idx), init, better, (1,))[1]


def _index_by_chain(g: jax.Array, top: bool) -> jax.Array:
  """`_index_by_reduce` for groups along a major axis (A, M, B): one pass
  over the group's columns in order, each a compare and two selects per
  weight (against about seven in the variadic arg-max), elementwise along B.

  In order, a strict `>` keeps the first of equal maxima (top); `<=` takes
  the last of equal minima, the one to drop (bottom). The result must be
  stored (`_stored`) before the mask reads it per weight.
  """
  best = _keys(jax.lax.index_in_dim(g, 0, 1, keepdims=False))
  at = jnp.zeros(best.shape, jnp.int32)
  for j in range(1, g.shape[1]):
    key = _keys(jax.lax.index_in_dim(g, j, 1, keepdims=False))
    take = (key > best) if top else (key <= best)
    best = jnp.where(take, key, best)
    at = jnp.where(take, jnp.int32(j), at)
  return at


# -- 2 <= N <= M - 2 -----------------------------------------------------------


def _select_by_rank(g: jax.Array, n: int) -> jax.Array:
  """Exact top-N of small groups (axis 1 of `g`) by pairwise comparison.

  Weight i's rank counts the weights that beat it: larger keys, and equal
  keys at a lower index. The keep flags of a group are packed into one
  uint32 word, stored, and unpacked (see _select_many).
  """
  m = g.shape[1]
  keys = [_keys(jax.lax.index_in_dim(g, j, 1, keepdims=False))
          for j in range(m)]
  rank = [jnp.zeros(keys[0].shape, jnp.int32) for _ in range(m)]
  for i in range(m):
    for j in range(i + 1, m):
      j_wins = keys[j] > keys[i]      # i < j: i wins ties
      rank[i] = rank[i] + j_wins.astype(jnp.int32)
      rank[j] = rank[j] + (~j_wins).astype(jnp.int32)
  return _unpack(_stored(_pack([r < n for r in rank])), g.shape, 1)


def _select_many(g: jax.Array, n: int) -> jax.Array:
  """Exact top-N of each group along axis 1 of `g` (A, M[, B]).

  Per group (elementwise along the other axes, so it vectorises): a sorting
  network finds the K-th largest key T (K = min(N, M - N); for N > M/2 the
  K = M - N smallest are found and dropped instead). Each weight's decision
  is then a bit of a per-group uint32 word: above T in, below T out, and of
  the keys equal to T the first ones in tie order until K are taken. The
  words are stored (1/8 of the mask's bytes) and unpacked into the mask, so
  the weights are read once (twice for groups wider than _CHUNK).
  """
  m = g.shape[1]
  top = 2 * n <= m
  k = n if top else m - n
  hi, lo = (jnp.maximum, jnp.minimum) if top else (jnp.minimum, jnp.maximum)
  chunk = _CHUNK if m > _CHUNK and m % _CHUNK == 0 else m
  chunks = m // chunk
  if not top:
    # Drop mode drops the highest indices first among ties: walk the group
    # backwards, so that in both modes ties go to the lowest position.
    g = jnp.flip(g, axis=1)
  shape = g.shape
  b = _index_bits(g.dtype, m)

  def column(x, j, pos):
    # Keys of column j of `x` (axis 1), at in-group position `pos`. Sliced
    # before the key is computed, so that XLA reads the weights instead of
    # storing a key array.
    key = _keys(jax.lax.index_in_dim(x, j, 1, keepdims=False))
    if b is None:
      return key
    # Unique keys: the position goes below the magnitude, ranking lower
    # positions first, so the network itself decides ties.
    return (key << b) | ((m - 1 - pos) if top else pos)

  pad = -1 if top else np.iinfo(np.int32).max  # ranks below every key
  size = _list_size(k)
  # Chunks of a group become consecutive rows (A * C, chunk[, B]); `groups`
  # views a per-chunk array as (A, C[, B]) to combine a group's chunks.
  rows_shape = (shape[0] * chunks, chunk) + shape[2:]
  groups = lambda x: x.reshape((shape[0], chunks) + x.shape[1:])
  start = 0
  if b is not None and chunks > 1:
    start = chunk * jax.lax.broadcasted_iota(
        jnp.int32, (shape[0], chunks) + shape[2:], 1).reshape(rows_shape[:1]
                                                             + shape[2:])
  cols = [column(g.reshape(rows_shape), j, j + start) for j in range(chunk)]
  if size > _MAX_NETWORK or (chunks > 2 and size > _MAX_STORED):
    # Lists too long for a network (XLA splits deep ones into hundreds of
    # fusions: minutes of compilation): a bitwise search, one count over
    # the group per key bit. Slow, but rare (K > 32, or K > 8 at M > 128).
    keys = _keys(g)
    if b is not None:
      pos = jax.lax.broadcasted_iota(jnp.int32, g.shape, 1)
      keys = (keys << b) | ((m - 1 - pos) if top else pos)
    t = _kth_by_bits(keys, k, top, 15 + b if b else 31)
  elif chunks == 1:
    # In the same fusion as the bits below: the weights are read once.
    t = _kth_of_lists(_sorted_runs(cols, size, hi, lo, pad), k, hi, lo)
  elif size > _MAX_STORED:
    # Lists too long to store: one network over the whole group.
    whole = [column(g, j, j) for j in range(m)]
    t = _stored([_kth_of_lists(_sorted_runs(whole, size, hi, lo, pad), k,
                               hi, lo)])[0]
  else:
    t = _stored([_kth_of_chunks(cols, k, hi, lo, pad, groups)])[0]
  if chunks > 1:   # shared by the chunks of a group
    t = jnp.broadcast_to(jnp.expand_dims(t, 1), (shape[0], chunks)
                         + shape[2:]).reshape(rows_shape[:1] + shape[2:])
  if b is not None:
    sel = _pack([(x >= t) if top else (x <= t) for x in cols])
  else:
    strict = _pack([(x > t) if top else (x < t) for x in cols])
    ties = _pack([x == t for x in cols])
    if chunks > 1:
      words = _stored(strict + ties)
      strict, ties = words[:len(strict)], words[len(strict):]
    sel = _take_ties(strict, ties, k, chunk, groups if chunks > 1 else None)
  bits = _unpack(_stored(sel), rows_shape, 1).reshape(shape)
  return bits if top else ~jnp.flip(bits, axis=1)


def _take_ties(strict, ties, k, width, groups):
  """Words of the kept positions: all strict ones, then ties in order.

  `need` counts the ties still to take; each word keeps its lowest `need`
  tie bits. With chunks (`groups` views the words per group), the counts of
  a group's other chunks come from (tiny) sums over its chunks.
  """
  above = sum(_popcount(x) for x in strict)
  tied = [_popcount(x) for x in ties]
  if groups is not None:
    in_chunk = groups(sum(tied))
    earlier = jnp.cumsum(in_chunk, axis=1) - in_chunk
    above = jnp.sum(groups(above), axis=1, keepdims=True) + earlier
    above = above.reshape(tied[0].shape)
  need = k - above
  sel = []
  for u, (s, e, c) in enumerate(zip(strict, ties, tied)):
    sel.append(s | _lowest_set_bits(e, need, min(32, width - 32 * u)))
    need = need - c
  return sel


def _kth_of_chunks(cols, k, hi, lo, pad, groups):
  """K-th key of each group (A[, B]) from the keys of its chunks' positions.

  Each chunk's sorted top-L list is stored first, then a group's lists are
  merged: one network over all positions would keep M keys live and spill,
  and compiles slowly (13 s for 8:256). L <= _MAX_STORED: a variadic
  reduction storing more values is split by XLA:CPU into one fusion per
  value, each recomputing the network.
  """
  heads = _stored(_kth_of_lists(
      _sorted_runs(cols, _list_size(k), hi, lo, pad), None, hi, lo))
  heads = [groups(x) for x in heads]
  lists = [[jax.lax.index_in_dim(x, c, 1, keepdims=False) for x in heads]
           for c in range(heads[0].shape[1])]
  return _kth_of_lists(lists, k, hi, lo)


def _list_size(k: int) -> int:
  """L: the length of the sorted lists merged to find the k-th key."""
  return 1 << (k - 1).bit_length()


def _kth_by_bits(keys, k, top, nbits):
  """K-th largest (top) or smallest key of each group, with multiplicity,
  by a bitwise search from the high bit: one pass over the group per key
  bit, in a loop so that the program stays small.

  keys: (A, M[, B]) int32, below 2^nbits. Returns (A[, B]).
  """
  def step(i, t):
    cand = t | (jnp.int32(1) << (nbits - 1 - i))
    # top: the largest t with count(keys >= t) >= k, the k-th largest;
    # else: the largest t with count(keys < t) < k, the k-th smallest.
    count = 0
    for j in range(keys.shape[1]):   # compared per column: nothing stored
      key = jax.lax.index_in_dim(keys, j, 1, keepdims=False)
      count = count + ((key >= cand) if top else (key < cand)).astype(
          jnp.int32)
    return jnp.where((count >= k) if top else (count < k), cand, t)

  zero = jnp.zeros(keys.shape[:1] + keys.shape[2:], jnp.int32)
  return jax.lax.fori_loop(0, nbits, step, zero)


def _sorted_runs(cols, size, hi, lo, pad):
  """Consecutive runs of `size` columns, each sorted by a network."""
  cols = list(cols)
  if len(cols) % size:
    cols += [jnp.full_like(cols[0], pad)] * (size - len(cols) % size)
  return [_sort(cols[i:i + size], hi, lo) for i in range(0, len(cols), size)]


def _kth_of_lists(lists, k, hi, lo):
  """Merges sorted lists of equal length L, keeping the top L.

  Two sorted lists a, b merge into c_i = hi(a_i, b_{L-1-i}): the top L of
  both, in bitonic order, which a half-cleaner network sorts again. Returns
  the k-th element, or the whole sorted list when k is None.
  """
  size = len(lists[0])
  while len(lists) > 1:
    merged = []
    for a, b in zip(lists[0::2], lists[1::2]):
      c = [hi(a[i], b[size - 1 - i]) for i in range(size)]
      if len(lists) == 2 and k == size:
        # Last merge: the L-th of the top L is the lo of them all.
        t = c[0]
        for x in c[1:]:
          t = lo(t, x)
        return t
      merged.append(_bitonic_sort(c, hi, lo))
    if len(lists) % 2:
      merged.append(lists[-1])
    lists = merged
  return lists[0] if k is None else lists[0][k - 1]


def _sort(xs, hi, lo):
  """Sorts a list (length a power of two) with Batcher's odd-even merge."""
  xs = list(xs)
  for i, j in _odd_even_merge_sort(len(xs)):
    xs[i], xs[j] = hi(xs[i], xs[j]), lo(xs[i], xs[j])
  return xs


def _bitonic_sort(xs, hi, lo):
  """Sorts a bitonic list (length a power of two): log2(L) half-cleaners."""
  xs = list(xs)
  for i, j in _half_cleaners(len(xs)):
    xs[i], xs[j] = hi(xs[i], xs[j]), lo(xs[i], xs[j])
  return xs


def _half_cleaners(n: int) -> list[tuple[int, int]]:
  """Comparators (i, j), i < j, of the half-cleaners that sort a bitonic
  list of n = 2^k."""
  pairs = []
  half = n // 2
  while half:
    pairs.extend((i, i + half) for i in range(n) if not i & half)
    half //= 2
  return pairs


def _odd_even_merge_sort(n: int) -> list[tuple[int, int]]:
  """Comparators (i, j), i < j, of Batcher's network for n = 2^k inputs."""
  pairs = []

  def merge(lo, length, r):
    step = 2 * r
    if step < length:
      merge(lo, length, step)
      merge(lo + r, length, step)
      pairs.extend((i, i + r) for i in range(lo + r, lo + length - r, step))
    else:
      pairs.append((lo, lo + r))

  def sort(lo, length):
    if length > 1:
      half = length // 2
      sort(lo, half)
      sort(lo + half, half)
      merge(lo, length, 1)

  sort(0, n)
  return pairs


# -- bit masks -----------------------------------------------------------------


def _pack(flags):
  """bool arrays (one per position) -> uint32 words, bit j%32 of word j//32."""
  words = []
  for j, f in enumerate(flags):
    bit = f.astype(jnp.uint32) << (j % 32)
    if j % 32:
      words[-1] = words[-1] | bit
    else:
      words.append(bit)
  return words


def _popcount(x):
  return jax.lax.population_count(x).astype(jnp.int32)


def _lowest_set_bits(x, r, width=32):
  """`x` with only its `r` lowest set bits (r < 1: none; r >= 32: all).

  Binary search for the shortest prefix holding r set bits, over the low
  `width` bits (the others are 0); per group, so its cost is spread over
  the group's weights.
  """
  def prefix(length):   # the low `length` bits, length in [1, 32]
    return jnp.where(length >= 32, jnp.uint32(0xFFFFFFFF),
                     (jnp.uint32(1) << length.astype(jnp.uint32)) - 1)

  short = jnp.zeros_like(r)   # the longest prefix with fewer than r bits
  steps = (width - 1).bit_length()
  for step in (1 << i for i in reversed(range(steps))):
    longer = short + step
    short = jnp.where(_popcount(x & prefix(longer)) < r, longer, short)
  return jnp.where(r < 1, jnp.uint32(0), x & prefix(short + 1))


def _stored(xs):
  """Returns the arrays `xs` unchanged, computed once and stored.

  XLA fuses cheap elementwise producers into consumers that read each
  element many times (a broadcast over the group) and recomputes them per
  read: a whole network per weight. A reduction's result is always stored,
  so the values go through an OR-reduction over a new axis of size 2 whose
  second entry is 0.
  """
  xs = list(xs)
  ndim = xs[0].ndim
  axis = ndim - 1 if ndim > 1 else 0   # not the minor axis: keep it vectorised
  shape = xs[0].shape[:axis] + (2,) + xs[0].shape[axis:]
  first = jax.lax.broadcasted_iota(jnp.int32, shape, axis) == 0
  dtypes = [x.dtype for x in xs]
  ops = tuple(
      jnp.where(first, jnp.expand_dims(
          jax.lax.bitcast_convert_type(x, jnp.uint32), axis), jnp.uint32(0))
      for x in xs)
  out = jax.lax.reduce(ops, (jnp.uint32(0),) * len(ops),
                       lambda a, b: tuple(x | y for x, y in zip(a, b)),
                       (axis,))
  return [jax.lax.bitcast_convert_type(x, d) for x, d in zip(out, dtypes)]


def _unpack(words, shape, axis):
  """uint32 words -> bool array of `shape`: bit j%32 of word j//32 at
  index j of `axis` (the words have `shape` without `axis`).

  Along a major axis: one piece per word, concatenated (a select between
  words per weight is 4x slower at 8 words). Along the minor axis XLA:CPU
  branches per element in a fused concatenation: there, a select.
  """
  if len(words) == 1 or axis == len(shape) - 1:
    pos = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    word = jnp.expand_dims(words[0], axis)
    for u in range(1, len(words)):
      word = jnp.where(pos >= 32 * u, jnp.expand_dims(words[u], axis), word)
    return ((word >> (pos & 31).astype(jnp.uint32)) & 1).astype(bool)
  parts = []
  for u, word in enumerate(words):
    part = shape[:axis] + (min(32, shape[axis] - 32 * u),) + shape[axis + 1:]
    bit = jax.lax.broadcasted_iota(jnp.uint32, part, axis)
    parts.append(((jnp.expand_dims(word, axis) >> bit) & 1).astype(bool))
  return jnp.concatenate(parts, axis)


def nm_mask_reference(w: np.ndarray, nm: NM,
                      axes: int | Sequence[int] = 0) -> np.ndarray:
  """Plain NumPy reference of `nm_mask` (a stable sort per group).

  Magnitudes are float32; inf and NaN rank as the float32 maximum.
  """
  w = np.asarray(w)
  axes = check_groupable(w.shape, nm, axes)
  a0, a1 = axes[0], axes[-1]
  moved = np.moveaxis(w.reshape(w.shape[:a0] + (-1,) + w.shape[a1 + 1:]),
                      a0, -1)
  mag = np.abs(moved.reshape(-1, nm.m).astype(np.float32))
  top = np.finfo(np.float32).max
  mag = np.where(mag <= top, mag, top)   # inf and NaN compare false
  # Stable sort of -|w|: larger first, lower index first among equals.
  order = np.argsort(-mag, axis=1, kind='stable')
  mask = np.zeros(mag.shape, bool)
  np.put_along_axis(mask, order[:, :nm.n], True, axis=1)
  mask = np.moveaxis(mask.reshape(moved.shape), -1, a0)
  return mask.reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What `verify_nm` measured for one kernel."""

  path: str
  nm: NM
  shape: tuple[int, ...]
  is_nm: bool           # every group has at most N non-zeros
  density: float        # fraction of non-zero weights
  max_nonzeros: int     # the largest non-zero count seen in one group


def verify_nm(kernels: Mapping[str, Any],
              patterns: Mapping[str, tuple[NM, Sequence[int]]]
              ) -> dict[str, LayerReport]:
  """Verifies that kernels hold an exact N:M pattern (for tests and export).

  Args:
    kernels: path -> (effective) weight array.
    patterns: path -> (pattern, group axes); every path must be in `kernels`.

  Returns:
    path -> LayerReport.
  """
  reports = {}
  for path, (nm, axes) in patterns.items():
    if path not in kernels:
      raise ValueError(f'verify_nm: no kernel at {path!r}.')
    w = np.asarray(kernels[path])
    axes = check_groupable(w.shape, nm, axes, name=path)
    nz = (w != 0)
    counts = _grouped(nz, axes, nm.m).sum(axis=axes[0] + 1)
    reports[path] = LayerReport(
        path=path, nm=nm, shape=tuple(w.shape),
        is_nm=bool((counts <= nm.n).all()), density=float(nz.mean()),
        max_nonzeros=int(counts.max()))
  return reports
