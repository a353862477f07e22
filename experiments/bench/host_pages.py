r"""Dense training steps on CPU with 4 KiB and with huge host pages.

  python experiments/bench/host_pages.py --config=configs/t5_base.py \
      --batch_size=1 --pairs=2 --rounds=3 \
      --out=experiments/bench/host_pages_cpu_xeon_t5_base_b1.md

On CPU, XLA allocates a step's temporaries anew on every call (1.8 GiB at
T5-Base batch 1) and glibc serves blocks over 32 MiB with fresh mmap pages,
so every step first-touches all of them: with 4 KiB pages that is one minor
page fault (and a page zeroed) per 4 KiB. Where the kernel's transparent
huge pages are 'madvise', `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes
glibc ask for huge pages for those blocks. This runs `pgf.bench.steps`'
dense and stock Flax rows (no sparse row) in separate processes, without
and with the tunable, alternating (--pairs of both), and writes a table of
ms per step and faults per step. Sparse steps allocate like dense ones
(the same XLA temp size), so this changes every row of the step tables
alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from pgf.bench import steps as bench_steps
from pgf.bench import timing

SETTINGS = {'4 KiB pages (default)': None,
            'huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)':
                'glibc.malloc.hugetlb=1'}


def run(config, batch_size, rounds, tunables, out):
  env = dict(os.environ)
  env.pop('GLIBC_TUNABLES', None)
  if tunables:
    env['GLIBC_TUNABLES'] = tunables
  cmd = [sys.executable, '-m', 'pgf.bench.steps', f'--config={config}',
         f'--batch_size={batch_size}', '--dtype=float32', '--recipes=',
         '--patterns=', '--sdgf=', '--recompute_off=', f'--rounds={rounds}',
         '--warmup=2', '--work_repeats=0', f'--out={out}']
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/t5_base.py')
  p.add_argument('--batch_size', type=int, default=1)
  p.add_argument('--pairs', type=int, default=2)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--out', default='')
  args = p.parse_args()
  samples = {k: {} for k in SETTINGS}
  faults = {k: {} for k in SETTINGS}
  load_before = bench_steps.load_text()
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.pairs):
      for name, tunables in SETTINGS.items():
        res = run(args.config, args.batch_size, args.rounds, tunables,
                  os.path.join(tmp, f'{i}.json'))
        for r in res['rows']:
          samples[name].setdefault(r['row'], []).extend(r['samples_ms'])
          faults[name].setdefault(r['row'], []).append(r['faults_per_step'])
        print(f'pair {i + 1}/{args.pairs}: {name} done', flush=True)
  meta = res['meta']
  lines = [
      f"# Dense steps with 4 KiB and huge host pages: {meta['model']}", '',
      f"Command: `python experiments/bench/host_pages.py "
      f"{' '.join(sys.argv[1:])}`  ",
      f"Device: {meta['device']}; transparent huge pages: "
      f"'{timing.thp_mode()}'  ",
      f"Load: {load_before} before, "
      f"{bench_steps.load_text()} after  ",
      f"JAX {meta['jax']}; batch {meta['batch_size']}; float32; "
      f"{args.pairs} processes per setting, alternating, {args.rounds} "
      f"rounds of one step per row each", '',
      'ms per step over every round of every process (min / median / max); '
      'faults: minor page faults per step, median over processes.', '',
      '| row | host pages | ms min / med / max | faults / step |',
      '| --- | --- | --- | --- |']
  for row in samples[next(iter(SETTINGS))]:
    for name in SETTINGS:
      ms = samples[name][row]
      lines.append(f'| {row} | {name} | {min(ms):.1f} / '
                   f'{statistics.median(ms):.1f} / {max(ms):.1f} | '
                   f'{statistics.median(faults[name][row]):,.0f} |')
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out + '.tmp', 'w') as f:
      f.write(text)
    os.replace(args.out + '.tmp', args.out)


if __name__ == '__main__':
  main()
