"""The CPU N:M mask kernel: one pass over the kernel, in vector registers.

`nm_mask` on a single CPU device calls this kernel (an XLA FFI custom call,
compiled by numba) instead of its XLA formulation where it was measured
faster (`masks._kernel_applies`), for groups along a major axis: the kernel
seen as (A, M, B), groups of M along the middle axis, B a multiple of LANES
(a Dense kernel [in, out] grouped along `in`, the default: A = in / M,
B = out). Same result bit for bit; see `nm_mask` for the rule.

Every exact mask made of XLA ops needs two passes over memory (a loop fusion
computes each output element alone, so a group's result is stored and then
read back per weight). This kernel takes a strip of LANES * U columns of one
group at a time: it streams the group's M rows through registers once,
keeping per column the K = min(N, M - N) best magnitude keys so far (a
sorted list of K rounded up to a power of two, S: each chunk of S rows is
sorted by Batcher's network and merged into it by a bitonic merge), then
writes the strip's mask while the rows are still in L1 (for K = 1 it keeps
the index of the best key and only writes). Keys are the IEEE bits of |w|
(inf and NaN capped at the largest finite value), as in `nm_mask`; ties
keep the lower index: the list gives
the K-th key T and how many kept keys exceed it, and the second pass keeps
the first equal ones (drops the last, when K counts dropped weights).

The vectors are LLVM's generic vector types (`<16 x i32>`), so the kernel is
portable: the compiler splits them to the CPU's registers (one AVX-512
register, two AVX2 ones). Strips run in parallel (numba prange) from
PARALLEL_ELEMENTS weights.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'passive')  # as pgf.inference.cpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from llvmlite import ir  # noqa: E402
import numba  # noqa: E402
from numba.core import cgutils  # noqa: E402

from pgf import numba_ffi  # noqa: E402
from pgf.sparsity import masks  # noqa: E402

LANES = 16        # Columns per vector (32-bit lanes of a 512-bit vector).
UNROLL = 2        # Vectors per strip (independent chains per row).
# Weights from which strips run on all cores (below, waking the pool cost
# more than it saved).
PARALLEL_ELEMENTS = 1 << 17

# dtype -> (bits per weight, magnitude bits, cap): the keys of `nm_mask`
# (the cap: the largest finite value's bits for float32, the infinity's for
# 16-bit floats).
_DTYPES = {
    'float32': (32, 0x7FFFFFFF, masks._F32_MAX_BITS),
    **{dtype.name: (16, 0x7FFF, cap)
       for dtype, cap in masks._HALF_INF_BITS.items()},
}


def _strip_pass(k: int, top: bool, u: int, dtype: str):
  """An intrinsic: strip(w, mask, m, w_row_bytes, mask_row_bytes), addresses
  as int64: the mask of u * LANES columns of one group of m rows."""
  bits, magnitude, cap = _DTYPES[dtype]

  @numba.extending.intrinsic
  def strip(typingctx, wa, ma, m, ws, ms):
    del typingctx
    i64 = numba.types.int64
    sig = numba.types.void(i64, i64, i64, i64, i64)

    def emit(builder, args):
      wa, ma, m, ws, ms = args
      word = ir.IntType(64)
      ivec = ir.VectorType(ir.IntType(32), LANES)
      lvec = ir.VectorType(ir.IntType(bits), LANES)
      bvec = ir.VectorType(ir.IntType(8), LANES)
      splat = lambda v: ir.Constant(ivec, [v] * LANES)
      const = lambda v: ir.Constant(word, v)

      def smax(a, b):
        return builder.select(builder.icmp_signed('>', a, b), a, b)

      def smin(a, b):
        return builder.select(builder.icmp_signed('<', a, b), a, b)

      def keys(r):
        """The key vectors of row r (u of them)."""
        row = builder.add(wa, builder.mul(ws, r))
        out = []
        for v in range(u):
          ptr = builder.inttoptr(
              builder.add(row, const(v * LANES * bits // 8)),
              lvec.as_pointer())
          x = builder.load(ptr, align=bits // 8)
          if bits != 32:
            x = builder.zext(x, ivec)
          out.append(smin(builder.and_(x, splat(magnitude)), splat(cap)))
        return out

      def store(r, flags):
        row = builder.add(ma, builder.mul(ms, r))
        for v in range(u):
          ptr = builder.inttoptr(builder.add(row, const(v * LANES)),
                                 bvec.as_pointer())
          builder.store(builder.zext(flags[v], bvec), ptr, align=1)

      def state(init):
        slots = []
        for _ in range(u):
          slot = cgutils.alloca_once(builder, ivec)
          builder.store(splat(init), slot)
          slots.append(slot)
        return slots

      if k == 1:
        best = state(-1 if top else 0x7FFFFFFF)
        at = state(0)
        with cgutils.for_range(builder, m) as loop:
          rv = _splat_row(builder, loop.index)
          for v, key in enumerate(keys(loop.index)):
            b = builder.load(best[v])
            take = builder.icmp_signed('>' if top else '<=', key, b)
            builder.store(builder.select(take, key, b), best[v])
            builder.store(builder.select(take, rv, builder.load(at[v])),
                          at[v])
        with cgutils.for_range(builder, m) as loop:
          rv = _splat_row(builder, loop.index)
          flags = []
          for v in range(u):
            hit = builder.icmp_signed('==', builder.load(at[v]), rv)
            flags.append(hit if top else builder.not_(hit))
          store(loop.index, flags)
        return

      # The best `size` keys so far, sorted (size: K rounded up to a power
      # of two), merged with each sorted chunk of `size` rows.
      size = 1 << (k - 1).bit_length()
      pad = -1 if top else 0x7FFFFFFF
      lists = [state(pad) for _ in range(size)]
      better, worse = (smax, smin) if top else (smin, smax)

      def merge(chunk, v):
        held = [builder.load(lists[i][v]) for i in range(size)]
        # Both sorted: the better of held[i] and chunk[size-1-i] are the
        # best `size` of the two, a bitonic list; half-cleaners sort it.
        xs = [better(held[i], chunk[size - 1 - i]) for i in range(size)]
        for i, j in masks._half_cleaners(size):
          xs[i], xs[j] = better(xs[i], xs[j]), worse(xs[i], xs[j])
        for i in range(size):
          builder.store(xs[i], lists[i][v])

      chunks = builder.udiv(m, const(size))
      with cgutils.for_range(builder, chunks) as loop:
        first = builder.mul(loop.index, const(size))
        rows = [keys(builder.add(first, const(j))) for j in range(size)]
        for v in range(u):
          xs = [rows[j][v] for j in range(size)]
          for i, j in masks._odd_even_merge_sort(size):
            xs[i], xs[j] = better(xs[i], xs[j]), worse(xs[i], xs[j])
          merge(xs, v)
      # Rows past the last whole chunk (M not a multiple of size): inserted
      # one by one.
      rest = builder.sub(m, builder.mul(chunks, const(size)))
      with cgutils.for_range(builder, rest) as loop:
        r = builder.add(builder.mul(chunks, const(size)), loop.index)
        for v, key in enumerate(keys(r)):
          for i in range(size):
            held = builder.load(lists[i][v])
            builder.store(better(held, key), lists[i][v])
            key = worse(held, key)
      thresh, need = [], []
      for v in range(u):
        t = builder.load(lists[k - 1][v])
        n = splat(k)
        for i in range(k - 1):
          past = builder.icmp_signed('>' if top else '<',
                                     builder.load(lists[i][v]), t)
          n = builder.sub(n, builder.zext(past, ivec))
        thresh.append(t)
        need.append(n)
      seen = state(0)
      # Ties: keep the first equal keys (top), drop the last ones (bottom).
      with cgutils.for_range(builder, m) as loop:
        r = loop.index if top else builder.sub(builder.sub(m, const(1)),
                                               loop.index)
        flags = []
        for v, key in enumerate(keys(r)):
          s = builder.load(seen[v])
          tie = builder.and_(builder.icmp_signed('==', key, thresh[v]),
                             builder.icmp_signed('<', s, need[v]))
          builder.store(builder.add(s, builder.zext(tie, ivec)), seen[v])
          past = builder.icmp_signed('>' if top else '<', key, thresh[v])
          chosen = builder.or_(past, tie)
          flags.append(chosen if top else builder.not_(chosen))
        store(r, flags)

    def codegen(context, builder, signature, args):
      del signature
      emit(builder, args)
      return context.get_dummy_value()

    return sig, codegen

  return strip


def _splat_row(builder, r):
  ivec = ir.VectorType(ir.IntType(32), LANES)
  one = builder.insert_element(ir.Constant(ivec, ir.Undefined),
                               builder.trunc(r, ir.IntType(32)),
                               ir.Constant(ir.IntType(32), 0))
  return builder.shuffle_vector(one, ir.Constant(ivec, ir.Undefined),
                                ir.Constant(ivec, [0] * LANES))


_DRIVER_SOURCE = '''
def {name}(wa, ma, groups, m, b):
  """The mask of a (groups, m, b) kernel at wa into ma (addresses)."""
  wide = b // {width}
  per = wide + (b - wide * {width}) // {lanes}
  for item in {loop}(groups * per):
    g = item // per
    s = item - g * per
    off = g * m * b + (s * {width} if s < wide
                       else wide * {width} + (s - wide) * {lanes})
    if s < wide:
      _wide(wa + off * {size}, ma + off, m, b * {size}, b)
    else:
      _narrow(wa + off * {size}, ma + off, m, b * {size}, b)
'''


@functools.cache
def _driver(k: int, top: bool, dtype: str, parallel: bool):
  name = (f'_mask_{dtype}_k{k}_{"top" if top else "bottom"}_'
          f'{"parallel" if parallel else "serial"}')
  u = UNROLL if k < 5 else 1   # Lists of 8 or 16 fill the registers.
  namespace = {'_wide': _strip_pass(k, top, u, dtype),
               '_narrow': _strip_pass(k, top, 1, dtype),
               'numba': numba, '__name__': __name__}
  source = _DRIVER_SOURCE.format(
      name=name, width=u * LANES, lanes=LANES,
      size=_DTYPES[dtype][0] // 8,
      loop='numba.prange' if parallel else 'range')
  exec(compile(source, __file__, 'exec'), namespace)  # noqa: S102
  i64 = numba.types.int64
  return numba.njit(numba.void(*[i64] * 5), parallel=parallel, nogil=True,
                    cache=True)(namespace[name])


_HANDLER_SOURCE = '''
def {name}(frame_ptr):
  frame = numba.carray(frame_ptr, 15)
  if _answered_metadata(frame):
    return 0
  wd, rank, dims = _buffer(frame, 5, 0)
  md = _buffer(frame, 10, 0)[0]
  shape = numba.carray(dims, rank)
  groups = 1
  for i in range(rank - 2):
    groups *= shape[i]
  _drive(wd, md, groups, shape[rank - 2], shape[rank - 1])
  return 0
'''


@functools.cache
def target(k: int, top: bool, dtype: str, parallel: bool) -> str:
  """The FFI target name of the variant (compiled and registered once per
  process; numba caches the machine code on disk)."""
  name = (f'pgf_nm_mask_{dtype}_k{k}_{"top" if top else "bottom"}_'
          f'{"parallel" if parallel else "serial"}')
  namespace = {'_drive': _driver(k, top, dtype, parallel),
               '_answered_metadata': numba_ffi.answered_metadata,
               '_buffer': numba_ffi.buffer_dims,
               'numba': numba, '__name__': __name__}
  exec(compile(_HANDLER_SOURCE.format(name='_' + name), __file__,  # noqa: S102
               'exec'), namespace)
  return numba_ffi.register(name, namespace['_' + name])


def mask(g: jax.Array, n: int) -> jax.Array:
  """The N:M mask of g (..., M, B), groups along axis -2 (jit-safe; leading
  axes, vmapped ones included, are groups too)."""
  m = g.shape[-2]
  k = min(n, m - n)
  parallel = g.size >= PARALLEL_ELEMENTS
  call = jax.ffi.ffi_call(
      target(k, n == k, jnp.dtype(g.dtype).name, parallel),
      jax.ShapeDtypeStruct(g.shape, jnp.bool_), vmap_method='expand_dims')
  return call(g)
