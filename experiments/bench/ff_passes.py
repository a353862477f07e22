r"""The sparse step's passes over T5-Base's FF kernels against plain passes.

  python experiments/bench/ff_passes.py [--repeats=9] [--pattern=1:16]
      [--no_prefetch]

What a sparse T5-Base step adds to the dense one (`pgf.bench.steps`'s
`sparse_work_fn`) is a few passes over its 72 FF kernels (113 M float32
weights): the forward pass's w_eff and bits (`core.kernel_and_bits`), the
backward pass's w_eff again from the bits (`core.kernel_from_bits`) and,
for SR-STE, the refill of the gradient (`core.srste_gradient`). This times
each over all 72 kernels in one jitted call against an XLA elementwise pass
with the same inputs and outputs (`w * 2 + 1`: one array in, one out;
`g + c * w`: two in, one out), in interleaved samples, every call writing
over its last results (donated, as in `sparse_work_fn`; the refill and its
plain pass take g donated and get their last results as g, so that the
refill can write over g in place as in the step). Prints ms (min /
median) and each pass over its plain pass. `--no_prefetch` compiles the CPU
kernels without their software prefetch (`mask_kernel.PREFETCH_AHEAD`), for
an A/B.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

from pgf.bench import timing
from pgf.sparsity import core
from pgf.sparsity import mask_kernel
from pgf.sparsity.masks import NM

SHAPES = [(768, 2048)] * 48 + [(2048, 768)] * 24   # wi_0, wi_1; wo.


def _donating(fn):
  """fn(*args) -> outputs, jitted to write over `out` (the last outputs)."""
  jitted = jax.jit(lambda out, *args: fn(*args), donate_argnums=0,
                   keep_unused=True)
  state = {}

  def call(*args):
    if 'out' not in state:
      shapes = jax.eval_shape(fn, *args)
      state['out'] = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                  shapes)
    state['out'] = jitted(state['out'], *args)
    return state['out']

  return call


def _refilling(fn, gs):
  """fn(gs, *args) -> new gs, jitted to take gs donated and fed its last
  results (as the step's gradients are temporaries the refill may write
  over: a gradient XLA must keep is copied before the in-place kernel)."""
  jitted = jax.jit(fn, donate_argnums=0)
  state = {'gs': [jnp.array(g) for g in gs]}

  def call(*args):
    state['gs'] = jitted(state['gs'], *args)
    return state['gs']

  return call


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--pattern', default='1:16')
  parser.add_argument('--no_prefetch', action='store_true')
  args = parser.parse_args()
  if args.no_prefetch:   # Before the kernels compile: no strip is that far.
    mask_kernel.PREFETCH_AHEAD = 1 << 40
  nm = NM.parse(args.pattern)
  keys = jax.random.split(jax.random.key(0), 2 * len(SHAPES))
  ws = [jax.random.normal(k, s) for k, s in zip(keys, SHAPES)]
  gs = [jax.random.normal(k, s) for k, s in zip(keys[len(SHAPES):], SHAPES)]
  alpha, lam = jnp.float32(0.0), jnp.float32(2e-4)
  bits = jax.jit(lambda ws: [core.kernel_and_bits(w, nm, (0,), alpha)[1]
                             for w in ws])(ws)
  calls = {
      'forward: w_eff and bits': (_donating(
          lambda ws: [core.kernel_and_bits(w, nm, (0,), alpha)
                      for w in ws]), (ws,)),
      'backward: w_eff from bits': (_donating(
          lambda ws, bits: [core.kernel_from_bits(w, b, alpha)
                            for w, b in zip(ws, bits)]), (ws, bits)),
      'plain pass w * 2 + 1': (_donating(
          lambda ws: [w * 2 + 1 for w in ws]), (ws,)),
      'SR-STE refill': (_refilling(
          lambda gs, ws: [core.srste_gradient(g, w, nm, (0,), lam)
                          for g, w in zip(gs, ws)], gs), (ws,)),
      'plain pass g + c * w': (_refilling(
          lambda gs, ws: [g + lam * w for g, w in zip(gs, ws)], gs), (ws,)),
  }
  samples = {name: [] for name in calls}
  for _ in range(args.repeats):
    for name, (fn, fn_args) in calls.items():
      samples[name].append(
          timing.sample(lambda fn=fn, a=fn_args: fn(*a), 3, untimed=2) * 1e3)
  mins = {name: min(s) for name, s in samples.items()}
  plain = {'forward: w_eff and bits': 'plain pass w * 2 + 1',
           'backward: w_eff from bits': 'plain pass w * 2 + 1',
           'SR-STE refill': 'plain pass g + c * w'}
  print(f'T5-Base FF kernels (72, {sum(a * b for a, b in SHAPES) / 1e6:.0f} M '
        f'weights), {nm}, prefetch {not args.no_prefetch}, '
        f'{timing.cpu_name()}, JAX {jax.__version__}')
  print(f'{"pass":28} {"ms min / median":>18} {"x plain (min)":>14}')
  for name, s in samples.items():
    ratio = (f'{mins[name] / mins[plain[name]]:14.2f}' if name in plain
             else f'{"":>14}')
    print(f'{name:28} {mins[name]:8.1f} / {statistics.median(s):7.1f} '
          f'{ratio}')


if __name__ == '__main__':
  main()
