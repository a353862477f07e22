"""What the benchmarks share: one timed sample of a jitted call, the
host CPU's name, its page faults and how it backs large allocations."""

from __future__ import annotations

from collections.abc import Callable
import os
import platform
import re
import resource
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


def minor_faults() -> int:
  """Minor page faults of this process so far (getrusage): on CPU, XLA
  allocates a step's temporaries on every call, and each first touch of a
  fresh 4 KiB page of them faults (`host_memory`)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def thp_mode() -> str:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never';
  'unknown' where /sys does not say)."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as fh:
      mode = re.search(r'\[(\w+)\]', fh.read())
  except OSError:
    return 'unknown'
  return mode.group(1) if mode else 'unknown'


def host_memory() -> str:
  """How the host backs large allocations: the kernel's transparent huge
  page mode and GLIBC_TUNABLES. On CPU, XLA allocates each call's
  temporaries anew (glibc serves blocks over 32 MiB with fresh mmap pages),
  so a step first-touches all of them: 4 KiB pages fault once each, unless
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` asks for huge pages where the
  mode is 'madvise'."""
  return (f"transparent huge pages '{thp_mode()}', GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}")


def numba_threading() -> str:
  """numba's version and the threading layer its parallel kernels ran on
  ('tbb', 'omp' or 'workqueue'; 'not started' before any ran): the layer
  sets what a kernel call pays to wake the pool's threads
  (`pgf.sparsity.mask_kernel`)."""
  import numba  # Only where numba's kernels ran.
  try:
    layer = numba.threading_layer()
  except ValueError:  # No parallel kernel has run in this process.
    layer = 'not started'
  return f'numba {numba.__version__} (threading layer {layer})'
