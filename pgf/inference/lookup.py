"""The small-batch CPU N:M matmul: kept inputs found by in-register lookups.

For a batch of a few rows the work is one multiply-add per kept weight, and
what costs is finding the input each weight multiplies. The gather kernel of
`pgf.inference.cpu` loads it from memory (an AVX-512 gather per 16 kept
weights); this kernel holds a window of Wn consecutive inputs of a row in
vector registers and picks them with a lane permute (`vpermps`: 16 lookups
in one instruction), vectorised over outputs:

  for each window w (inputs w*Wn .. w*Wn+Wn-1), for each of its kw kept
  weights per output, for each block of `lanes` outputs:
    y[r, block] += vals[w, j, block] * permute(x[r, window], pos[w, j, block])

Layout (`layout`): `vals` [W, kw, Op] float32 and `pos` [W, kw, Op] uint8,
the kept weights of every output in window order and their positions in the
window (0..Wn-1); Op is O rounded up to a multiple of 16 (zero weights).
A window holds whole groups: Wn = 8 or 16 for groups of M <= 16 that
divide it (kw = Wn / M * N kept weights per output), else Wn = M for M = 32
and 64 (kw = N). Windows wider than the vector are t = Wn / lanes
registers, permuted each and combined by selects on the position's high
bits (t <= 4).

The permute is an x86 instruction (AVX2's 8-lane `vpermps`, AVX-512's
16-lane form), emitted through a numba intrinsic; `LANES` is what this CPU
has (None elsewhere: then `pgf.inference.cpu` uses its gather kernel).
On the project's 2-core AMD EPYC (Zen 4), ViT-B's and T5-Base's FF shapes
at 1:8, 1:16 and 1:32 (`experiments/bench/inference_cpu.md`): batch 1 and
4 took 0.24-0.61x the time of the gather and tile kernels before it,
2.3-16.9x faster than the dense XLA matmul.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'passive')  # as pgf.inference.cpu

import jax.numpy as jnp  # noqa: E402
from llvmlite import ir  # noqa: E402
import numba  # noqa: E402
from numba.core import cgutils  # noqa: E402
import numpy as np  # noqa: E402

# Output blocks are padded to this (the widest vector) in the layout.
OUT_ALIGN = 16
# Rows computed together: their windows share each load of vals and pos.
ROW_BLOCK = 2
_PERMUTE = {8: 'llvm.x86.avx2.permps', 16: 'llvm.x86.avx512.permvar.sf.512'}


def _host_lanes() -> int | None:
  """16 with AVX-512F, 8 with AVX2, None without (or off x86, or when numba
  compiles for another CPU than this one)."""
  if numba.config.CPU_NAME is not None:
    features = numba.config.CPU_FEATURES or ''
  else:
    import llvmlite.binding as llvm
    if not llvm.get_process_triple().startswith(('x86_64', 'amd64')):
      return None
    features = llvm.get_host_cpu_features().flatten()
  features = set(features.split(','))
  if '+avx512f' in features:
    return 16
  if '+avx2' in features:
    return 8
  return None


LANES = _host_lanes()


def window_size(k: int, m: int, lanes: int | None = LANES) -> int | None:
  """Wn for a kernel contracting K = G * M (module docstring), or None when
  this kernel cannot run it (no permute, or no window of whole groups)."""
  if lanes is None:
    return None
  if m >= lanes:
    return m if m in (8, 16, 32, 64) and m // lanes <= 4 else None
  for wn in (lanes, 8):
    if wn % m == 0 and k % wn == 0:
      return wn
  return None


def layout(values, indices, *, m: int, wn: int):
  """Export layout [G, O, N] -> (vals, pos) [W, kw, Op] (module docstring);
  jnp ops, so it also runs on traced arrays."""
  g, o, n = values.shape
  per = max(1, wn // m)                       # groups per window
  w = g // per
  shape = (w, per, o, n)
  pos = (jnp.asarray(indices, jnp.int32).reshape(shape)
         + (jnp.arange(per, dtype=jnp.int32) * m)[None, :, None, None])
  pad = ((0, 0), (0, 0), (0, -o % OUT_ALIGN))
  vals = jnp.asarray(values, jnp.float32).reshape(shape).transpose(0, 1, 3, 2)
  vals = jnp.pad(vals.reshape(w, per * n, o), pad)
  pos = jnp.pad(pos.transpose(0, 1, 3, 2).reshape(w, per * n, o), pad)
  return vals, pos.astype(jnp.uint8)


def _window_pass(lanes: int, t: int, rows: int):
  """An intrinsic: one kept weight per output of one window, `rows` rows.

  pass(x, x_stride, pos, vals, y, y_stride, n_out), addresses and byte
  strides as int64: loads the window of each row (t registers from x), then
  for every block of `lanes` outputs adds vals * permute(window, pos) to y.
  """
  shift = lanes.bit_length() - 1

  @numba.extending.intrinsic
  def window_pass(typingctx, xa, xs, pa, va, ya, ys, n_out):
    del typingctx
    i64 = numba.types.int64
    sig = numba.types.void(i64, i64, i64, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
      del signature
      xa, xs, pa, va, ya, ys, n_out = args
      word = ir.IntType(64)
      fvec = ir.VectorType(ir.FloatType(), lanes)
      ivec = ir.VectorType(ir.IntType(32), lanes)
      bvec = ir.VectorType(ir.IntType(8), lanes)
      module = builder.module
      permute = cgutils.get_or_insert_function(
          module, ir.FunctionType(fvec, [fvec, ivec]), _PERMUTE[lanes])
      fma = cgutils.get_or_insert_function(
          module, ir.FunctionType(fvec, [fvec, fvec, fvec]),
          f'llvm.fma.v{lanes}f32')
      const = lambda v: ir.Constant(word, v)

      def load(addr, ty, align):
        return builder.load(builder.inttoptr(addr, ty.as_pointer()),
                            align=align)

      tables = []   # tables[r][i]: inputs i*lanes.. of row r's window
      for r in range(rows):
        base = builder.add(xa, builder.mul(xs, const(r)))
        tables.append([load(builder.add(base, const(4 * lanes * i)), fvec, 4)
                       for i in range(t)])
      with cgutils.for_range(builder, builder.udiv(n_out, const(lanes))
                             ) as loop:
        first = builder.mul(loop.index, const(lanes))
        pos = builder.zext(load(builder.add(pa, first), bvec, 1), ivec)
        vals = load(builder.add(va, builder.mul(first, const(4))), fvec, 4)
        # Which of the t registers: the position's bits above the lane's.
        high = [builder.icmp_unsigned(
            '!=', builder.and_(pos, ir.Constant(ivec, [1 << (shift + s)]
                                                * lanes)),
            ir.Constant(ivec, [0] * lanes)) for s in range((t - 1)
                                                           .bit_length())]
        for r in range(rows):
          picked = [builder.call(permute, [tab, pos]) for tab in tables[r]]
          for bit in high:
            picked = [builder.select(bit, picked[2 * i + 1], picked[2 * i])
                      for i in range(len(picked) // 2)]
          out = builder.inttoptr(
              builder.add(builder.add(ya, builder.mul(ys, const(r))),
                          builder.mul(first, const(4))), fvec.as_pointer())
          acc = builder.load(out, align=4)
          builder.store(builder.call(fma, [vals, picked[0], acc]), out,
                        align=4)
      return context.get_dummy_value()

    return sig, codegen

  return window_pass


_KERNEL_SOURCE = '''
def {name}(xa, n_rows, k, pa, va, n_win, kw, n_out, ya):
  """y [n_rows, n_out] += x [n_rows, k] @ the window layout (addresses)."""
  wn = k // n_win
  xs = k * 4
  ys = n_out * 4
  for r0 in range(0, n_rows, {rows}):
    for w in range(n_win):
      xw = xa + r0 * xs + w * wn * 4
      for j in range(w * kw, (w + 1) * kw):
        if n_rows - r0 >= {rows}:
          _block(xw, xs, pa + j * n_out, va + 4 * j * n_out, ya + r0 * ys,
                 ys, n_out)
        else:
          _single(xw, xs, pa + j * n_out, va + 4 * j * n_out, ya + r0 * ys,
                  ys, n_out)
'''


@functools.cache
def kernel(lanes: int, t: int):
  """The compiled kernel for `lanes`-wide vectors and windows of t of them:
  kernel(x, n_rows, k, pos, vals, n_win, kw, n_out_padded, y), addresses as
  int64, x [n_rows, k] and y [n_rows, n_out_padded] float32 row-major; adds
  the products to y."""
  if lanes not in _PERMUTE or t not in (1, 2, 4):
    raise ValueError(f'no lookup kernel for lanes={lanes}, t={t}')
  name = f'_lookup{lanes}x{t}'
  namespace = {'_block': _window_pass(lanes, t, ROW_BLOCK),
               '_single': _window_pass(lanes, t, 1), '__name__': __name__}
  exec(compile(_KERNEL_SOURCE.format(name=name, rows=ROW_BLOCK), __file__,  # noqa: S102
               'exec'), namespace)
  i64 = numba.types.int64
  return numba.njit(numba.void(*[i64] * 9), fastmath=True, nogil=True,
                    cache=True)(namespace[name])


def run(x: np.ndarray, vals: np.ndarray, pos: np.ndarray,
        lanes: int | None = LANES) -> np.ndarray:
  """NumPy in, NumPy out: x [R, K] -> y [R, Op] (for tests and benches)."""
  x = np.require(x, np.float32, ['C'])
  vals = np.require(vals, np.float32, ['C'])
  pos = np.require(pos, np.uint8, ['C'])
  n_win, kw, n_out = vals.shape
  wn = x.shape[1] // n_win
  lanes = min(lanes, wn)
  t = wn // lanes
  y = np.zeros((x.shape[0], n_out), np.float32)
  kernel(lanes, t)(x.ctypes.data, x.shape[0], x.shape[1], pos.ctypes.data,
                   vals.ctypes.data, n_win, kw, n_out, y.ctypes.data)
  return y
