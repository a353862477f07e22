"""One timed sample of a jitted call, shared by the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
import time

import jax


def sample(fn: Callable[[], object], calls: int, *, untimed: int) -> float:
  """Seconds per call of `calls` back-to-back calls of `fn`, after
  `untimed` calls: on the project's 2-core VM the first calls of a short op
  after other work run 2-10x slower."""
  out = None
  for _ in range(untimed):
    out = fn()
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls
