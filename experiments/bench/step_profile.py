r"""Where a sparse training step's time goes, op by op, against the dense step.

  python experiments/bench/step_profile.py [--config=t5_base] [--batch_size=1]
      [--recipe=ste] [--pattern=1:16] [--steps=3] [--out=PATH.md]

Runs the dense step and one recipe's step (`pgf.bench.steps`, the same
state and batch) under `jax.profiler.trace` and reads the Perfetto trace
that JAX writes (no TensorBoard needed). On CPU every XLA thunk (a fusion,
a dot, a custom call such as the mask kernels) is one event on the worker
thread that ran it. Per op kind (the thunk's name without its number) it
prints the thread time per step of both steps and the difference, and for
the sparse step's own ops how much of their time the other busiest worker
thread was idle: an op that runs while the other thread is idle is on the
step's critical path, one that runs beside other work is not.

A difference of the wall time per step between the two needs many paired
rounds (`python -m pgf.bench.steps`); this shows which ops make it.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import importlib
import json
import re
import shutil
import tempfile

import jax

from pgf.bench import steps

# Host-side events of the trace (dispatch, Python frames, waits, the
# executor's spans around the thunks it runs): not ops.
_NOT_OPS = ('Pjit', '$', 'Slinky', 'Thread', 'ThunkExecutor', 'Common',
            'end:', 'Wait', 'Handle', 'Alloc', 'Parse', 'Python')


def trace_ops(run, n: int) -> list[dict]:
  """The op events of `run(n)` (n steps) from a Perfetto trace."""
  folder = tempfile.mkdtemp(prefix='pgf_step_profile_')
  try:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      run(n)
    path = glob.glob(f'{folder}/**/perfetto_trace.json.gz', recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  events = events['traceEvents'] if isinstance(events, dict) else events
  return [e for e in events if e.get('ph') == 'X'
          and not e['name'].startswith(_NOT_OPS)]


def kind(name: str) -> str:
  return re.sub(r'[.\d]+$', '', name)


def _busy(ops: list[dict], tid) -> list[list[float]]:
  """The merged intervals during which thread `tid` runs an op."""
  out = []
  for a, b in sorted((e['ts'], e['ts'] + e['dur']) for e in ops
                     if e['tid'] == tid):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return out


def _overlap(intervals, a: float, b: float) -> float:
  i = max(bisect.bisect_left(intervals, [a, a]) - 1, 0)
  total = 0.0
  while i < len(intervals) and intervals[i][0] < b:
    total += max(0.0, min(b, intervals[i][1]) - max(a, intervals[i][0]))
    i += 1
  return total


def summary(ops: list[dict], n: int) -> dict[str, dict[str, float]]:
  """Per op kind: ms of thread time per step, calls per step, and ms per
  step during which the other of the two busiest threads ran no op."""
  tids = [t for t, _ in collections.Counter(
      e['tid'] for e in ops).most_common(2)]
  busy = {t: _busy(ops, t) for t in tids}
  out = collections.defaultdict(lambda: dict(ms=0.0, calls=0.0, alone=0.0))
  for e in ops:
    row = out[kind(e['name'])]
    row['ms'] += e['dur'] / 1e3 / n
    row['calls'] += 1 / n
    if len(tids) == 2 and e['tid'] in tids:
      other = tids[1] if e['tid'] == tids[0] else tids[0]
      row['alone'] += (e['dur'] - _overlap(
          busy[other], e['ts'], e['ts'] + e['dur'])) / 1e3 / n
  return dict(out)


def table(dense: dict, sparse: dict, *, top: int = 15) -> str:
  keys = sorted(set(dense) | set(sparse), key=lambda k: -abs(
      sparse.get(k, {}).get('ms', 0) - dense.get(k, {}).get('ms', 0)))
  lines = ['| op | dense ms / step | sparse ms / step | difference | '
           'sparse calls / step | other thread idle (sparse), ms |',
           '| --- | --- | --- | --- | --- | --- |']
  for k in keys[:top]:
    d, s = dense.get(k, {}), sparse.get(k, {})
    lines.append(
        f'| {k} | {d.get("ms", 0):.1f} | {s.get("ms", 0):.1f} | '
        f'{s.get("ms", 0) - d.get("ms", 0):+.1f} | {s.get("calls", 0):.0f} | '
        f'{s.get("alone", 0):.1f} |')
  total_d = sum(v['ms'] for v in dense.values())
  total_s = sum(v['ms'] for v in sparse.values())
  lines.append(f'| all ops | {total_d:.1f} | {total_s:.1f} | '
               f'{total_s - total_d:+.1f} | | |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='t5_base')
  p.add_argument('--batch_size', type=int, default=1)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--recipe', default='ste')
  p.add_argument('--pattern', default='1:16')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--out', default='')
  a = p.parse_args()
  base = importlib.import_module(f'pgf.configs.{a.config}').get_config()
  bench = steps.Bench(base, batch_size=a.batch_size, dtype=a.dtype,
                      stock_model=False)
  bench.add(steps.RowSpec(a.recipe, a.recipe, nm=steps.parse_nm(a.pattern)))
  rows = bench.rows   # dense, then the recipe's
  steps.compile_rows(rows, warmup=2)
  dense, sparse = (summary(trace_ops(r.run, a.steps), a.steps) for r in rows)
  text = (f'{a.config}, batch {a.batch_size}, {a.dtype}: dense vs '
          f'{a.recipe} {a.pattern}, {a.steps} steps each, '
          f'{steps.device_name()}\n\n{table(dense, sparse)}\n')
  print(text)
  if a.out:
    with open(a.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
