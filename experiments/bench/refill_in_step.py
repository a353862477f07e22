r"""SR-STE's refill inside the step's optimizer update, by route.

  python experiments/bench/refill_in_step.py [--config=configs/t5_base.py]
      [--pattern=1:16] [--repeats=7]

SR-STE adds lambda (1 - m) w to the gradient of every sparse kernel before
clipping and the optimizer (`transforms.srste_refill`). `pgf.bench.steps`'s
sparse work times that refill materialised, but in the step its output only
feeds the optimizer's own passes over the gradient (clipping's norm, the
update), into which XLA can fuse an elementwise refill. This times the
step's update alone, `tx.update` and `apply_updates` over the model's
parameters (jitted, parameters and optimizer state donated as in the step;
the gradients made temporaries inside, as in the step: a product by a
traced 1 behind an optimization barrier, one pass every route pays), for
the config's optimizer chain with the FF kernels at --pattern:

  ste          STE: no refill (what the SR-STE rows are compared with)
  srste_kernel SR-STE, the refill from the CPU kernel (`mask_kernel.refill`:
               one pass reading w and g, writing the new gradient over g)
  srste_xla    SR-STE, the refill as XLA ops on nm_mask's mask (on one CPU
               device the CPU mask kernel), fused into the optimizer

in interleaved samples. Prints ms per update (min / median) and the paired
median of each sample minus STE's sample before it.

What it showed (T5-Base, 1:16, 2-core Xeon, 2026-12-07, nothing else
running): the update alone takes 870-970 ms for STE (Adafactor over 248 M
parameters), and SR-STE adds 175-610 ms by either route, far more than the
refill's own pass (69 ms over the FF kernels, `ff_passes.py`). The compiled
update says why: alone, SR-STE's needs 2,134 MiB of XLA temporaries against
STE's 1,269 (the refilled gradient is a new array, page-faulted on every
call), while in the whole step (`pgf.bench.steps`) both need 1,805 MiB and
whole T5-Base batch-1 steps of STE and SR-STE took 1.027x and 1.029x dense
(`steps_cpu_xeon_t5_base_b1_ste_srste.md`). So an update timed alone
overstates the refill; it cannot settle which route is cheaper in a step.

Since 1d1945d the kernel writes over g. Given the gradients as a donated
argument (as before) XLA copied each of them first, an argument not being
an output: STE 1,035 ms, the kernel route +644, XLA's +211 (9 samples,
21:56 UTC). With the gradients as temporaries (this version, 22:02 UTC, 9
samples): STE 1,046 ms, the kernel route +251, XLA's +268, still four to
six times the refill's pass alone (37-58 ms in `pgf.bench.steps`' work at
T5-Base batch 1), while whole steps at 1:16 put SR-STE's overhead 71 ms
over STE's (`steps_cpu_xeon_t5_base_b1_ste_srste_inplace.md`, noisy).
The faults per call (printed since 22:11 UTC) say where most of it goes:
STE's update alone needs 1,270 MiB of XLA temporaries and faults 349,000
times a call, SR-STE's 2,134 MiB and 570,000 times (+864 MiB first-touched
on every call; +390 and +457 ms in that run), while in the whole step
both need 1,805-1,806 MiB and fault 463,000 times a step. So the update
alone still times the allocator, not the refill.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgf import step as step_lib
from pgf.bench import steps as bench_steps
from pgf.bench import timing
from pgf.sparsity import core


def _update_fn(s, plan):
  def update(params, opt_state, grads, step, one):
    # The gradients as the step has them: materialised temporaries (here
    # a product by a traced 1 behind a barrier, the same pass for every
    # route), which SR-STE's CPU kernel may write over; an argument it
    # would copy first.
    grads = jax.lax.optimization_barrier(
        jax.tree.map(lambda g: g * one, grads))
    updates, opt_state = s.tx.update(grads, opt_state, params, step=step,
                                     plan=plan)
    return optax.apply_updates(params, updates), opt_state
  return jax.jit(update, donate_argnums=(0, 1))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/t5_base.py')
  parser.add_argument('--pattern', default='1:16')
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location('config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = module.get_config()
  nm = bench_steps.parse_nm(args.pattern)
  setups = {r: bench_steps.bench_setup(bench_steps.row_config(
      base, recipe=r, nm=nm, dtype='float32')) for r in ('ste', 'srste')}
  s = setups['srste']
  plan = s.schedule.final_plan()
  # A step inside the sparse phase, where lambda is on.
  step = jnp.asarray(s.run.total // 2, jnp.int32)
  lam = s.schedule.values(step)['ff']['srste_lambda']
  if not float(lam) > 0:
    sys.exit(f'lambda is {float(lam)} at step {int(step)}')
  state = step_lib.init_state(s, jax.random.key(0))
  params, opt_state = state.params, state.opt_state
  rng = np.random.default_rng(0)
  grads = jax.tree.map(
      lambda p: jnp.asarray(1e-3 * rng.standard_normal(p.shape), p.dtype),
      params)
  fns = {'ste': _update_fn(setups['ste'], plan)}
  limit = core._REFILL_MAX_K
  for name, max_k in (('srste_kernel', 32), ('srste_xla', 0)):
    core._REFILL_MAX_K = max_k            # Read when the update is traced.
    fn = _update_fn(s, plan)
    text = fn.lower(params, opt_state, grads, step, 1.0).as_text()  # Traced.
    print(f'{name}: {text.count("pgf_nm_refill")} refill kernel calls, '
          f'{text.count("pgf_nm_mask")} mask kernel calls', flush=True)
    fns[name] = fn
  core._REFILL_MAX_K = limit
  carry = {'params': params, 'opt_state': opt_state}
  one = jnp.float32(1)

  faults = {}

  def sample(fn):
    """ms of one update (its minor page faults kept in `faults`)."""
    before = timing.minor_faults()
    start = time.perf_counter()
    carry['params'], carry['opt_state'] = fn(carry['params'],
                                             carry['opt_state'], grads, step,
                                             one)
    jax.block_until_ready(carry['params'])
    faults.setdefault(fn, []).append(timing.minor_faults() - before)
    return 1e3 * (time.perf_counter() - start)

  ms = {name: [] for name in fns}
  for fn in fns.values():           # Compiles, then warm.
    sample(fn)
    sample(fn)
  for _ in range(args.repeats):
    for name, fn in fns.items():
      ms[name].append(sample(fn))
  print(f'{args.config} FF {args.pattern}, optimizer update alone, '
        f'{timing.cpu_name()}, JAX {jax.__version__}, {args.repeats} '
        'interleaved samples of one call')
  print(f'{"route":14s} {"ms min / median":>18s} {"- ste ms (paired)":>18s}'
        f' {"faults / call":>14s} {"temp MiB":>9s}')
  for name, xs in ms.items():
    diff = statistics.median(a - b for a, b in zip(xs, ms['ste']))
    temp = fns[name].lower(params, opt_state, grads, step, 1.0).compile(
        ).memory_analysis().temp_size_in_bytes / 2**20
    print(f'{name:14s} {min(xs):8.1f} / {statistics.median(xs):7.1f} '
          f'{diff:+18.1f} {statistics.median(faults[fns[name]]):14,.0f} '
          f'{temp:9,.0f}')


if __name__ == '__main__':
  main()
