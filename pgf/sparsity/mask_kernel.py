"""The CPU N:M mask kernels: one pass over the kernel, in vector registers.

Two uses, both XLA FFI custom calls compiled by numba, on a single CPU
device, for groups along a major axis: the kernel seen as (A, M, B), groups
of M along the middle axis, B a multiple of LANES (a Dense kernel [in, out]
grouped along `in`, the default: A = in / M, B = out).

* `mask`: the bool mask, which `nm_mask` takes instead of its XLA
  formulation where it was measured faster (`masks._kernel_applies`).
* `kernel_and_bits`: what the forward pass of a sparse layer needs from its
  kernel w, in one pass: w_eff = w * (mask ? 1 : alpha) and the mask packed
  as bits (`core.pack_mask`'s layout), which `core.kernel_and_bits` takes
  for float32 kernels (`core._fused_pack`). XLA's route writes a bool mask,
  reads it back to pack it, and reads the kernel again for w_eff.
* `refill`: SR-STE's gradient g + lambda (1 - mask) w in one pass over w
  and g (`core.srste_gradient`, which `transforms.srste_refill` applies).

Same results bit for bit; see `nm_mask` for the rule.

Every exact mask made of XLA ops needs two passes over memory (a loop fusion
computes each output element alone, so a group's result is stored and then
read back per weight). These kernels take a strip of LANES * U columns of
one group at a time: they stream the group's M rows through registers once,
keeping per column the K = min(N, M - N) best magnitude keys so far (a
sorted list of K rounded up to a power of two, S: each chunk of S rows is
sorted by Batcher's network and merged into it by a bitonic merge; the
first chunk is the list, and where K = S the last one is not merged, only
its bitonic list's worst key taken), then write the strip's outputs while
the rows are still in L1 (for K = 1 they keep the index of the best key and
only write; the mask of groups of 64 rows and more at 1 < K <= 16 runs the
selection a phase of rows at a time over a block of strips,
`_PHASED_DRIVER_SOURCE`). Keys are the IEEE bits of |w| (inf and NaN capped
at the largest finite value), as in `nm_mask`; for K > 1 the lists hold the
magnitudes uncapped and T is capped once at the end (the K-th of the capped
keys is the capped K-th magnitude), and the first write pass compares
magnitudes with T, so only a group written again for ties caps its rows (on
one core, 768x3072, 2026-12-07: 8:256 0.53 instead of 0.56 ns a weight,
8:16 0.28 / 0.31, 8:64 and 8:128 3-4 % less, 32:64 the same). Ties keep the
lower index: the write pass takes the keys at least as good as the K-th, T,
and counts them; only a group where a column took more than K (keys equal
to T past the K-th) is written again, keeping the first equal ones
(dropping the last, when K counts dropped weights). On one core of the
2-core Xeon (768x3072, `mask`, 2026-12-07, interleaved with the kernels
before), 16:32 took 0.37 instead of 0.49 ns a weight, 8:16 0.28 / 0.35, 2:4
0.21 / 0.25, 8:256 0.52 / 0.59, 8:64 and 8:128 as before (0.35-0.41).

The vectors are LLVM's generic vector types (`<16 x i32>`), so the kernels
are portable: the compiler splits them to the CPU's registers (one AVX-512
register, two AVX2 ones). Strips run in parallel (numba prange) from
PARALLEL_ELEMENTS weights. (Running them on XLA's own intra-op thread pool,
through the FFI's ThreadPool_Schedule, was tried on 2026-12-07 and was no
faster: 0.40 vs 0.40-0.43 ms on a 768x2048 kernel, 71-76 vs 56-68 ms on
T5-Base's 72 FF kernels, 2-core Xeon.)

numba runs prange loops on TBB where the `tbb` package is installed (a
dependency of pgf on Linux x86-64 and Windows), else on OpenMP. The pool's
threads sleep between calls, and waking them is most of a call's time on
small kernels: with OpenMP, whose fork and join waits for every thread, a
call on a 64x512 kernel took 59-80 us instead of 3 us serial (passive
waits, as set below), a 768x768 one 0.09-0.14 ms. TBB's caller takes on
the strips while the others wake: 9-11 us and 0.04 ms, 768x3072 at 1:16
0.23 instead of 0.32-0.34 ms (2-core Xeon VM, 2026-12-08, `_driver` called
back to back or 30-200 us apart). Letting OpenMP's threads spin instead
(GOMP_SPINCOUNT=10000) was as fast alone but, with two processes on the
two cores, took 258 us a call on the 64x512 kernel against 8 with passive
waits or TBB.
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
import numpy as np  # noqa: E402

from pgf import numba_ffi  # noqa: E402
from pgf.sparsity import masks  # noqa: E402

LANES = 16        # Columns per vector (32-bit lanes of a 512-bit vector).
# K -> vectors per strip: as many independent chains per row as the
# registers hold beside the lists. Wider strips read longer runs of each
# row: at 1:16 on a 768x2048 kernel, one thread, 0.33-0.35 ns per weight
# for w_eff and bits with 8 vectors against 0.47-0.48 with 1 (2-core Xeon,
# 2026-12-07; 2 and 4 vectors in between).
UNROLL = {1: 8, 2: 8, 3: 4, 4: 4, **{k: 2 for k in range(5, 9)},
          **{k: 1 for k in range(9, 17)}}
# Weights from which strips run on all cores (below, waking the pool cost
# more than it saved): w_eff and bits of a 192x768 kernel took 63-81 us
# serial and 102-110 us on both cores, of 384x768 173-248 and 167-231 us,
# of 384x1536 293-508 and 261-397 us (min over 9 interleaved samples, 1:8
# and 4:32, 2-core Xeon, 2026-12-07).
PARALLEL_ELEMENTS = 1 << 18
# Strips ahead whose rows are prefetched into L2 before a strip is taken. A
# strip reads u * 64 bytes from each of its group's M rows, one row of the
# kernel apart: at M = 64 that is 64 streams at a 3-8 KB stride, more than
# the hardware prefetchers follow, so kernels coming from memory (a step's)
# waited on every row. Over T5-Base's 72 FF kernels (113 M weights, each
# call writing over its last results; `python experiments/bench/
# ff_passes.py --pattern=P [--no_prefetch]`, min of 5, 2-core Xeon,
# 2026-12-07), w_eff and bits took 68 instead of 121 ms at 8:64, 50 / 60
# at 4:32, 54 / 74 at 2:4, 51 / 56 at 1:16; SR-STE's refill 95 / 125, 66 /
# 98, 65 / 75, and 69 / 65 at 1:16. On one kernel called again and again
# (in cache: 768x3072 and 3072x768; 1:8, 2:4, 4:32, 8:64, 1:32, min of 40
# calls, two alternating runs each) times moved within the runs' spread,
# but w_eff and bits at 8:64 on 768x3072 took 0.80-0.85 ms against 0.75.
# 1, 2 and 4 strips ahead were within 5 % of each other at 8:64;
# prefetching the outputs' lines for writing as well was 10 % slower.
PREFETCH_AHEAD = 2
# K > 1 up to PHASED_K, groups of PHASE_FROM rows and more: the selection a
# phase of rows at a time over a block of strips (_PHASED_DRIVER_SOURCE).
PHASED_K = 16
PHASE_FROM = 64
PHASE_ROWS = 32
BLOCK_GROUP_BYTES = 1 << 19

# dtype -> (bits per weight, magnitude bits, cap): the keys of `nm_mask`
# (the cap: the largest finite value's bits for float32, the infinity's for
# 16-bit floats).
_DTYPES = {
    'float32': (32, 0x7FFFFFFF, masks._F32_MAX_BITS),
    **{dtype.name: (16, 0x7FFF, cap)
       for dtype, cap in masks._HALF_INF_BITS.items()},
}


# Outputs of a strip pass: the bool mask ('mask'), or w_eff with the mask's
# bits packed along rows ('rows': 32 rows of a column to a word) or along
# columns ('cols': 32 columns of a row to a word), as `core.pack_mask` lays
# them out.
OUTPUTS = ('mask', 'rows', 'cols', 'refill')


@numba.extending.intrinsic
def _prefetch(typingctx, addr):
  """Asks the CPU to bring the cache line at `addr` (an int64 address) into
  L2 (llvm.prefetch: a read, locality 2, the data cache)."""
  del typingctx

  def codegen(context, builder, signature, args):
    del signature
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p] + [i32] * 3),
        'llvm.prefetch.p0')
    builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0),
                      ir.Constant(i32, 2), ir.Constant(i32, 1)])
    return context.get_dummy_value()
  return numba.types.void(numba.types.int64), codegen


@numba.njit(inline='always')
def _prefetch_rows(addr, rows, stride, nbytes):
  """Prefetches `nbytes` from `addr` in each of `rows` rows `stride` bytes
  apart."""
  for r in range(rows):
    for j in range(0, nbytes, 64):
      _prefetch(addr + r * stride + j)


def _strip_pass(k: int, top: bool, u: int, dtype: str, out: str,
                phase: str | None = None):
  """An intrinsic: strip(wa, oa, ba, m, ws, os, bs, count, alpha), addresses
  and strides (bytes) as int64, alpha float32: the output of u * LANES
  columns of `count` consecutive groups of m rows.

  out 'mask': the bool mask at oa (row stride os; ba, bs, alpha unused).
  out 'rows' / 'cols' (float32): w_eff = w * (mask ? 1 : alpha) at oa (row
  stride os) and the mask's bits at ba: 'rows', word row (r // 32) at
  ba + (r // 32) * bs, bit r % 32 (the block of count groups starts a word);
  'cols', row r's 16-bit halves at ba + r * bs + 2 v (v: the strip's
  vector; the strip starts at a multiple of 16 columns, ba points to its
  first half).
  out 'refill' (float32): SR-STE's gradient g + (mask ? 0 : alpha w) at oa
  (row stride os), g at ba (row stride bs), alpha = lambda; top K may write
  over g (oa = ba: one write pass with the tie rule, see `_group`).

  phase 'select' / 'finish' (K > 1, count 1): three more arguments, row0,
  row1 and saved (the address of the strip's lists): 'select' merges the
  rows [row0, row1) into the lists at saved (row0 0: starts them) and
  writes nothing; 'finish' takes the lists from saved and does the rest
  (`_group`)."""
  bits, magnitude, cap = _DTYPES[dtype]
  fused = out != 'mask'
  assert out in OUTPUTS and (not fused or dtype == 'float32')

  i64 = numba.types.int64
  sig = numba.types.void(*[i64] * 8, numba.types.float32,
                         *([i64] * 3 if phase else []))

  def emit(builder, args):
    wa, oa, ba, m, ws, os_, bs, count, alpha = args[:9]
    phase_args = args[9:]
    word = ir.IntType(64)
    ivec = ir.VectorType(ir.IntType(32), LANES)
    fvec = ir.VectorType(ir.FloatType(), LANES)
    lvec = ir.VectorType(ir.IntType(bits), LANES)
    bvec = ir.VectorType(ir.IntType(8), LANES)
    splat = lambda v: ir.Constant(ivec, [v] * LANES)
    const = lambda v: ir.Constant(word, v)

    def smax(a, b):
      return builder.select(builder.icmp_signed('>', a, b), a, b)

    def smin(a, b):
      return builder.select(builder.icmp_signed('<', a, b), a, b)

    def state(init):
      slots = []
      for _ in range(u):
        slot = cgutils.alloca_once(builder, ivec)
        builder.store(splat(init), slot)
        slots.append(slot)
      return slots

    def ptr(base, stride, r, offset, ty):
      addr = builder.add(builder.add(base, builder.mul(stride, r)),
                         const(offset))
      return builder.inttoptr(addr, ty.as_pointer())

    def raw(base, r):
      """The u vectors of row r of the group at `base`, as loaded."""
      return [builder.load(ptr(base, ws, r, v * LANES * bits // 8, lvec),
                           align=bits // 8) for v in range(u)]

    def magnitude_bits(x):
      if bits != 32:
        x = builder.zext(x, ivec)
      return builder.and_(x, splat(magnitude))

    def key(x):
      return smin(magnitude_bits(x), splat(cap))

    def keys(base, r, capped=True):
      return [(key if capped else magnitude_bits)(x) for x in raw(base, r)]

    acc = []   # 'rows': the bits of the word being filled, per vector.
    if fused:
      scale = builder.insert_element(ir.Constant(fvec, ir.Undefined),
                                     alpha, ir.Constant(ir.IntType(32), 0))
      scale = builder.shuffle_vector(scale, ir.Constant(fvec, ir.Undefined),
                                     ir.Constant(ivec, [0] * LANES))
      if out == 'rows':
        acc = state(0)
      # Rows are visited in order, except where ties drop the last equal
      # keys (K > 1, bottom); a word of 'rows' bits is stored after the
      # last of its rows visited.
      backward = k > 1 and not top
      if backward:
        at32 = builder.icmp_unsigned('>=', m, const(32))
        last = builder.select(at32, const(0), builder.sub(const(32), m))
      else:
        last = const(31)

    def write(block_row, obase, r, xs, flags):
      """Writes row r of the group at obase (block row `block_row`)."""
      if not fused:
        for v in range(u):
          builder.store(builder.zext(flags[v], bvec),
                        ptr(obase, os_, r, v * LANES, bvec), align=1)
        return
      if out == 'refill':   # g + (mask ? 0 : lambda w), as srste_refill.
        zero = ir.Constant(fvec, [0.0] * LANES)
        for v in range(u):
          g = builder.load(ptr(ba, bs, block_row, v * LANES * 4, fvec),
                           align=4)
          x = builder.fmul(scale, builder.bitcast(xs[v], fvec))
          builder.store(builder.fadd(g, builder.select(flags[v], zero, x)),
                        ptr(obase, os_, r, v * LANES * 4, fvec), align=4)
        return
      for v in range(u):   # Kept weights as they are (no product by 1).
        x = builder.bitcast(xs[v], fvec)
        builder.store(builder.select(flags[v], x, builder.fmul(x, scale)),
                      ptr(obase, os_, r, v * LANES * 4, fvec), align=4)
      if out == 'cols':
        half = ir.IntType(LANES)
        for v in range(u):
          builder.store(builder.bitcast(flags[v], half),
                        ptr(ba, bs, block_row, 2 * v, half), align=2)
        return
      pos = builder.and_(block_row, const(31))
      bit = _splat(builder, builder.shl(const(1), pos))
      for v in range(u):
        held = builder.load(acc[v])
        builder.store(builder.select(flags[v], builder.or_(held, bit),
                                     held), acc[v])
      with builder.if_then(builder.icmp_unsigned('==', pos, last)):
        wrow = builder.lshr(block_row, const(5))
        for v in range(u):
          builder.store(builder.load(acc[v]),
                        ptr(ba, bs, wrow, v * LANES * 4, ivec), align=4)
          builder.store(splat(0), acc[v])

    def held_bits():
      return [builder.load(a) for a in acc]

    def restore_bits(held):
      for slot, h in zip(acc, held):
        builder.store(h, slot)

    with cgutils.for_range(builder, count) as group:
      first = builder.mul(group.index, m)
      base = builder.add(wa, builder.mul(ws, first))
      obase = builder.add(oa, builder.mul(os_, first))
      _group(builder, k, top, u, m, base, obase, first, raw, key, keys,
             magnitude_bits, cap, write, held_bits, restore_bits, state,
             smax, smin, splat, const, ivec, once=out == 'refill' and top,
             phase=phase, phase_args=phase_args)

  def codegen(context, builder, signature, args):
    del signature
    emit(builder, args)
    return context.get_dummy_value()

  if phase:
    @numba.extending.intrinsic
    def phased_strip(typingctx, wa, oa, ba, m, ws, os_, bs, count, alpha, row0,
                     row1, saved):
      del typingctx
      return sig, codegen
    return phased_strip

  @numba.extending.intrinsic
  def strip(typingctx, wa, oa, ba, m, ws, os_, bs, count, alpha):
    del typingctx
    return sig, codegen

  return strip


def _group(builder, k, top, u, m, base, obase, first, raw, key, keys,
           magnitude_bits, cap, write, held_bits, restore_bits, state, smax,
           smin, splat, const, ivec, once=False, phase=None, phase_args=()):
  """The selection and the write pass of one group of m rows (held_bits
  and restore_bits: the 'rows' bits not yet stored, read and put back);
  or, by `phase` (see `_strip_pass`), the selection's merges of rows
  [row0, row1) into lists kept at an address, or the rest from them.
  `once`: the write pass applies the tie rule from the start and never
  writes a group twice (top K only), so an output written over its input
  (SR-STE's refill over g) reads each input row before writing it."""
  if k == 1:
    best = state(-1 if top else 0x7FFFFFFF)
    at = state(0)
    with cgutils.for_range(builder, m) as loop:
      rv = _splat(builder, loop.index)
      for v, x in enumerate(keys(base, loop.index)):
        b = builder.load(best[v])
        take = builder.icmp_signed('>' if top else '<=', x, b)
        builder.store(builder.select(take, x, b), best[v])
        builder.store(builder.select(take, rv, builder.load(at[v])), at[v])
    with cgutils.for_range(builder, m) as loop:
      rv = _splat(builder, loop.index)
      flags = []
      for v in range(u):
        hit = builder.icmp_signed('==', builder.load(at[v]), rv)
        flags.append(hit if top else builder.not_(hit))
      xs = raw(base, loop.index)
      write(builder.add(first, loop.index), obase, loop.index, xs, flags)
    return

  # The best `size` keys so far, sorted (size: K rounded up to a power of
  # two): the first chunk of `size` rows, sorted by Batcher's network, then
  # each further sorted chunk merged into it. Where K = size and the chunks
  # cover the group, the last chunk is not merged: the K-th key T is the
  # worst of the bitonic list its merge would sort.
  size = _list_size(k)
  lists = [state(0) for _ in range(size)]   # The first chunk fills them.
  better, worse = (smax, smin) if top else (smin, smax)
  thresh, need = state(0), state(0)

  def sorted_chunk(start):
    rows = [keys(base, builder.add(start, const(j)), capped=False)
            for j in range(size)]
    chunks = []
    for v in range(u):
      xs = [rows[j][v] for j in range(size)]
      for i, j in masks._odd_even_merge_sort(size):
        xs[i], xs[j] = better(xs[i], xs[j]), worse(xs[i], xs[j])
      chunks.append(xs)
    return chunks

  def bitonic(chunk, v):
    # Both sorted: the better of held[i] and chunk[size-1-i] are the best
    # `size` of the two, a bitonic list.
    return [better(builder.load(lists[i][v]), chunk[size - 1 - i])
            for i in range(size)]

  def merge(chunk, v):
    xs = bitonic(chunk, v)
    for i, j in masks._half_cleaners(size):     # Sorts the bitonic list.
      xs[i], xs[j] = better(xs[i], xs[j]), worse(xs[i], xs[j])
    for i in range(size):
      builder.store(xs[i], lists[i][v])

  def count_better(xs, t):
    """K minus how many of the keys xs beat t: the ties with t to keep
    (xs uncapped, t capped: none beats the cap)."""
    n = splat(k)
    for x in xs:
      past = builder.icmp_signed('>' if top else '<', x, t)
      n = builder.sub(n, builder.zext(past, ivec))
    if top:
      n = builder.select(builder.icmp_signed('==', t, splat(cap)), splat(k), n)
    return n

  def capped(t):
    return smin(t, splat(cap))

  def start_lists():
    for v, xs in enumerate(sorted_chunk(const(0))):
      for i in range(size):
        builder.store(xs[i], lists[i][v])

  def merge_rows(row0, row1):   # Whole chunks.
    n = builder.udiv(builder.sub(row1, row0), const(size))
    with cgutils.for_range(builder, n) as loop:
      start = builder.add(row0, builder.mul(loop.index, const(size)))
      for v, xs in enumerate(sorted_chunk(start)):
        merge(xs, v)

  def saved_lists(saved):   # (kept, saved) pointer pairs.
    for i in range(size):
      for v in range(u):
        at = builder.add(saved, const((i * u + v) * LANES * 4))
        yield lists[i][v], builder.inttoptr(at, ivec.as_pointer())

  def load_lists(saved):
    for kept, at in saved_lists(saved):
      builder.store(builder.load(at, align=4), kept)

  if phase == 'select':
    row0, row1, saved = phase_args
    starting = builder.icmp_unsigned('==', row0, const(0))
    with builder.if_else(starting) as (start, going_on):
      with start:
        start_lists()
      with going_on:
        load_lists(saved)
    merge_rows(builder.select(starting, const(size), row0), row1)
    for kept, at in saved_lists(saved):
      builder.store(builder.load(kept), at, align=4)
    return

  chunks = builder.udiv(m, const(size))
  rest = builder.sub(m, builder.mul(chunks, const(size)))
  whole = builder.icmp_unsigned('==', rest, const(0))
  if phase == 'finish':
    load_lists(phase_args[2])
  else:
    start_lists()
    merged = builder.sub(chunks, const(1))
    if k == size:   # The last chunk is read apart when there is no rest.
      merged = builder.sub(merged, builder.zext(whole, merged.type))
    merge_rows(const(size), builder.mul(builder.add(merged, const(1)),
                                        const(size)))

  def from_lists():
    # Rows past the last whole chunk (M not a multiple of size): inserted
    # one by one.
    with cgutils.for_range(builder, rest) as loop:
      r = builder.add(builder.mul(chunks, const(size)), loop.index)
      for v, x in enumerate(keys(base, r, capped=False)):
        for i in range(size):
          held = builder.load(lists[i][v])
          builder.store(better(held, x), lists[i][v])
          x = worse(held, x)
    for v in range(u):
      t = capped(builder.load(lists[k - 1][v]))
      builder.store(t, thresh[v])
      builder.store(count_better(
          [builder.load(lists[i][v]) for i in range(k - 1)], t), need[v])

  if k != size:
    from_lists()
  else:
    with builder.if_else(whole) as (last_chunk, otherwise):
      with last_chunk:
        start = builder.mul(builder.sub(chunks, const(1)), const(size))
        for v, chunk in enumerate(sorted_chunk(start)):
          xs = bitonic(chunk, v)
          t = xs[0]
          for x in xs[1:]:
            t = worse(t, x)
          t = capped(t)
          builder.store(t, thresh[v])
          builder.store(count_better(xs, t), need[v])
      with otherwise:
        from_lists()
  thresh = [builder.load(t) for t in thresh]
  need = [builder.load(n) for n in need]
  # The first write pass compares the uncapped keys: a key at least as
  # good as T is a magnitude >= T (T <= cap), and at most as good one a
  # magnitude <= T, or any where T is the cap.
  first_bound = thresh if top else [
      builder.select(builder.icmp_signed('==', t, splat(cap)),
                     splat(0x7FFFFFFF), t) for t in thresh]
  # The write pass, first taking every key at least as good as T (kept, or
  # dropped when K counts dropped keys) and counting them; where a column
  # took more than K (keys past the K-th equal to T), the group is written
  # again, taking the first equal keys (top) or dropping the last (bottom).
  # Rows are visited in the same order both times (bottom: backward).
  taken = state(0)
  seen = state(0)
  bits = held_bits()

  def write_pass(ties):
    with cgutils.for_range(builder, m) as loop:
      r = loop.index if top else builder.sub(builder.sub(m, const(1)),
                                             loop.index)
      xs = raw(base, r)
      flags = []
      for v, raw_x in enumerate(xs):
        if ties:
          x = key(raw_x)
          s = builder.load(seen[v])
          tie = builder.and_(builder.icmp_signed('==', x, thresh[v]),
                             builder.icmp_signed('<', s, need[v]))
          builder.store(builder.add(s, builder.zext(tie, ivec)), seen[v])
          past = builder.icmp_signed('>' if top else '<', x, thresh[v])
          chosen = builder.or_(past, tie)
        else:
          chosen = builder.icmp_signed('>=' if top else '<=',
                                       magnitude_bits(raw_x), first_bound[v])
          c = builder.load(taken[v])
          builder.store(builder.add(c, builder.zext(chosen, ivec)), taken[v])
        flags.append(chosen if top else builder.not_(chosen))
      write(builder.add(first, r), obase, r, xs, flags)

  if once:
    write_pass(True)
    return
  write_pass(False)
  over = ir.Constant(ir.IntType(LANES), 0)
  for v in range(u):
    more = builder.icmp_signed('!=', builder.load(taken[v]), splat(k))
    over = builder.or_(over, builder.bitcast(more, over.type))
  with builder.if_then(builder.icmp_unsigned('!=', over, over.type(0)),
                       likely=False):
    restore_bits(bits)
    write_pass(True)


def _splat(builder, r):
  """A vector of LANES copies of the int64 r, as int32."""
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
    if s + {ahead} < wide:
      _prefetch_rows(wa + (off + {ahead} * {width}) * {size}, m, b * {size},
                     {width} * {size})
    if s < wide:
      _wide(wa + off * {size}, ma + off, 0, m, b * {size}, b, 0, 1, 0.0)
    else:
      _narrow(wa + off * {size}, ma + off, 0, m, b * {size}, b, 0, 1, 0.0)
'''

# The mask of 1 < K <= PHASED_K, groups of PHASE_FROM rows and more (more
# than one phase): a block of strips (BLOCK_GROUP_BYTES of the group: 4 KB
# of each row at M = 128, float32) at a time, the selection PHASE_ROWS rows
# at a time over every strip of the block (the strips' lists kept in memory
# between phases), then each strip's write pass. A strip alone reads its
# group's M rows 64 or 128 bytes at a time, M streams at once, more than the
# hardware prefetchers follow (on one core of the 2-core Xeon, 768x3072: the
# K = 1 kernel took 0.11-0.13 ns a weight at every M from a kernel in L2,
# 0.22 at 1:16 and 0.33 at 1:256 from L3); a phase reads PHASE_ROWS rows a
# whole block at a time, and the write passes find the block in L2. Measured
# against the strips alone (768x3072, min of 7 interleaved samples,
# 2026-12-07): one core, 8:128 0.37 instead of 0.41 ns a weight, 8:256 0.47
# / 0.53, 8:64 0.35 / 0.36; both cores, 8:128 0.23 / 0.26, 8:256 and 8:64
# within 5 %. Not for K = 32 (32 lists to keep: 32:128 took 0.80 instead of
# 0.64). Blocks of 4 KB a row at every M took 0.27 instead of 0.24 ns a
# weight at 8:256 on both cores. The fused outputs' driver phased the same
# way (tried 2026-12-08) was no faster: w_eff and bits over T5-Base's 72 FF
# kernels (`experiments/bench/ff_passes.py`, min of 5, two alternating runs
# each) took 57-60 against 54-56 ms at 8:64 and 106-112 against 110-111 at
# 8:256.
_PHASED_DRIVER_SOURCE = '''
def {name}(wa, ma, groups, m, b):
  """The mask of a (groups, m, b) kernel at wa into ma (addresses)."""
  chunks = m // {chunk}
  end = (chunks - ({chunk} == {k} and m == chunks * {chunk})) * {chunk}
  if m < {phase_from} or end <= {phase_rows}:
    _whole(wa, ma, groups, m, b)
    return
  wide = b // {width}
  block = max(1, {block_group_bytes} // (m * {width} * {size}))
  blocks = (wide + block - 1) // block
  per = blocks + (b - wide * {width}) // {lanes}
  for item in {loop}(groups * per):
    g = item // per
    s = item - g * per
    if s >= blocks:
      off = g * m * b + wide * {width} + (s - blocks) * {lanes}
      _narrow(wa + off * {size}, ma + off, 0, m, b * {size}, b, 0, 1, 0.0)
      continue
    first = s * block
    n = min(block, wide - first)
    lists = np.empty(n * {list_words}, np.int32)
    la = lists.ctypes.data
    off = g * m * b + first * {width}
    for r0 in range(0, end, {phase_rows}):
      r1 = min(r0 + {phase_rows}, end)
      for t in range(n):
        _select(wa + (off + t * {width}) * {size}, 0, 0, m, b * {size}, 0, 0,
                1, 0.0, r0, r1, la + t * {list_words} * 4)
    for t in range(n):
      at = off + t * {width}
      _finish(wa + at * {size}, ma + at, 0, m, b * {size}, b, 0, 1, 0.0, 0, 0,
              la + t * {list_words} * 4)
'''

_SCALAR_DRIVER_SOURCE = '''
def {name}(wa, oa, ba, aa, na, rows, m, b, rows_per_kernel):
  """A (rows / m, m, b) float32 kernel at wa: w_eff into oa and bits into ba
  ('rows', 'cols'), or SR-STE's gradient into oa from the gradient at ba
  ('refill'); alpha (lambda) at aa: na values, one per kernel of
  rows_per_kernel rows."""
  alphas = numba.carray(_as_f32(aa), na)
  block = 32 if '{out}' == 'rows' and m < 32 else m   # rows per call
  count = block // m
  wide = b // {width}
  per = wide + (b - wide * {width}) // {lanes}
  words = b // 32
  for item in {loop}((rows // block) * per):
    blk = item // per
    s = item - blk * per
    col = s * {width} if s < wide else wide * {width} + (s - wide) * {lanes}
    row = blk * block
    alpha = alphas[(row // rows_per_kernel) % na]
    off = (row * b + col) * 4
    if '{out}' == 'cols':
      bits = ba + (row * words + col // 32) * 4 + (col % 32) // 16 * 2
      stride = words * 4
    elif '{out}' == 'rows':
      bits = ba + ((row // 32) * b + col) * 4
      stride = b * 4
    else:
      bits = ba + off
      stride = b * 4
    if s + {ahead} < wide:
      _prefetch_rows(wa + off + {ahead} * {width} * 4, block, b * 4,
                     {width} * 4)
      if '{out}' == 'refill':
        _prefetch_rows(ba + off + {ahead} * {width} * 4, block, b * 4,
                       {width} * 4)
    if s < wide:
      _wide(wa + off, oa + off, bits, m, b * 4, b * 4, stride, count, alpha)
    else:
      _narrow(wa + off, oa + off, bits, m, b * 4, b * 4, stride, count, alpha)
'''


def _list_size(k: int) -> int:
  """The length of a strip's lists (and chunks) for K > 1: K rounded up to
  a power of two."""
  return 1 << (k - 1).bit_length()


def _unroll(k: int) -> int:
  """Vectors per strip: as many as the registers hold with the lists."""
  return UNROLL[min(k, 16)]


@functools.cache
def _driver(k: int, top: bool, dtype: str, parallel: bool):
  name = (f'_mask_{dtype}_k{k}_{"top" if top else "bottom"}_'
          f'{"parallel" if parallel else "serial"}')
  size = _DTYPES[dtype][0] // 8
  if not 1 < k <= PHASED_K:
    return _compile_driver(name, _DRIVER_SOURCE, 5, k, top, dtype, 'mask',
                           parallel, size=size)
  u = _unroll(k)
  chunk = _list_size(k)
  whole = _compile_driver(name + '_whole', _DRIVER_SOURCE, 5, k, top, dtype,
                          'mask', parallel, size=size)
  return _compile_driver(
      name, _PHASED_DRIVER_SOURCE, 5, k, top, dtype, 'mask', parallel,
      size=size, chunk=chunk, phase_from=PHASE_FROM,
      phase_rows=max(PHASE_ROWS, chunk),
      block_group_bytes=BLOCK_GROUP_BYTES, list_words=chunk * u * LANES,
      whole=whole)


@functools.cache
def _scalar_driver(k: int, top: bool, out: str, parallel: bool):
  name = (f'_{out}_k{k}_{"top" if top else "bottom"}_'
          f'{"parallel" if parallel else "serial"}')
  return _compile_driver(name, _SCALAR_DRIVER_SOURCE, 9, k, top, 'float32',
                         out, parallel)


def _compile_driver(name, template, nargs, k, top, dtype, out, parallel,
                    whole=None, **fields):
  """The driver `name` from `template`: int64 arguments, its strips the
  strip passes of (k, top, dtype, out), wide and narrow."""
  u = _unroll(k)
  namespace = {'_wide': _strip_pass(k, top, u, dtype, out),
               '_narrow': _strip_pass(k, top, 1, dtype, out),
               '_as_f32': numba_ffi.as_f32, '_prefetch_rows': _prefetch_rows,
               'numba': numba, 'np': np, '__name__': __name__}
  if whole is not None:   # A phased template: `whole` takes the rest.
    namespace['_whole'] = whole
    namespace['_select'] = _strip_pass(k, top, u, dtype, out, 'select')
    namespace['_finish'] = _strip_pass(k, top, u, dtype, out, 'finish')
  name += _tag(k)
  source = template.format(
      name=name, width=u * LANES, lanes=LANES, out=out, k=k,
      loop='numba.prange' if parallel else 'range', ahead=PREFETCH_AHEAD,
      **fields)
  exec(compile(source, __file__, 'exec'), namespace)  # noqa: S102
  i64 = numba.types.int64
  return numba.njit(numba.void(*[i64] * nargs), parallel=parallel,
                    nogil=True, cache=True)(namespace[name])


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

# The handler of the kernels with a scalar per kernel (alpha, lambda): the
# weights (argument 0), the scalars (argument `scalars`, one or one per
# leading index), the result (ret 0: w_eff, or SR-STE's gradient) and one
# more buffer (ret 1, the bits; or argument 1, the gradient, for 'refill').
_SCALAR_HANDLER_SOURCE = '''
def {name}(frame_ptr):
  frame = numba.carray(frame_ptr, 15)
  if _answered_metadata(frame):
    return 0
  wd, rank, dims = _buffer(frame, 5, 0)
  sd, srank, sdims = _buffer(frame, 5, {scalars})
  first = _buffer(frame, 10, 0)[0]
  second = _buffer(frame, {second}, 1)[0]
  shape = numba.carray(dims, rank)
  rows = 1
  for i in range(rank - 1):
    rows *= shape[i]
  count = 1
  for i in range(srank):
    count *= numba.carray(sdims, srank)[i]
  m = shape[rank - 2]
  _drive(wd, first, second, sd, count, rows, m, shape[rank - 1],
         shape[rank - 3] * m)
  return 0
'''


def _tag(k: int) -> str:
  """The compile-time constants of a driver (strip width, prefetch
  distance), for its name and its handler's: numba's disk cache keys a
  function by its name and bytecode, not by the constants in it, and a
  cached handler holds its driver's code; so a variant compiled with other
  values (a benchmark's A/B) must not share a name with the default."""
  return f'_w{_unroll(k) * LANES}_a{PREFETCH_AHEAD}'


@functools.cache
def target(k: int, top: bool, dtype: str, parallel: bool) -> str:
  """The FFI target name of a mask variant (compiled and registered once per
  process; numba caches the machine code on disk)."""
  name = (f'pgf_nm_mask_{dtype}_k{k}_{"top" if top else "bottom"}_'
          f'{"parallel" if parallel else "serial"}{_tag(k)}')
  return _register(name, _HANDLER_SOURCE, _driver(k, top, dtype, parallel))


@functools.cache
def fused_target(k: int, top: bool, pack: str, parallel: bool) -> str:
  """The FFI target name of a w_eff-and-bits variant (float32)."""
  name = (f'pgf_nm_fused_k{k}_{"top" if top else "bottom"}_{pack}_'
          f'{"parallel" if parallel else "serial"}{_tag(k)}')
  return _register(name, _SCALAR_HANDLER_SOURCE,
                   _scalar_driver(k, top, pack, parallel), scalars=1,
                   second=10)


@functools.cache
def refill_target(k: int, top: bool, parallel: bool) -> str:
  """The FFI target name of an SR-STE refill variant (float32)."""
  name = (f'pgf_nm_refill_k{k}_{"top" if top else "bottom"}_'
          f'{"parallel" if parallel else "serial"}{_tag(k)}')
  return _register(name, _SCALAR_HANDLER_SOURCE,
                   _scalar_driver(k, top, 'refill', parallel), scalars=2,
                   second=5)


def _register(name, source, drive, **fields):
  namespace = {'_drive': drive,
               '_answered_metadata': numba_ffi.answered_metadata,
               '_buffer': numba_ffi.buffer_dims,
               'numba': numba, '__name__': __name__}
  exec(compile(source.format(name='_' + name, **fields), __file__,  # noqa: S102
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


def fused_applies(g_shape, m: int, pack: str) -> bool:
  """Whether `kernel_and_bits` can take a (..., A, M, B) view whose bits are
  packed along `pack`: 'rows' needs words of 32 rows made of whole groups
  (M a multiple or a divisor of 32) and 32 | A * M; 'cols' needs 32 | B."""
  if len(g_shape) < 3 or g_shape[-1] % LANES:
    return False
  rows = g_shape[-3] * m
  if pack == 'cols':
    return g_shape[-1] % 32 == 0
  return (m % 32 == 0 or 32 % m == 0) and rows % 32 == 0


def kernel_and_bits(g: jax.Array, n: int, alpha: jax.Array, after: jax.Array,
                    pack: str) -> tuple[jax.Array, jax.Array]:
  """(w_eff, bits) of a float32 (..., A, M, B) view g, groups along axis -2:
  w_eff = g * (mask ? 1 : alpha) of g's shape, the mask's bits packed along
  'rows' ((..., A * M / 32, B)) or 'cols' ((..., A * M, B / 32)). `after`,
  a scalar, is only waited for: the call runs once it exists."""
  *lead, a, m, b = g.shape
  k = min(n, m - n)
  bits = (a * m // 32, b) if pack == 'rows' else (a * m, b // 32)
  call = jax.ffi.ffi_call(
      fused_target(k, n == k, pack, g.size >= PARALLEL_ELEMENTS),
      (jax.ShapeDtypeStruct(g.shape, jnp.float32),
       jax.ShapeDtypeStruct(tuple(lead) + bits, jnp.uint32)),
      vmap_method='broadcast_all')
  return call(g, jnp.asarray(alpha, jnp.float32),
              jnp.asarray(after).reshape(()))


def refill(g: jax.Array, w: jax.Array, n: int, lam: jax.Array,
           after: jax.Array | float = 0.0) -> jax.Array:
  """SR-STE's gradient g + lam * (1 - mask) * w of a float32 (..., A, M, B)
  view w (groups along axis -2) in one pass, in g's shape (any shape of
  w's row-major layout, such as the kernel's own: a reshape there would
  make XLA copy g before writing over it): `srste_refill` without the bool
  mask between its two passes.

  Where N <= M - N the result is written over g's buffer (an XLA
  input-output alias; the kernel reads each row of g before writing it and
  writes it once): in a step, whose gradients are temporaries, that saves
  a buffer and the reads for ownership of fresh lines. Where g is read
  elsewhere, XLA copies it first unless those reads come before the call:
  `after`, a scalar, is only waited for (as in `kernel_and_bits`); a
  function of g passed there (the step's gradient norm) is computed first
  and needs no copy."""
  m = w.shape[-2]
  k = min(n, m - n)
  call = jax.ffi.ffi_call(
      refill_target(k, n == k, w.size >= PARALLEL_ELEMENTS),
      jax.ShapeDtypeStruct(g.shape, jnp.float32), vmap_method='broadcast_all',
      input_output_aliases={1: 0} if n == k else None)
  return call(w, g, jnp.asarray(lam, jnp.float32),
              jnp.asarray(after).reshape(()))
