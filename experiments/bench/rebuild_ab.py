r"""A/B: the backward pass's effective kernel from mask bits vs a second mask.

  python experiments/bench/rebuild_ab.py [--repeats=9]

`pgf.sparsity.core.sparse_product` saves the mask as bits in the forward
pass and rebuilds the effective kernel from kernel and bits in the backward
pass (`kernel_and_bits`, `kernel_from_bits`). Until 2026-12-03 it saved no
bits and computed the mask again in the backward pass. This times both, on
T5-Base's three FF kernels of one layer (768x2048, 768x2048, 2048x768,
float32), forward and backward work only, in interleaved samples (each the
median-of-rounds of at least 10 ms of back-to-back calls, after untimed
calls), and checks that both give the same kernels bit for bit. Prints
one line per pattern: old and new ms (median over rounds) and new / old.
"""

from __future__ import annotations

import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pgf.bench import steps
from pgf.bench import timing
from pgf.sparsity import core
from pgf.sparsity import masks

PATTERNS = ((2, 4), (4, 8), (1, 8), (1, 16), (1, 32), (8, 64))


def main(repeats: int = 9) -> None:
  rng = np.random.default_rng(0)
  ws = [jnp.asarray(rng.normal(size=s), jnp.float32)
        for s in ((768, 2048), (768, 2048), (2048, 768))]
  alpha = jnp.float32(0.0)
  print(f'{steps.device_name()}; {steps.load_text()} before', flush=True)
  for n, m in PATTERNS:
    nm = masks.NM(n, m)

    def old(ws, nm=nm):   # two masks: forward, then backward
      a = [core.effective_kernel(w, nm, (0,), alpha=alpha)[0] for w in ws]
      tie = 1 + 0 * a[0][(0,) * a[0].ndim]
      return a, [core.effective_kernel(w * tie, nm, (0,), alpha=alpha)[0]
                 for w in ws]

    def new(ws, nm=nm):   # one mask and its bits, then the bits
      ab = [core.kernel_and_bits(w, nm, (0,), alpha) for w in ws]
      tie = 1 + 0 * ab[0][0][(0,) * ab[0][0].ndim]
      return [k for k, _ in ab], [core.kernel_from_bits(w * tie, b, alpha)
                                  for w, (_, b) in zip(ws, ab)]

    fns = {'old': jax.jit(old), 'new': jax.jit(new)}
    outs = {k: jax.tree.leaves(f(ws)) for k, f in fns.items()}
    same = all(np.array_equal(a, b) for a, b in zip(outs['old'], outs['new']))
    times = {k: [] for k in fns}
    for _ in range(repeats):
      for k, f in fns.items():
        per = timing.sample(lambda f=f: f(ws), 1, untimed=1)
        calls = max(1, int(0.01 / per))
        times[k].append(timing.sample(lambda f=f: f(ws), calls, untimed=2))
    o, w = (statistics.median(times[k]) * 1e3 for k in ('old', 'new'))
    print(f'{nm}  old {o:7.3f} ms  new {w:7.3f} ms  new/old {w / o:5.2f}  '
          f'bit-equal {same}', flush=True)
  print(f'{steps.load_text()} after', flush=True)


if __name__ == '__main__':
  args = [a for a in sys.argv[1:] if a.startswith('--repeats=')]
  main(int(args[0].split('=')[1]) if args else 9)
