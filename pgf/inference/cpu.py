"""The CPU N:M matmul: numba kernels called by XLA as an FFI custom call.

`matmul` is a `jax.ffi.ffi_call` whose handler is a numba `cfunc` reading
XLA's call frame (xla/ffi/api/c_api.h): XLA passes its own buffers, so a
call costs about as much as any XLA op (pure_callback measured 40-130 us a
call here, copying the weights to NumPy each time: as long as the batch-1
kernel itself).

Layouts (built once by `layout`): for every output o, its J = G * N kept
weights in group order, `vals[o, j]` (float32) and their absolute input rows
`rows[o, j] = g * M + index` (uint32); J is padded to a multiple of 4 with
zero weights on row 0. Where this CPU has the lookup kernel for the pattern
(x86 with AVX2 or AVX-512; M in 2, 4, 8, 16, 32, 64), also that kernel's
layout: 5 more bytes per kept weight (13 in all, against 4 * M / N for the
dense float32 kernel: 32 at 1:8).

Three kernels:

* up to 12 or 16 rows (`lookup_rows`), where the weights have its layout:
  the lookup kernel (`pgf.inference.lookup`), which picks each kept
  weight's input from a window of the row held in vector registers by a
  lane permute.
* otherwise one row of x: a gather-dot per output, `sum_j vals[o, j] *
  x[rows[o, j]]`; LLVM vectorises it with AVX-512 gathers.
* tiles of 8, 16 or 32 rows: x is transposed to [K, tile] so each kept
  weight is a broadcast times one contiguous row of the tile, accumulated in
  tile registers (`_tile_source` writes the unrolled body). The kept-weight
  loop must not be loop-vectorised (LLVM would vectorise it with gathers,
  5-10x slower); the lanes are vectorised by the SLP vectoriser instead, so
  these kernels are compiled with numba's LOOP_VECTORIZE off and
  SLP_VECTORIZE on. Each output's kept weights run in blocks whose tile
  rows fit in L1, shared by a block of outputs (L1_FLOATS, OUT_BLOCK).

Past those rows (or without the lookup layout), rows split into full tiles
of 32 (parallel over tiles and output chunks, numba prange, from
PARALLEL_ROWS rows); a remainder of 2-8 rows takes a tile of 8, 9-16 one of
16, 17-31 a zero-padded tile of 32, a single row the gather kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

# libgomp's default wait policy (spin, then sleep) cost 4-8 ms per parallel
# region on the project's shared 2-core machine, against 6 us with
# 'passive'; read once when numba's OpenMP pool loads (first parallel call).
os.environ.setdefault('OMP_WAIT_POLICY', 'passive')

import numba  # noqa: E402  (after the environment above)

from pgf import numba_ffi  # noqa: E402
from pgf.inference import lookup  # noqa: E402

UNROLL = 4  # Kept weights per inner iteration; J is padded to a multiple.
# Floats of the x tile a block of kept weights may touch (32 KiB: L1d is
# 48 KiB on the Zen 5 this was tuned on) and outputs per block.
L1_FLOATS = 8192
OUT_BLOCK = 64
MIN_BLOCK = 32
# Row counts up to which the lookup kernel runs where the weights have its
# layout: LOOKUP_ROWS at densities N / M up to 1/16, LOOKUP_ROWS_DENSE above.
# On ViT-B's and T5-Base's FF shapes (Zen 4, 2 cores) it took, against the
# tiles: 0.1-0.2x at 1 row, 0.3-0.9x at 8; at 12 rows 0.3-1.0x (1:8, 2:8,
# 2:4); at 16 rows 0.5-1.4x at those densities, 0.6-0.9x at 1:16 and 1:32;
# at 24 rows 0.6-1.1x at 1:16 and 1:32.
LOOKUP_ROWS = 16
LOOKUP_ROWS_DENSE = 12
# Parallel work items per call (tiles x output chunks), enough to balance
# up to 16 threads. (numba.get_num_threads() inside a kernel would make it
# uncacheable: it compiles to a process-specific address.)
WORK_ITEMS = 16


@contextlib.contextmanager
def _vectorizer(*, loop: bool, slp: bool):
  """Numba reads these flags when it optimises a function it compiles."""
  old = numba.config.LOOP_VECTORIZE, numba.config.SLP_VECTORIZE
  numba.config.LOOP_VECTORIZE, numba.config.SLP_VECTORIZE = loop, slp
  try:
    yield
  finally:
    numba.config.LOOP_VECTORIZE, numba.config.SLP_VECTORIZE = old


def _tile_source(bt: int, name: str) -> str:
  """Source of `name(x, vals, rows, y, nchunks)`, a tile-{bt} kernel.

  x [R, K] float32, y [ceil(R / bt) * bt, O] float32 (rows past R get the
  products of zero rows). Work items (tile, output chunk) run in parallel.
  Indices are unsigned so numba emits no negative-index wraparound, which
  would stop the SLP vectoriser.
  """
  u = UNROLL
  lines = [
      f'def {name}(x, vals, rows, y, nchunks):',
      '  n_rows, k = x.shape',
      '  n_out, jp = vals.shape',
      f'  ntiles = (n_rows + {bt - 1}) // {bt}',
      f'  xt = np.zeros(ntiles * k * {bt}, np.float32)',
      '  for t in numba.prange(ntiles):',
      f'    for b in range(min({bt}, n_rows - t * {bt})):',
      f'      r = t * {bt} + b',
      '      for i in range(k):',
      f'        xt[(t * k + i) * {bt} + b] = x[r, i]',
      '  vf = vals.ravel()',
      '  rf = rows.ravel()',
      f'  yt = np.empty(ntiles * n_out * {bt}, np.float32)',
      # A block of jb_len kept weights of an output touches about
      # L1_FLOATS / bt rows of the tile (kept per row: jp / k): those rows
      # stay in L1 while OUT_BLOCK outputs use them; the accumulators go
      # through yt between blocks. Blocks under MIN_BLOCK kept weights cost
      # more in reloads than they save (measured): then one block.
      f'  jb_len = {L1_FLOATS // bt} * jp // k // {u} * {u}',
      f'  if jb_len < {MIN_BLOCK}:',
      '    jb_len = jp',
      '  for c in numba.prange(ntiles * nchunks):',
      '    t = c // nchunks',
      '    part = c % nchunks',
      f'    xo = np.uintp(t * k * {bt})',
      '    o_lo = part * n_out // nchunks',
      '    o_hi = (part + 1) * n_out // nchunks',
      f'    for ob in range(o_lo, o_hi, {OUT_BLOCK}):',
      f'      ob_end = min(ob + {OUT_BLOCK}, o_hi)',
      '      for jb in range(0, jp, jb_len):',
      '        je = min(jb + jb_len, jp)',
      '        for o in range(np.uintp(ob), np.uintp(ob_end)):',
      '          j0 = o * np.uintp(jp)',
      '          yo = (np.uintp(t) * np.uintp(n_out) + o) * '
      f'np.uintp({bt})',
      '          if jb == 0:',
  ]
  lines += [f'            a{b} = np.float32(0.0)' for b in range(bt)]
  lines.append('          else:')
  lines += [f'            a{b} = yt[yo + np.uintp({b})]' for b in range(bt)]
  lines.append('          for j in range(j0 + np.uintp(jb), j0 + np.uintp(je),'
               f' np.uintp({u})):')
  for i in range(u):
    lines.append(f'            w{i} = vf[j + np.uintp({i})]')
    lines.append(f'            r{i} = xo + np.uintp(rf[j + np.uintp({i})]) * '
                 f'np.uintp({bt})')
  for b in range(bt):
    terms = ' + '.join(f'w{i} * xt[r{i} + np.uintp({b})]' for i in range(u))
    lines.append(f'            a{b} += {terms}')
  # Consecutive stores: they seed the SLP vectoriser (strided ones do not).
  lines += [f'          yt[yo + np.uintp({b})] = a{b}' for b in range(bt)]
  lines += [
      '  for t in numba.prange(ntiles):',
      f'    for b in range({bt}):',
      '      for o in range(n_out):',
      f'        y[t * {bt} + b, o] = yt[(t * n_out + o) * {bt} + b]',
  ]
  return '\n'.join(lines) + '\n'


def _compile_tile(bt: int, *, parallel: bool):
  # Distinct names: numba's cache keys entries by name and signature.
  name = f'_tile{bt}_{"parallel" if parallel else "serial"}'
  namespace = {'np': np, 'numba': numba, '__name__': __name__}
  # The code object names this file so numba can cache the machine code
  # next to it (cache=True needs a source file; the index key includes the
  # generated bytecode, so a changed generator recompiles).
  exec(compile(_tile_source(bt, name), __file__, 'exec'),  # noqa: S102
       namespace)
  f32 = numba.float32[:, ::1]
  sig = numba.void(f32, f32, numba.uint32[:, ::1], f32, numba.int64)
  # An explicit signature compiles now, inside the flags' context.
  with _vectorizer(loop=False, slp=True):
    return numba.njit(sig, parallel=parallel, fastmath=True, nogil=True,
                      cache=True)(namespace[name])


@numba.njit(fastmath=True, nogil=True, cache=True)
def _gather_row(x, vals, rows, y):
  """y[o] = sum_j vals[o, j] * x[rows[o, j]] (loop-vectorised)."""
  n_out, jp = vals.shape
  for o in range(n_out):
    acc = np.float32(0.0)
    for j in range(jp):
      acc += vals[o, j] * x[rows[o, j]]
    y[o] = acc


# The tile kernels, compiled on first use (`_compile_tiles`); `_dispatch`
# calls them as globals, which numba reads when it compiles `_dispatch`.
_tile8 = _tile16 = _tile32 = _tile32_parallel = None
# Rows from which the tiles of 32 run on all cores: below, waking a second
# thread cost more than it saved on the shared 2-core machine (a 32-row
# tile took 0.28 ms on one thread, 0.36-0.46 ms on two).
PARALLEL_ROWS = 64


@numba.njit(nogil=True, cache=True)
def _dispatch(x, vals, rows, y):
  """Full tiles of 32 rows, then the remainder (module docstring)."""
  n_rows, n_out = x.shape[0], vals.shape[0]
  full = n_rows // 32 * 32
  if full >= PARALLEL_ROWS:
    # >= WORK_ITEMS parallel items (tiles x output chunks), >= 16 outputs.
    chunks = max(1, min(n_out // 16, -(-WORK_ITEMS // (full // 32))))
    _tile32_parallel(x[:full], vals, rows, y[:full], chunks)
  elif full:
    _tile32(x[:full], vals, rows, y[:full], 1)
  rest = n_rows - full
  if rest == 1:
    _gather_row(x[full], vals, rows, y[full])
  elif rest:
    bt = 8 if rest <= 8 else 16 if rest <= 16 else 32
    out = np.empty((bt, n_out), np.float32)
    if bt == 8:
      _tile8(x[full:], vals, rows, out, 1)
    elif bt == 16:
      _tile16(x[full:], vals, rows, out, 1)
    else:
      _tile32(x[full:], vals, rows, out, 1)
    y[full:] = out[:rest]


def _ffi_handler(frame_ptr):
  """XLA FFI handler (compiled as a cfunc by `_ffi_target`)."""
  # XLA_FFI_CallFrame (xla/ffi/api/c_api.h, x86-64): struct_size,
  # extension_start, api, ctx, stage, args (5 words), rets (5 words).
  frame = numba.carray(frame_ptr, 15)
  if numba_ffi.answered_metadata(frame):
    return 0
  xd, xs = numba_ffi.buffer(frame, 5, 0)
  vd, vs = numba_ffi.buffer(frame, 5, 1)
  rd, _ = numba_ffi.buffer(frame, 5, 2)
  yd, _ = numba_ffi.buffer(frame, 10, 0)
  _dispatch(numba.carray(numba_ffi.as_f32(xd), (xs[0], xs[1])),
            numba.carray(numba_ffi.as_f32(vd), (vs[0], vs[1])),
            numba.carray(numba_ffi.as_u32(rd), (vs[0], vs[1])),
            numba.carray(numba_ffi.as_f32(yd), (xs[0], vs[0])))
  return 0  # A null XLA_FFI_Error*: success.


# The lookup kernels (pgf.inference.lookup) for windows of 8 inputs and of
# 1, 2, 4 vectors of this CPU, compiled by `_lookup_target`; `_lookup_handler`
# calls them as globals.
_lookup8 = _lookup_t1 = _lookup_t2 = _lookup_t4 = None


def _lookup_handler(frame_ptr):
  """XLA FFI handler of the lookup kernel: x [R, K], vals and pos
  [W, kw, Op] -> y [R, Op] (zeroed, then accumulated); the window
  Wn = K / W picks the kernel."""
  frame = numba.carray(frame_ptr, 15)
  if numba_ffi.answered_metadata(frame):
    return 0
  xd, xs = numba_ffi.buffer(frame, 5, 0)
  vd, vs = numba_ffi.buffer(frame, 5, 1, 3)
  pd, _ = numba_ffi.buffer(frame, 5, 2, 3)
  yd, _ = numba_ffi.buffer(frame, 10, 0)
  numba.carray(numba_ffi.as_f32(yd), xs[0] * vs[2])[:] = 0.0
  wn = xs[1] // vs[0]
  if wn == 8:
    _lookup8(xd, xs[0], xs[1], pd, vd, vs[0], vs[1], vs[2], yd)
  elif wn == lookup.LANES:
    _lookup_t1(xd, xs[0], xs[1], pd, vd, vs[0], vs[1], vs[2], yd)
  elif wn == 2 * lookup.LANES:
    _lookup_t2(xd, xs[0], xs[1], pd, vd, vs[0], vs[1], vs[2], yd)
  else:
    _lookup_t4(xd, xs[0], xs[1], pd, vd, vs[0], vs[1], vs[2], yd)
  return 0


@functools.cache
def _compile_tiles() -> None:
  global _tile8, _tile16, _tile32, _tile32_parallel
  _tile8, _tile16, _tile32 = (_compile_tile(bt, parallel=False)
                              for bt in (8, 16, 32))
  _tile32_parallel = _compile_tile(32, parallel=True)


@functools.cache
def _ffi_target() -> str:
  """The gather and tile kernels' FFI target (compiled once per process)."""
  _compile_tiles()
  return numba_ffi.register('pgf_nm_matmul', _ffi_handler)


@functools.cache
def _lookup_target() -> str:
  """The lookup kernels' FFI target (compiled once per process)."""
  global _lookup8, _lookup_t1, _lookup_t2, _lookup_t4
  _lookup8 = lookup.kernel(8, 1)
  _lookup_t1, _lookup_t2, _lookup_t4 = (lookup.kernel(lookup.LANES, t)
                                        for t in (1, 2, 4))
  return numba_ffi.register('pgf_nm_lookup', _lookup_handler)


def run(x: np.ndarray, vals: np.ndarray, rows: np.ndarray,
        lvals: np.ndarray | None = None,
        lpos: np.ndarray | None = None) -> np.ndarray:
  """NumPy in, NumPy out: x [R, K] float32 -> y [R, O] float32, by the
  kernel `matmul` would choose."""
  if lvals is not None and x.shape[0] <= lookup_rows(x.shape[1], lvals):
    return lookup.run(x, lvals, lpos)[:, :vals.shape[0]]
  x = np.require(x, np.float32, ['C', 'W'])
  vals = np.require(vals, np.float32, ['C', 'W'])
  rows = np.require(rows, np.uint32, ['C', 'W'])
  y = np.empty((x.shape[0], vals.shape[0]), np.float32)
  if x.shape[0]:
    _compile_tiles()
    _dispatch(x, vals, rows, y)
  return y


def layout(values: jax.Array, indices: jax.Array, *, m: int
           ) -> tuple[jax.Array, ...]:
  """Export layout -> this kernel's.

  Args:
    values: [G, O, N] kept weights (output axes flattened).
    indices: [G, O, N] their in-group positions.
    m: the group length M.

  Returns:
    vals [O, Jp] float32 and rows [O, Jp] uint32, Jp = G * N rounded
    up to a multiple of UNROLL (the gather and tile kernels); then, where
    this CPU has the lookup kernel for M (`lookup.window_size`), its vals
    and pos [W, kw, Op] (for up to `lookup_rows` rows).
  """
  g, o, n = values.shape
  rows = (jnp.asarray(indices, jnp.int32)
          + (jnp.arange(g, dtype=jnp.int32) * m)[:, None, None])
  vals = jnp.moveaxis(jnp.asarray(values, jnp.float32), 0, 1).reshape(o, -1)
  rows = jnp.moveaxis(rows, 0, 1).reshape(o, -1)
  pad = -(g * n) % UNROLL
  vals = jnp.pad(vals, ((0, 0), (0, pad)))
  rows = jnp.pad(rows, ((0, 0), (0, pad)))
  data = (vals, rows.astype(jnp.uint32))
  wn = lookup.window_size(g * m, m)
  if wn is None:
    return data
  return data + lookup.layout(values, indices, m=m, wn=wn)


def lookup_rows(k: int, lvals) -> int:
  """The most rows the lookup kernel runs for a kernel contracting K with
  the lookup layout `lvals` [W, kw, Op] (density N / M = W * kw / K)."""
  n_win, kw, _ = lvals.shape
  return LOOKUP_ROWS if 16 * n_win * kw <= k else LOOKUP_ROWS_DENSE


def matmul(x: jax.Array, vals: jax.Array, rows: jax.Array,
           lvals: jax.Array | None = None,
           lpos: jax.Array | None = None) -> jax.Array:
  """x [R, K] @ the kernel of `layout` -> y [R, O] float32 (jit-safe): an
  XLA FFI custom call, so XLA hands the kernels its buffers directly. Up to
  `lookup_rows` rows (a static shape) take the lookup kernel where the
  weights have its layout, more rows the tiles."""
  x = x.astype(jnp.float32)
  if lvals is not None and x.shape[0] <= lookup_rows(x.shape[1], lvals):
    call = jax.ffi.ffi_call(
        _lookup_target(),
        jax.ShapeDtypeStruct((x.shape[0], lvals.shape[2]), jnp.float32),
        vmap_method='sequential')
    return call(x, lvals.astype(jnp.float32), lpos)[:, :vals.shape[0]]
  call = jax.ffi.ffi_call(
      _ffi_target(),
      jax.ShapeDtypeStruct((x.shape[0], vals.shape[0]), jnp.float32),
      vmap_method='sequential')
  return call(x, vals.astype(jnp.float32), rows)


def warm_up() -> None:
  """Compiles (or loads from numba's cache) every kernel, so no later call
  compiles."""
  _ffi_target()
  run(np.zeros((2, 8), np.float32), np.zeros((4, UNROLL), np.float32),
      np.zeros((4, UNROLL), np.uint32))
  if lookup.LANES is not None:
    _lookup_target()
