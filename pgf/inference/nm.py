"""The compressed N:M matmul `y = x @ W`, W as exported by pgf.export.

W [K, out...] is grouped along its contraction axis K = G * M: `values`
[G, out..., N] holds the N kept weights of every group (in group order) and
`indices` [G, out..., N] their positions 0..M-1 in the group. This is the
export's layout of a kernel grouped along its leading (contraction) axes,
which are flattened into K (an attention output kernel (heads, head_dim,
embed) is (heads * head_dim, embed)).

Backends (`backend=`):
  'cpu'     numba kernels as an XLA FFI call (pgf.inference.cpu).
  'pallas'  a Pallas kernel for NVIDIA GPUs (pgf.inference.pallas); with
            `interpret=True` it runs anywhere (slowly), for tests.
  'xla'     pure XLA: gathers the kept inputs of every (row, output) and
            contracts them with the values; the reference and the fallback.
  'auto'    'cpu' on the CPU backend, 'pallas' on GPUs, else 'xla'.

Each backend wants its own layout of the weights: `NMWeights.prepare` builds
it once (at load time), `apply` runs it; `nm_matmul` does both per call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ('auto', 'cpu', 'pallas', 'xla')
# The XLA path materialises rows x G x O x N gathered inputs; past this many
# elements it runs in row chunks (lax.map) to bound its memory.
_XLA_CHUNK_ELEMENTS = 1 << 24


def resolve_backend(backend: str) -> str:
  """'auto' -> the backend for jax.default_backend(); checks the name."""
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r}; choose one of {BACKENDS}.')
  if backend != 'auto':
    return backend
  platform = jax.default_backend()
  if platform == 'cpu':
    try:
      import numba  # noqa: F401
    except ImportError:
      return 'xla'
    return 'cpu'
  return 'pallas' if platform == 'gpu' else 'xla'


def check_contraction_grouping(name: str, shape, axes) -> int:
  """Number of leading (contraction) axes a kernel's groups run over.

  The matmul contracts x with the group axis, so the groups must run along
  a kernel's leading axes, as `axis='in'` exports do for pgf's dense layers.
  Output-axis groups (e.g. SwinV2's default) would need a scatter instead.

  Raises:
    ValueError: the group axes are not the leading axes of the kernel.
  """
  axes = tuple(int(a) for a in axes)
  if axes != tuple(range(len(axes))) or len(axes) >= len(shape):
    raise ValueError(
        f'{name}: N:M groups run along axes {axes} of kernel shape '
        f'{tuple(shape)}; the compressed matmul needs them along the leading '
        'contraction axes (sparsity axis "in"). Output-axis grouping is not '
        'supported: run that kernel dense (pgf.export.decompress).')
  return len(axes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMWeights:
  """A compressed kernel in one backend's layout (a pytree; meta static).

  Attributes:
    data: the backend's arrays (see the `layout` function of each backend).
    n, m: the pattern.
    k: the contraction size G * M.
    out_shape: the kernel's output axes.
    backend: 'cpu', 'pallas' or 'xla'.
    interpret: run the Pallas kernel in interpret mode (any platform).
  """

  data: tuple[jax.Array, ...]
  n: int = dataclasses.field(metadata=dict(static=True))
  m: int = dataclasses.field(metadata=dict(static=True))
  k: int = dataclasses.field(metadata=dict(static=True))
  out_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  backend: str = dataclasses.field(metadata=dict(static=True))
  interpret: bool = dataclasses.field(default=False,
                                      metadata=dict(static=True))

  @classmethod
  def prepare(cls, values: jax.Array, indices: jax.Array, *, m: int,
              backend: str = 'auto', interpret: bool = False,
              dtype: Any = None) -> NMWeights:
    """Export arrays -> a backend's layout.

    Args:
      values: [G, out..., N] the kept weights.
      indices: [G, out..., N] their positions 0..m-1 in each group.
      m: the group length M.
      backend: see the module docstring.
      interpret: Pallas interpret mode.
      dtype: Pallas only: the dtype of the values in the kernel (e.g.
        bfloat16 to match a bf16 model); default the values' dtype.
    """
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    if values.shape != indices.shape or values.ndim < 3:
      raise ValueError(f'values {values.shape} and indices {indices.shape} '
                       'must both be [G, out..., N].')
    n = values.shape[-1]
    if not 0 < n <= m:
      raise ValueError(f'N={n} kept per group must be in 1..M={m}.')
    g, out_shape = values.shape[0], tuple(values.shape[1:-1])
    flat = (g, math.prod(out_shape), n)
    values, indices = values.reshape(flat), indices.reshape(flat)
    backend = resolve_backend(backend)
    if backend == 'cpu':
      from pgf.inference import cpu
      data = cpu.layout(values, indices, m=m)
    elif backend == 'pallas':
      from pgf.inference import pallas
      data = pallas.layout(values, indices, dtype=dtype)
    else:
      data = (values, indices)
    return cls(tuple(data), n=n, m=m, k=g * m, out_shape=out_shape,
               backend=backend, interpret=interpret)

  @property
  def density(self) -> float:
    return self.n / self.m


def _xla_matmul(x: jax.Array, values: jax.Array, indices: jax.Array,
                m: int) -> jax.Array:
  """x [R, K] -> [R, O], float32 accumulation of the kept products only."""
  g, o, n = values.shape
  groups = jnp.arange(g)[:, None, None]
  idx = indices.astype(jnp.int32)
  vals = values.astype(jnp.promote_types(x.dtype, values.dtype))

  def one_row(xr):  # [G, M] -> [O]
    picked = xr[groups, idx]  # [G, O, N]
    return jnp.einsum('gon,gon->o', picked, vals,
                      preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)

  xg = x.reshape(x.shape[0], g, m)
  chunk = max(1, _XLA_CHUNK_ELEMENTS // (g * o * n))
  if x.shape[0] <= chunk:
    return jax.vmap(one_row)(xg)
  return jax.lax.map(one_row, xg, batch_size=chunk)


def apply(x: jax.Array, w: NMWeights, *, dtype: Any = None) -> jax.Array:
  """y = x @ W: x [..., K] -> y [..., out...] in `dtype` (default: x's
  dtype promoted with the weights')."""
  if x.shape[-1] != w.k:
    raise ValueError(f'x has {x.shape[-1]} features; the kernel contracts '
                     f'K = G * M = {w.k}.')
  lead = x.shape[:-1]
  x2 = x.reshape(math.prod(lead), w.k)
  dtype = dtype or jnp.promote_types(x.dtype, w.data[0].dtype)
  if w.backend == 'cpu':
    from pgf.inference import cpu
    y = cpu.matmul(x2, *w.data)
  elif w.backend == 'pallas':
    from pgf.inference import pallas
    y = pallas.matmul(x2, *w.data, n=w.n, m=w.m, k=w.k,
                      out=math.prod(w.out_shape), interpret=w.interpret)
  else:
    y = _xla_matmul(x2, *w.data, w.m)
  return y.astype(dtype).reshape(lead + w.out_shape)


def nm_matmul(x: jax.Array, values: jax.Array, indices: jax.Array, *,
              m: int, backend: str = 'auto',
              interpret: bool = False) -> jax.Array:
  """y = x @ W for W given compressed, grouped along its contraction axis.

  Args:
    x: [..., K] with K = G * m.
    values: [G, out..., N] the N kept weights of each group, in group order.
    indices: [G, out..., N] their positions 0..m-1 within the group.
    m: the group length M (N is values.shape[-1]).
    backend: 'auto', 'cpu', 'pallas' or 'xla' (module docstring).
    interpret: run the Pallas kernel in interpret mode.

  Returns:
    y [..., out...]; re-lays the weights out on every call: for repeated use
    build `NMWeights.prepare(...)` once and call `apply`.
  """
  return apply(x, NMWeights.prepare(values, indices, m=m, backend=backend,
                                    interpret=interpret))


def dense_kernel(values: np.ndarray, indices: np.ndarray, *,
                 m: int) -> np.ndarray:
  """The dense [K, out...] kernel of compressed arrays (zeros pruned)."""
  values, indices = np.asarray(values), np.asarray(indices).astype(np.int64)
  g = np.zeros(values.shape[:-1] + (m,), values.dtype)
  np.put_along_axis(g, indices, values, axis=-1)
  return np.moveaxis(g, -1, 1).reshape((g.shape[0] * m,) + g.shape[1:-1])
