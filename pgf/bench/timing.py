"""What the benchmarks share: one timed sample of a jitted call, the
host CPU's name."""

from __future__ import annotations

from collections.abc import Callable
import platform
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


def cpu_name() -> str:
  """The host CPU's model name (/proc/cpuinfo), else what `platform` says."""
  try:
    with open('/proc/cpuinfo') as fh:
      for line in fh:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
