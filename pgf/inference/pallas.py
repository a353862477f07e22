"""The N:M matmul as a Pallas kernel for NVIDIA GPUs (Triton lowering).

Weight bytes dominate decode-sized batches, so the kernel reads only the
compressed weights and expands them tile by tile on chip: with x split by
in-group position p, x[:, g * M + p] = xs[p, :, g],

  y = sum_p xs[p] @ W_p,   W_p[g, o] = sum_n values[n, g, o] * (idx[n, g, o]
                                                              == p),

so each step of the contraction loop loads one [BG, BO] tile of values and
indices per kept slot n, builds the M dense tiles W_p with compares and
selects, and feeds M tensor-core dots of [BB, BG] x [BG, BO]. No reshapes or
gathers inside the kernel (Triton has neither cheaply). Bytes read per kept
weight: one value (2 bytes in bf16) and one uint8 index, against M dense
values for the dense matmul.

Layout (`layout`): values and indices [N, Gp, Op], G and O zero-padded to
the tile sizes (padded weights are 0 at index 0). `matmul` re-lays x out as
[M, Rp, Gp] (rows padded to the row tile): cheap next to the weights.

Tested on CPU in interpret mode (`interpret=True`); `lower_for_gpu` lowers
it to Triton IR without a GPU. It has not been timed here (no GPU); the GPU
check calls `pgf.bench.inference.time_pallas` for that.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

BLOCK_G = 32   # Groups per contraction step (BG).
BLOCK_O = 64   # Outputs per program (BO).
MIN_ROWS = 16  # Triton dots need every tile dimension >= 16.


def _round_up(x: int, to: int) -> int:
  return -(-x // to) * to


def layout(values: jax.Array, indices: jax.Array, *, dtype: Any = None,
           block_g: int = BLOCK_G, block_o: int = BLOCK_O
           ) -> tuple[jax.Array, jax.Array]:
  """[G, O, N] export arrays -> [N, Gp, Op] values (in `dtype`) and uint8
  indices."""
  g, o, _ = values.shape
  pad = ((0, 0), (0, _round_up(g, block_g) - g), (0, _round_up(o, block_o) - o))
  vals = jnp.pad(jnp.moveaxis(values, -1, 0).astype(dtype or values.dtype),
                 pad)
  idx = jnp.pad(jnp.moveaxis(indices, -1, 0).astype(jnp.uint8), pad)
  return vals, idx


def _kernel(x_ref, v_ref, i_ref, o_ref, *, n: int, m: int, block_g: int,
            steps: int):
  """One [BB, BO] output tile: the loop over the contraction in BG groups."""

  def step(s, acc):
    g0 = pl.multiple_of(s * block_g, block_g)
    vals = [v_ref[j, pl.ds(g0, block_g), :] for j in range(n)]
    idx = [i_ref[j, pl.ds(g0, block_g), :].astype(jnp.int32)
           for j in range(n)]
    zero = jnp.zeros_like(vals[0])
    for p in range(m):
      w = jnp.where(idx[0] == p, vals[0], zero)
      for j in range(1, n):
        w = w + jnp.where(idx[j] == p, vals[j], zero)
      xp = x_ref[p, :, pl.ds(g0, block_g)]
      acc = acc + jnp.dot(xp, w, preferred_element_type=jnp.float32)
    return acc

  acc = jnp.zeros(o_ref.shape, jnp.float32)
  acc = jax.lax.fori_loop(0, steps, step, acc)
  o_ref[...] = acc.astype(o_ref.dtype)


def _row_block(rows: int) -> int:
  return min(64, max(MIN_ROWS, 1 << (rows - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=('n', 'm', 'k', 'out',
                                             'interpret', 'num_warps'))
def matmul(x: jax.Array, values: jax.Array, indices: jax.Array, *, n: int,
           m: int, k: int, out: int, interpret: bool = False,
           num_warps: int = 4) -> jax.Array:
  """x [R, K] @ the kernel of `layout` -> y [R, out] in x's dtype.

  Args:
    x: [R, K], K = G * m.
    values, indices: from `layout`, [n, Gp, Op].
    n, m: the pattern; k: K; out: the unpadded number of outputs O.
    interpret: run in Pallas interpret mode (any platform, slow).
    num_warps: Triton warps per program.
  """
  from jax.experimental.pallas import triton as pl_triton
  rows = x.shape[0]
  _, gp, op = values.shape
  g = k // m
  bb = _row_block(rows)
  rp = _round_up(rows, bb)
  xs = x.astype(values.dtype).reshape(rows, g, m)
  xs = jnp.pad(xs, ((0, rp - rows), (0, gp - g), (0, 0)))
  xs = jnp.transpose(xs, (2, 0, 1))  # [M, Rp, Gp]
  kernel = functools.partial(_kernel, n=n, m=m, block_g=BLOCK_G,
                             steps=gp // BLOCK_G)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((rp, op), x.dtype),
      grid=(rp // bb, op // BLOCK_O),
      in_specs=[
          pl.BlockSpec((m, bb, gp), lambda i, j: (0, i, 0)),
          pl.BlockSpec((n, gp, BLOCK_O), lambda i, j: (0, 0, j)),
          pl.BlockSpec((n, gp, BLOCK_O), lambda i, j: (0, 0, j)),
      ],
      out_specs=pl.BlockSpec((bb, BLOCK_O), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps,
                                               num_stages=2),
      name=f'nm_matmul_{n}of{m}',
  )(xs, values, indices)
  return y[:rows, :out]


def lower_for_gpu(x: jax.Array, values: jax.Array, indices: jax.Array, *,
                  n: int, m: int, k: int, out: int) -> str:
  """StableHLO text of the kernel lowered for CUDA (Triton IR inside): a
  check that runs without a GPU."""
  fn = functools.partial(matmul, n=n, m=m, k=k, out=out)
  return jax.jit(fn).trace(x, values, indices).lower(
      lowering_platforms=('cuda',)).as_text()
