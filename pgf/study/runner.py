"""Runs a grid's runs as parallel `python -m pgf.train` processes.

Rerunning skips finished runs and resumes the others: pgf.train resumes
from the latest checkpoint of a workdir when given the same flags, which
study.json records (a run whose recorded flags differ from the grid's now is
refused: its checkpoints belong to another experiment).

Threads: on a CPU each process gets cores / parallel threads. In JAX 0.10.2
the XLA CPU client sizes its intra-op pool from the NPROC environment
variable (else the CPUs of the process's affinity mask); XLA_FLAGS'
--xla_cpu_multi_thread_eigen=false and intra_op_parallelism_threads=1 leave
it at every core (measured: two busy XLA threads either way), so the runner
sets NPROC (NPROC=1: one busy thread, the Python one), and
OMP/MKL/OPENBLAS_NUM_THREADS for the libraries that read those; --threads
overrides it. Whether 2 processes x 1 thread beat 1 process x 2 threads on
a 2-core machine was not settled here: other jobs held 0.7-1.5 of its cores
in every trial (wall times of 2 x 200-step runs: 61-158 s either way). On a
GPU the processes share the device: each may grow (no preallocation) up to
0.9 / parallel of its memory.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

from absl import logging

from pgf.study import grid as grid_lib
from pgf.study import records

THREAD_VARS = ('NPROC', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS',
               'OPENBLAS_NUM_THREADS')


def detect_device(environ: Mapping[str, str] | None = None) -> str:
  """'gpu' when JAX will find an accelerator here, else 'cpu' (decided
  without importing JAX, which would claim GPU memory in this process)."""
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS', '').lower()
  if platforms:
    return 'cpu' if platforms.split(',')[0].strip() == 'cpu' else 'gpu'
  return 'gpu' if glob.glob('/dev/nvidia[0-9]*') or os.path.exists(
      '/dev/kfd') else 'cpu'


def cpu_count() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(
      os, 'sched_getaffinity') else os.cpu_count() or 1


def child_env(*, device: str, parallel: int, threads: int | None = None,
              mem_fraction: float | None = None,
              environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of one training process.

  threads: CPU threads per process; None: cores // parallel (at least 1);
    0: leave the thread variables as they are.
  mem_fraction: GPU memory share per process; None: 0.9 / parallel.
  """
  env = dict(os.environ if environ is None else environ)
  if device == 'cpu':
    if threads is None:
      threads = max(1, cpu_count() // parallel)
    if threads:
      env.update({k: str(threads) for k in THREAD_VARS})
  else:
    fraction = 0.9 / parallel if mem_fraction is None else mem_fraction
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{fraction:.3f}'
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  return env


def _hms(seconds: float | None) -> str:
  if seconds is None:
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


@dataclasses.dataclass
class Outcome:
  run: grid_lib.Run
  returncode: int
  seconds: float
  finished: bool
  resumed_from: int | None


@dataclasses.dataclass
class Summary:
  """What one invocation did."""

  skipped: list[grid_lib.Run]
  outcomes: list[Outcome]

  @property
  def failed(self) -> list[Outcome]:
    return [o for o in self.outcomes if not o.finished]


class _Progress:
  """Started/finished lines with the grid's ETA from the mean run time."""

  def __init__(self, total: int, parallel: int):
    self.total, self.parallel = total, parallel
    self.t0 = time.monotonic()
    self.started: dict[int, float] = {}  # id(run) -> start time.
    self.durations: list[float] = []
    self.done = 0
    self.lock = threading.Lock()

  def eta(self) -> float | None:
    if not self.durations:
      return None
    mean = sum(self.durations) / len(self.durations)
    now = time.monotonic()
    waiting = self.total - self.done - len(self.started)
    left = waiting * mean + sum(max(mean - (now - t), 0.0)
                                for t in self.started.values())
    return left / self.parallel

  def start(self, run: grid_lib.Run, resumed_from: int | None) -> None:
    with self.lock:
      self.started[id(run)] = time.monotonic()
      how = (f'resuming from step {resumed_from}' if resumed_from is not None
             else 'from scratch')
      logging.info('[%d/%d] start %s seed %d (%s); elapsed %s, ETA %s',
                   self.done + len(self.started), self.total, run.cell,
                   run.seed, how, _hms(time.monotonic() - self.t0),
                   _hms(self.eta()))

  def end(self, outcome: Outcome, note: str) -> None:
    with self.lock:
      self.started.pop(id(outcome.run), None)
      self.done += 1
      if outcome.finished:
        self.durations.append(outcome.seconds)
      log = logging.info if outcome.finished else logging.error
      log('[%d/%d] %s %s seed %d in %s%s; elapsed %s, ETA %s', self.done,
          self.total, 'done' if outcome.finished else 'FAILED',
          outcome.run.cell, outcome.run.seed, _hms(outcome.seconds), note,
          _hms(time.monotonic() - self.t0), _hms(self.eta()))


class Runner:
  """Launches runs in up to `parallel` processes at once."""

  def __init__(self, *, parallel: int, env: Mapping[str, str],
               python: str | None = None, metric: str = 'eval/accuracy',
               tail_lines: int = 20):
    self.parallel = max(1, parallel)
    self.env = dict(env)
    self.python = python or sys.executable
    self.metric = metric
    self.tail_lines = tail_lines
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()
    self._stopping = False

  def _launch(self, command: Sequence[str], log) -> subprocess.Popen | None:
    """Starts a training process; None once stop() was called."""
    with self._lock:
      if self._stopping:
        return None
      proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env=self.env, stdin=subprocess.DEVNULL)
      self._procs.add(proc)
      return proc

  def run_one(self, run: grid_lib.Run, progress: _Progress) -> Outcome:
    command = run.command(self.python)
    resumed_from = records.latest_checkpoint(run.workdir)
    records.start_attempt(run.workdir, cell=run.cell, seed=run.seed,
                          args=run.args, command=command)
    progress.start(run, resumed_from)
    t0 = time.monotonic()
    # Append: a resumed run keeps the log of its earlier attempts.
    with open(os.path.join(run.workdir, records.LOG), 'ab') as log:
      log.write(f'\n==== pgf.study {time.strftime("%Y-%m-%d %H:%M:%S")}: '
                f'{subprocess.list2cmdline(command)}\n'.encode())
      log.flush()
      try:
        proc = self._launch(command, log)
      except OSError as e:  # E.g. no such Python: a failed run.
        log.write(f'pgf.study: cannot start {command[0]}: {e}\n'.encode())
        returncode = 127
      else:
        returncode = -1 if proc is None else proc.wait()
        with self._lock:
          self._procs.discard(proc)
    seconds = time.monotonic() - t0
    records.end_attempt(run.workdir, returncode=returncode, seconds=seconds)
    finished = returncode == 0 and records.is_finished(run.workdir)
    outcome = Outcome(run=run, returncode=returncode, seconds=seconds,
                      finished=finished, resumed_from=resumed_from)
    if finished:
      value = records.final_metrics(run.workdir).get(self.metric)
      note = f' ({self.metric}={value:.4f})' if isinstance(
          value, (int, float)) else ''
    else:
      why = (f'exit {returncode}' if returncode else
             f'exit 0 without "finished" in {records.FINAL}')
      note = (f' ({why}); last lines of '
              f'{os.path.join(run.workdir, records.LOG)}:\n' +
              records.log_tail(run.workdir, self.tail_lines))
    progress.end(outcome, note)
    return outcome

  def stop(self) -> None:
    """Terminates the running processes (their last checkpoint stays)."""
    with self._lock:
      self._stopping = True
      procs = list(self._procs)
    for proc in procs:
      proc.terminate()
    for proc in procs:
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()

  def run(self, todo: Sequence[grid_lib.Run]) -> list[Outcome]:
    """Runs `todo` in order, `parallel` at a time; a failure does not stop
    the others. Ctrl-C terminates the processes and re-raises."""
    from concurrent import futures
    progress = _Progress(len(todo), self.parallel)
    pool = futures.ThreadPoolExecutor(max_workers=self.parallel)
    jobs = [pool.submit(self.run_one, run, progress) for run in todo]
    try:
      return [job.result() for job in jobs]
    except KeyboardInterrupt:
      for job in jobs:
        job.cancel()
      self.stop()
      raise
    finally:
      pool.shutdown(wait=True)


def check_stale(runs: Sequence[grid_lib.Run]) -> None:
  """Refuses to reuse a workdir started with other train flags."""
  stale = [r for r in runs
           if records.status(r.workdir, r.args) == records.STALE]
  if stale:
    lines = [f'{r.workdir}: started with {records.stale_args(r.workdir)}, '
             f'the grid now gives {list(r.args)}' for r in stale]
    raise grid_lib.GridError(
        'Runs started with other train flags (use another --root, or '
        'delete these workdirs to restart them):\n  ' + '\n  '.join(lines))


def prepare_data(configs: Mapping[str, object], *, python: str,
                 env: Mapping[str, str], log_path: str) -> None:
  """Prepares pgf's own datasets once before parallel runs would each
  prepare them at the same time in the same data_dir (which TFDS does not
  support). Other datasets are left alone: pgf.train says if they lack."""
  seen = set()
  for config in configs.values():
    data = config.data
    key = (data.name, data.data_dir, data.get('source_dir', ''))
    if key in seen or not data.name.startswith('pgf_'):
      continue
    seen.add(key)
    kwargs = f', source_dir={key[2]!r}' if key[2] else ''
    code = ('from pgf.data import builders; builders.ensure_prepared('
            f'{key[0]!r}, {key[1] or None!r}{kwargs})')
    logging.info('Preparing %s in %s (log: %s).', key[0],
                 key[1] or 'the default data_dir', log_path)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, 'ab') as log:
      rc = subprocess.call([python, '-c', code], stdout=log,
                           stderr=subprocess.STDOUT, env=dict(env),
                           stdin=subprocess.DEVNULL)
    if rc:
      logging.warning('Preparing %s failed (exit %d); the runs will say '
                      'why. Log: %s', key[0], rc, log_path)


def run_grid(grid: grid_lib.Grid, root: str, *, grid_file: str | None = None,
             parallel: int = 1, only: str | None = None,
             seeds: Sequence[int] | None = None, device: str | None = None,
             threads: int | None = None, mem_fraction: float | None = None,
             dry: bool = False, python: str | None = None) -> Summary:
  """Checks the grid, then runs what is not finished (see the module
  docstring). With dry=True, logs the plan and launches nothing."""
  python = python or sys.executable
  configs = grid_lib.check_grid(grid, grid_file=grid_file)
  todo_all = grid_lib.runs(grid, root, grid_file=grid_file, only=only,
                           seeds=seeds)
  device = device or detect_device()
  env = child_env(device=device, parallel=parallel, threads=threads,
                  mem_fraction=mem_fraction)
  states = {id(r): records.status(r.workdir, r.args) for r in todo_all}
  skipped = [r for r in todo_all if states[id(r)] == records.FINISHED]
  todo = [r for r in todo_all if states[id(r)] != records.FINISHED]
  if dry:
    for r in todo_all:
      action = {records.FINISHED: 'skip (finished)',
                records.MISSING: 'start',
                records.STALE: 'REFUSED (other train flags)'}.get(
                    states[id(r)], 'resume')
      logging.info('%s seed %d: %s: %s', r.cell, r.seed, action,
                   subprocess.list2cmdline(r.command(python)))
    logging.info('Environment of each run: %s', {
        k: env[k] for k in (*THREAD_VARS, 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                            'XLA_PYTHON_CLIENT_PREALLOCATE') if k in env})
    return Summary(skipped=skipped, outcomes=[])
  check_stale(todo_all)
  logging.info('%d runs: %d finished (skipped), %d to run, %d at a time on '
               '%s (%s).', len(todo_all), len(skipped), len(todo), parallel,
               device, ', '.join(f'{k}={env[k]}' for k in (
                   'NPROC', 'XLA_PYTHON_CLIENT_MEM_FRACTION') if k in env))
  if len(todo) > 1 and parallel > 1:
    used = {r.cell for r in todo}
    prepare_data({k: v for k, v in configs.items() if k in used},
                 python=python, env=env,
                 log_path=os.path.join(root, 'prepare.log'))
  runner = Runner(parallel=parallel, env=env, python=python,
                  metric=grid.metrics[0])
  outcomes = runner.run(todo)
  return Summary(skipped=skipped, outcomes=outcomes)
