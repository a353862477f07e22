r"""Fault injection: kills, corrupt checkpoints, changed configs, concurrent
writers and a 2-process run, each compared with an uninterrupted run.

  python scripts/fault_injection.py [--root=/tmp/pgf_faults] [--parallel=2]
      [--json=experiments/faults/results.json]

Every case runs `python -m pgf.train` (a tiny ViT, SR-STE 1:4, 12 steps,
checkpoints at 4, 8 and 12) as subprocesses on the CPU. A kill is a SIGKILL:
either the child sends it to itself at a chosen point (a hook installed by
this script's child wrapper: at the N-th train batch, right after a
checkpoint save is started, while Orbax's write is still in flight, during
an evaluation, halfway through a metrics.jsonl line, after the last
checkpoint) or this script sends it at a random time. The killed run is then
rerun with the same command until it finishes, and its final metrics,
metrics.jsonl and TensorBoard scalars (read back from the event files; both
without train/steps_per_sec, a measured rate) are compared with the
uninterrupted run's, bit for bit. Prints a Markdown table; --json writes
the rows.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pgf import metrics as metrics_lib  # noqa: E402
from pgf import train as train_lib  # noqa: E402

CONFIG = 'configs/vit_base.py:srste,1:4,runlocal'
OVERRIDES = {'total_steps': '12', 'batch_size': 16, 'eval_batch_size': 128,
             'log_every': '3', 'eval_every': '4', 'checkpoint_every': '4',
             'optimizer.warmup': '2'}
LAST = 12

# The child: pgf.train's main, with the fault of $PGF_FAULT installed first.
CHILD = r'''
import os, signal, sys
fault = os.environ.get('PGF_FAULT', '')
kind, _, arg = fault.partition(':')
n = int(arg) if arg else None

def die():
  sys.stdout.flush(); sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)

from pgf import checkpointing, metrics, step, train
from pgf.data import images
if kind == 'batch':  # SIGKILL when the n-th train batch is asked for.
  real_iter = images.make_train_iterator
  def make(*a, **k):
    it = real_iter(*a, **k)
    count = [0]
    class Dying:
      def __iter__(self): return self
      def __next__(self):
        count[0] += 1
        if count[0] == n: die()
        return next(it)
      get_state, set_state = it.get_state, it.set_state
    return Dying()
  images.make_train_iterator = make
elif kind in ('save', 'saved'):  # During / right after the step-n save.
  real_save = checkpointing.Checkpointer.save
  def save(self, st, *a, **k):
    real_save(self, st, *a, **k)
    if st == n:
      if kind == 'saved': self.wait()
      die()
  checkpointing.Checkpointer.save = save
elif kind == 'eval':  # In the evaluation at step n.
  real_eval = step.evaluate
  def evaluate(s, fn, state, workdir):
    if int(state.step) == n: die()
    return real_eval(s, fn, state, workdir)
  step.evaluate = evaluate
elif kind == 'jsonl':  # Halfway through the metrics line of step n.
  real_write = metrics.MetricWriter.write
  def write(self, st, scalars):
    if st == n and any(k.startswith('train/') for k in scalars):
      self._file.write('{"step": %d, "train/lo' % st); self._file.flush()
      die()
    return real_write(self, st, scalars)
  metrics.MetricWriter.write = write
elif kind == 'final':  # After the last checkpoint, before the results.
  train._flops_summary = lambda s: die()

from absl import app
import jax
sys.argv = ['pgf.train'] + sys.argv[1:]
train.define_flags()
jax.config.config_with_absl()
app.run(train.main, flags_parser=train._parse_flags)
'''


def train_args(workdir: str, data_dir: str, extra=(), overrides=None):
  o = {**OVERRIDES, **(overrides or {})}
  return ([f'--config={CONFIG}', f'--config.data.data_dir={data_dir}',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in
                                      o.items()] + list(extra))


def env_for(devices: int = 1, fault: str = '') -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PGF_FAULT=fault,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


@dataclasses.dataclass
class Run:
  returncode: int
  seconds: float
  output: str


def run(args, *, fault='', devices=1, kill_after=None, timeout=900) -> Run:
  """One child; SIGKILLed after `kill_after` seconds if given."""
  t0 = time.monotonic()
  proc = subprocess.Popen([sys.executable, '-c', CHILD, *args], cwd=REPO,
                          env=env_for(devices, fault), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    out, _ = proc.communicate(timeout=kill_after or timeout)
  except subprocess.TimeoutExpired:
    if kill_after is None:
      raise
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
  return Run(proc.returncode, time.monotonic() - t0, out)


# ---- What a workdir holds ---------------------------------------------------

def results(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'final_metrics.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    final = json.load(f)
  return {k: v for k, v in final.items() if k != 'train_seconds_this_run'}


# A measured rate, not a result: it differs between any two runs.
TIMING = 'train/steps_per_sec'


def records(workdir: str) -> list[dict]:
  return [{k: v for k, v in r.items() if k != TIMING}
          for r in metrics_lib.read_jsonl(workdir)]


def events(workdir: str) -> dict:
  return {tag: points for tag, points in metrics_lib.read_events(
      os.path.join(workdir, 'tensorboard')).items() if tag != TIMING}


def state_of(workdir: str) -> str:
  """What a killed run left: checkpoints, unfinished saves, last record."""
  ckpts = os.path.join(workdir, 'checkpoints')
  names = sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []
  done = [n for n in names if n.isdigit()]
  tmp = [n for n in names if not n.isdigit()]
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
  except OSError:
    lines = []
  last = 'none'
  if lines:
    try:
      last = str(json.loads(lines[-1])['step'])
    except ValueError:
      last = 'a cut line'
  return (f'ckpts {",".join(done) or "none"}'
          + (f'; unfinished {",".join(tmp)}' if tmp else '')
          + f'; last record {last}')


def compare(workdir: str, reference: str) -> dict:
  """Bit-equality of the results, the records and the TensorBoard scalars
  (each (tag, step) once) with the reference workdir's."""
  ev, ref_ev = events(workdir), events(reference)
  once = all(len({s for s, _ in pts}) == len(pts) for pts in ev.values())
  return {'final_equal': results(workdir) == results(reference),
          'jsonl_equal': records(workdir) == records(reference),
          'tb_equal': once and ev == ref_ev}


def _resumed_from(output: str) -> str:
  for line in output.splitlines():
    if train_lib.RESUMING in line:
      return line.split(train_lib.RESUMING)[1].split()[0]
  return 'start'


def _error_line(output: str) -> str:
  for line in output.splitlines():
    if line.startswith('pgf.train: error: '):
      return line[len('pgf.train: error: '):]
  return ''


def _finish(workdir, data_dir, reference, row, extra=()):
  """Reruns the run until it finishes (at most 3 times); fills `row`."""
  resumes = []
  for _ in range(3):
    r = run(train_args(workdir, data_dir, extra))
    resumes.append(_resumed_from(r.output))
    if r.returncode == 0:
      break
    row['note'] = _error_line(r.output) or r.output[-300:]
  row['resumed from'] = ', '.join(resumes)
  row.update(compare(workdir, reference))
  return row


# ---- Cases ------------------------------------------------------------------

KILLS = [
    ('batch:3', 'step 3, before the first checkpoint'),
    ('save:4', 'right after the step-4 save starts (Orbax writing)'),
    ('saved:8', 'right after the step-8 save completes'),
    ('eval:8', 'during the step-8 evaluation (before its checkpoint)'),
    ('batch:7', 'step 7, mid-way between checkpoints'),
    ('jsonl:9', 'halfway through the step-9 metrics line'),
    ('save:12', 'during the last save (step 12)'),
    ('final', 'after the last checkpoint, before final_metrics.json'),
]


def kill_case(fault, where, root, data_dir, reference):
  workdir = os.path.join(root, 'kill_' + fault.replace(':', '_'))
  r = run(train_args(workdir, data_dir), fault=fault)
  row = {'case': f'SIGKILL {where}', 'killed': r.returncode == -9,
         'left': state_of(workdir)}
  return _finish(workdir, data_dir, reference, row)


def random_kill_case(seed, root, data_dir, reference, full_seconds):
  workdir = os.path.join(root, f'kill_random_{seed}')
  at = random.Random(seed).uniform(0.3, 1.0) * full_seconds
  r = run(train_args(workdir, data_dir), kill_after=at)
  row = {'case': f'SIGKILL at a random time ({at:.1f} s, seed {seed})',
         'killed': r.returncode == -9, 'left': state_of(workdir)}
  return _finish(workdir, data_dir, reference, row)


def double_kill_case(root, data_dir, reference):
  workdir = os.path.join(root, 'kill_twice')
  a = run(train_args(workdir, data_dir), fault='batch:6')
  b = run(train_args(workdir, data_dir), fault='batch:4')  # Step 8's batch.
  row = {'case': 'SIGKILL at step 6, then at step 8 of the resume',
         'killed': a.returncode == b.returncode == -9,
         'left': state_of(workdir)}
  return _finish(workdir, data_dir, reference, row)


def truncate_largest_array_file(ckpt: str) -> None:
  files = [os.path.join(d, n) for d, _, ns in os.walk(
      os.path.join(ckpt, 'state')) for n in ns]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def garble(path: str) -> None:
  with open(path, 'wb') as f:
    f.write(b'\x00{garbled')


# name: (what it does to a checkpoint directory, how). Also the cases of
# tests/test_reliability.py.
CORRUPTIONS = {
    'truncated_array_file': ('truncated array file',
                             truncate_largest_array_file),
    'garbled_state_metadata': (
        'garbled state metadata (state/_METADATA)',
        lambda c: garble(os.path.join(c, 'state', '_METADATA'))),
    'garbled_host_json': (
        'garbled host JSON (host/metadata)',
        lambda c: garble(os.path.join(c, 'host', 'metadata'))),
    'missing_host_item': ('missing item (host/ deleted)',
                          lambda c: shutil.rmtree(os.path.join(c, 'host'))),
    'missing_state_item': ('missing item (state/ deleted)',
                           lambda c: shutil.rmtree(os.path.join(c, 'state'))),
    'leftover_tmp_dir': (
        'leftover Orbax temporary directory (<step>.orbax-checkpoint-tmp)',
        lambda c: os.rename(c, c + '.orbax-checkpoint-tmp')),
}


def _unfinished_copy(reference, workdir):
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, 'final_metrics.json'))


def corrupt_case(name, root, data_dir, reference):
  workdir = os.path.join(root, f'corrupt_{name}')
  _unfinished_copy(reference, workdir)
  what, corrupt = CORRUPTIONS[name]
  corrupt(os.path.join(workdir, 'checkpoints', str(LAST)))
  row = {'case': f'latest checkpoint: {what}', 'killed': '-',
         'left': state_of(workdir)}
  _finish(workdir, data_dir, reference, row)
  skipped = os.path.join(workdir, 'checkpoints_skipped')
  row['note'] = ('set aside: ' + ', '.join(sorted(
      n for n in os.listdir(skipped) if n != 'skipped.jsonl'))
                 if os.path.isdir(skipped) else 'nothing set aside')
  return row


def all_corrupt_case(root, data_dir, reference):
  workdir = os.path.join(root, 'corrupt_all')
  _unfinished_copy(reference, workdir)
  for step in (4, 8, 12):
    garble(os.path.join(workdir, 'checkpoints', str(step), 'host',
                         'metadata'))
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  r = run(train_args(workdir, data_dir))
  after = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  return {'case': 'every checkpoint corrupt', 'killed': '-',
          'left': state_of(workdir), 'resumed from': 'refused',
          'final_equal': '-', 'jsonl_equal': '-', 'tb_equal': '-',
          'note': f'exit {r.returncode}, nothing moved: {before == after}; '
                  f'"{_error_line(r.output)[:90]}..."'}


def changed_config_case(root, data_dir, reference):
  workdir = os.path.join(root, 'config_changed')
  _unfinished_copy(reference, workdir)
  r = run(train_args(workdir, data_dir, overrides={'sparsity.ff.n': 2}))
  message = _error_line(r.output)
  return {'case': 'rerun with --config.sparsity.ff.n=2', 'killed': '-',
          'left': state_of(workdir), 'resumed from': 'refused',
          'final_equal': '-', 'jsonl_equal': '-', 'tb_equal': '-',
          # pgf logs the mesh once setup is done, before compiling.
          'note': f'exit {r.returncode} after {r.seconds:.1f} s, '
                  f'{"before setup" if "Mesh " not in r.output else "late"}'
                  f': "{message[:60]}..."'}


def allowed_change_case(root, data_dir, reference):
  workdir = os.path.join(root, 'config_allowed')
  _unfinished_copy(reference, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(LAST)))
  r = run(train_args(workdir, data_dir, ['--allow_config_change=eval_every'],
                     overrides={'eval_every': '6'}))
  row = {'case': 'resume with --config.eval_every=6 '
                 '--allow_config_change=eval_every', 'killed': '-',
         'left': 'ckpts 4,8', 'resumed from': _resumed_from(r.output)}
  cmp = compare(workdir, reference)
  row.update(final_equal=cmp['final_equal'], jsonl_equal='- (other evals)',
             tb_equal='-', note=f'exit {r.returncode}')
  return row


def two_writers_case(root, data_dir, reference):
  workdir = os.path.join(root, 'two_writers')
  args = train_args(workdir, data_dir)
  first = subprocess.Popen([sys.executable, '-c', CHILD, *args], cwd=REPO,
                           env=env_for(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  lock = os.path.join(workdir, 'pgf.lock')
  while True:  # Until the first writer holds the lock.
    try:
      with open(lock) as f:
        if json.load(f)['pid'] == first.pid:
          break
    except (OSError, ValueError, KeyError):
      pass
    time.sleep(0.05)
  second = run(args)
  first.communicate(timeout=900)
  row = {'case': 'a second writer while the first trains', 'killed': '-',
         'left': '-', 'resumed from': '-'}
  row.update(compare(workdir, reference))
  row['note'] = (f'second: exit {second.returncode} after '
                 f'{second.seconds:.1f} s ("{_error_line(second.output)[:70]}'
                 f'..."); first: exit {first.returncode}')
  return row


def distributed_case(root, data_dir):
  """2 processes x 1 device vs 1 process x 2 devices vs 1 x 1 (6 steps)."""
  port = _free_port()
  o = {'total_steps': '6', 'eval_every': '6', 'checkpoint_every': '3',
       'log_every': '2'}
  launches = [('2proc', 1, [f'--coordinator_address=127.0.0.1:{port}',
                            '--num_processes=2', f'--process_id={i}'])
              for i in range(2)] + [('2dev', 2, []), ('1dev', 1, [])]
  procs = [(name, subprocess.Popen(
      [sys.executable, '-c', CHILD, *train_args(
          os.path.join(root, 'dist_' + name), data_dir, extra, o)],
      cwd=REPO, env=env_for(devices), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)) for name, devices, extra in
           launches]
  codes = {}
  for name, p in procs:
    p.communicate(timeout=900)
    codes.setdefault(name, []).append(p.returncode)
  out = {}
  for name in ('2proc', '2dev', '1dev'):
    wd = os.path.join(root, 'dist_' + name)
    if results(wd) is None:
      return {'case': '2 processes vs 1 process', 'note': f'failed: {codes}'}
    out[name] = (results(wd)['eval/loss'],
                 [r['train/loss'] for r in records(wd) if 'train/loss' in r])

  def gap(a, b):
    return max([abs(a[0] - b[0])] + [abs(x - y) for x, y in zip(a[1], b[1])])
  return {'case': '2 processes (1 CPU device each, gloo) vs 1 process',
          'killed': '-', 'left': '-', 'resumed from': '-',
          'final_equal': out['2proc'][0] == out['2dev'][0],
          'jsonl_equal': out['2proc'][1] == out['2dev'][1], 'tb_equal': '-',
          'note': f'exit codes {codes}; max abs diff of eval/loss and '
                  f'train/loss: vs 1x2 devices '
                  f'{gap(out["2proc"], out["2dev"]):.2g}, vs 1x1 device '
                  f'{gap(out["2proc"], out["1dev"]):.2g}'}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ---- Main -----------------------------------------------------------------

COLUMNS = ('case', 'killed', 'left', 'resumed from', 'final_equal',
           'jsonl_equal', 'tb_equal', 'note')


def table(rows) -> str:
  head = ('| case | SIGKILL | left behind | resumed from | final metrics = | '
          'metrics.jsonl = | TensorBoard = | note |')
  lines = [head, '|' + ' --- |' * len(COLUMNS)]
  for r in rows:
    cells = []
    for c in COLUMNS:
      v = r.get(c, '')
      v = {True: 'yes', False: '**no**'}.get(v, v) if isinstance(v, bool) else v
      cells.append(str(v).replace('|', '/'))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='/tmp/pgf_faults')
  parser.add_argument('--parallel', type=int, default=2)
  parser.add_argument('--json', default='')
  parser.add_argument('--random_kills', type=int, default=3)
  args = parser.parse_args()
  shutil.rmtree(args.root, ignore_errors=True)
  os.makedirs(args.root)
  data_dir = os.path.join(args.root, 'tfds')
  t0 = time.monotonic()
  reference = os.path.join(args.root, 'uninterrupted')
  first = run(train_args(reference, data_dir))  # Prepares the data too.
  if first.returncode:
    sys.exit(f'The uninterrupted run failed:\n{first.output[-3000:]}')
  print(f'uninterrupted run: {first.seconds:.1f} s', flush=True)
  jobs = [(kill_case, f, w) for f, w in KILLS]
  jobs += [(random_kill_case, s, first.seconds) for s in
           range(args.random_kills)]
  jobs += [(double_kill_case,)]
  jobs += [(corrupt_case, name) for name in CORRUPTIONS]
  jobs += [(all_corrupt_case,), (changed_config_case,),
           (allowed_change_case,), (two_writers_case,)]
  rows = [None] * (len(jobs) + 1)
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    futures = {}
    for i, (fn, *a) in enumerate(jobs):
      if fn is random_kill_case:
        call = (fn, a[0], args.root, data_dir, reference, a[1])
      else:
        call = (fn, *a, args.root, data_dir, reference)
      futures[pool.submit(*call)] = i
    futures[pool.submit(distributed_case, args.root, data_dir)] = len(jobs)
    for f in concurrent.futures.as_completed(futures):
      rows[futures[f]] = f.result()
      print(f'done: {rows[futures[f]]["case"]}', flush=True)
  print(f'\n{len(rows)} cases in {time.monotonic() - t0:.0f} s '
        f'(uninterrupted run {first.seconds:.1f} s)\n')
  print(table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'uninterrupted_seconds': first.seconds,
                 'total_seconds': time.monotonic() - t0, 'rows': rows}, f,
                indent=1, default=str)


if __name__ == '__main__':
  main()
