"""N:M masks: pure functions of a weight array (method.md section 1).

An N:M mask keeps the N largest-magnitude weights of every group of M
consecutive weights along the *group axes* of a kernel. By default the group
axes are the contraction (input) axes of the layer, the layout sparse tensor
cores use.

Ties: among weights of equal magnitude the one with the lower index inside its
group is kept. The selection is exact and does not sort: it takes
min(N, M - N) arg-max (or arg-min) passes over each group, which costs one
pass for 1:M and (M-1):M patterns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
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
  M when the group length is not divisible by M (method.md section 1: the
  authors' code silently lets groups straddle rows; pgf refuses).
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
            name: str = 'kernel') -> jax.Array:
  """Boolean N:M mask of `w`, keeping the N largest |w| of each group.

  Args:
    w: weights of any shape, e.g. a Dense kernel `(in, out)`.
    nm: the pattern.
    axes: contiguous axes along which groups of M consecutive weights are
      taken (flattened in row-major order). 0 for a Dense kernel's input axis.
    name: used in error messages.

  Returns:
    bool array of `w.shape` with exactly `nm.n` True values per group.
  """
  axes = check_groupable(w.shape, nm, axes, name=name)
  n, m = nm.n, nm.m
  if n == m:
    return jnp.ones(w.shape, bool)
  mag = jax.lax.stop_gradient(jnp.abs(w)).astype(jnp.float32)
  # Cap at the float32 maximum so inf weights behave as the largest finite.
  mag = jnp.minimum(mag, jnp.finfo(jnp.float32).max)
  g = _grouped(mag, axes, m)
  gaxis = axes[0] + 1
  if m >= 32 and min(n, m - n) > 2:
    # Wide groups: plain max/min passes vectorise far better than arg-max
    # (a variadic reduction); they are exact unless ties straddle the
    # cut-off, in which case the arg-max selection decides.
    fast, exact = _select_by_value(g, n, m, gaxis)
    keep = jax.lax.cond(exact, lambda: fast,
                        lambda: _select_by_index(g, n, m, gaxis))
  else:
    keep = _select_by_index(g, n, m, gaxis)
  return keep.reshape(w.shape)


def _select_by_index(g: jax.Array, n: int, m: int, gaxis: int) -> jax.Array:
  """Exact top-N along `gaxis`; ties keep the lower index."""
  iota_shape = [1] * g.ndim
  iota_shape[gaxis] = m
  iota = jnp.arange(m).reshape(iota_shape)
  if n <= m - n:
    # Keep: N passes of arg-max; argmax returns the first (lowest) index on
    # ties, so lower indices win.
    keep = jnp.zeros(g.shape, bool)
    for _ in range(n):
      idx = jnp.argmax(jnp.where(keep, -jnp.inf, g), axis=gaxis,
                       keepdims=True)
      keep = keep | (iota == idx)
    return keep
  # Drop: M - N passes of arg-min; ties drop the highest index first so
  # that, as above, lower indices are kept.
  drop = jnp.zeros(g.shape, bool)
  for _ in range(m - n):
    rev = jnp.flip(jnp.where(drop, jnp.inf, g), axis=gaxis)
    idx = m - 1 - jnp.argmin(rev, axis=gaxis, keepdims=True)
    drop = drop | (iota == idx)
  return ~drop


def _select_by_value(g: jax.Array, n: int, m: int, gaxis: int
                     ) -> tuple[jax.Array, jax.Array]:
  """Top-N by repeated max (or bottom M-N by min); returns (mask, exact).

  Each pass takes every element equal to the current extreme, so the result
  is the exact top-N whenever each group ends with exactly N kept; `exact`
  says whether that holds for every group.
  """
  if n <= m - n:
    keep = jnp.zeros(g.shape, bool)
    for _ in range(n):
      top = jnp.max(jnp.where(keep, -jnp.inf, g), axis=gaxis, keepdims=True)
      keep = keep | (g == top)
  else:
    drop = jnp.zeros(g.shape, bool)
    for _ in range(m - n):
      low = jnp.min(jnp.where(drop, jnp.inf, g), axis=gaxis, keepdims=True)
      drop = drop | (g == low)
    keep = ~drop
  return keep, jnp.all(jnp.sum(keep, axis=gaxis) == n)


def nm_mask_reference(w: np.ndarray, nm: NM,
                      axes: int | Sequence[int] = 0) -> np.ndarray:
  """Plain NumPy reference of `nm_mask` (a stable sort per group)."""
  w = np.asarray(w)
  axes = check_groupable(w.shape, nm, axes)
  a0, a1 = axes[0], axes[-1]
  moved = np.moveaxis(w.reshape(w.shape[:a0] + (-1,) + w.shape[a1 + 1:]),
                      a0, -1)
  flat = moved.reshape(-1, nm.m)
  # Stable sort of -|w|: larger first, lower index first among equals.
  order = np.argsort(-np.abs(flat), axis=1, kind='stable')
  mask = np.zeros(flat.shape, bool)
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
