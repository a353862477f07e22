r"""Train and evaluate an N:M sparse Transformer: one linear loop.

  python -m pgf.train --config=configs/vit_base_1to16_mdgf.py --workdir=DIR
  python -m pgf.train                      # the embedded default, offline
  python -m pgf.train --config=... --dry_run

Rerunning with the same workdir resumes from the latest checkpoint that
restores (train state and data iterator position), so an interrupted run
ends where an uninterrupted one would; rerunning a finished run keeps its
results and writes nothing. The workdir is bound to the config it was
started with (config.json): a rerun with another config is refused before
anything is compiled, unless the only differences are in keys that cannot
change what is trained, named in --allow_config_change (pgf.workdir lists
them and why). One process writes a workdir at a time (a lock that dies with
its process). Errors in the command line, the config or the workdir end the
program with one message on stderr and exit status 1. The pieces of a step
(setup, state, the jitted steps) are in `pgf.step`.

Multi-process runs: --distributed calls jax.distributed.initialize(), which
detects TPU pods, Slurm and Open MPI by itself; elsewhere pass
--coordinator_address=HOST:PORT (process 0's host, a free port),
--num_processes=N and --process_id=I to each of the N processes (these flags
imply --distributed). On CPUs the cross-process collectives go through gloo,
JAX 0.10.2's default (jax_cpu_collectives_implementation). Every process
reads its slice of the same global batch (pgf.data.order), so a run on P
processes trains on the batches a 1-process run does and ends at the same
metrics up to float reduction order (tests/test_distributed.py: 2 processes
x 1 CPU device vs 1 x 2 at rel 1e-6, vs 1 x 1 at rel 1e-4). Process 0 alone
writes pgf's files (config.json, pgf.lock, metrics.jsonl, tensorboard/,
final_metrics.json); every process writes its own checkpoint shards, so the
workdir must be on a filesystem all processes share.

  # On 127.0.0.1, two processes with one CPU device each:
  XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu \
    python -m pgf.train --config=... --workdir=DIR \
    --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0 &
  (the same with --process_id=1)
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import math
import os
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow_datasets as tfds

from pgf import checkpointing
from pgf import config_lib
from pgf import data as data_lib
from pgf import metrics as metrics_lib
from pgf import sharding
from pgf import sparsity as sp
from pgf import step as step_lib
from pgf import tasks
from pgf import workdir as workdir_lib
from pgf.sparsity.sparsifier import flatten

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'configs', 'default.py')
FINAL_METRICS = 'final_metrics.json'
# The log line of a resume, followed by the step; scripts parse it.
RESUMING = 'Resuming from checkpoint at step'
PHASES = ('dense', 'sparse', 'fine_tune')


class NonFiniteLossError(FloatingPointError):
  pass


def _check_finite(pending: list[tuple[int, dict]]) -> None:
  for step, m in pending:
    loss = float(m['train/loss'])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f'Training loss became {loss} at step {step}; stopping without '
          'writing a checkpoint of this state. Lower optimizer.lr, enable '
          'optimizer.clip_norm, or resume from the last checkpoint.')


def _means(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """Exact means of the per-step metrics since the last log.

  Every value is a float32 of the device (or its exact float64 copy in a
  checkpoint), and `math.fsum` rounds the sum once, in any order: a resumed
  run logs bit for bit what an uninterrupted one does.
  """
  keys = pending[-1][1].keys()
  return {k: math.fsum(float(m[k]) for _, m in pending) / len(pending)
          for k in keys}


def read_final_metrics(workdir: str) -> dict | None:
  """The results of a finished run in `workdir`, or None."""
  path = os.path.join(workdir, FINAL_METRICS)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      final = json.load(f)
  except (OSError, ValueError) as e:
    # It is written atomically, so this is damage from outside: the rerun
    # resumes from the last checkpoint and writes the same results again.
    logging.warning('%s cannot be read (%s); the run is treated as not '
                    'finished.', path, e)
    return None
  return final if isinstance(final, dict) and final.get('finished') else None


class SetupError(ValueError):
  """A config or dataset problem found before anything was compiled."""


def train_and_evaluate(config, workdir: str, *,
                       allow_config_change: Sequence[str] = ()
                       ) -> dict[str, float]:
  """Trains, evaluates and checkpoints; returns the final metrics.

  Before anything is compiled or written, the workdir is checked
  (`pgf.workdir`): it must be a directory pgf can write to, not in use by
  another writer, and hold this config or none yet; keys of
  `pgf.workdir.SAFE_TO_CHANGE` named in `allow_config_change` may differ.
  A finished run returns its results and writes nothing. The latest
  checkpoint that restores is resumed (`Checkpointer.restore_latest`).
  Process 0 alone writes pgf's files (config.json, the lock, metrics,
  TensorBoard, final_metrics.json); every process writes its checkpoint
  shards.
  """
  allow = workdir_lib.check_allowed(allow_config_change)
  try:
    config_lib.validate_config(config)  # Before the workdir is touched.
  except ValueError as e:
    raise SetupError(str(e)) from e
  # Without jax.distributed this is process 0; asking JAX would start its
  # backend (and its log lines) before the checks below can fail.
  primary = (not jax.distributed.is_initialized()
             or jax.process_index() == 0)
  workdir_lib.check_usable(workdir, create=False)
  done_before = read_final_metrics(workdir)
  # Read-only: a refused run leaves the workdir as it found it.
  workdir_lib.check_config(workdir, config, allow=allow)
  if done_before is not None:
    logging.info('%s holds a finished run of %s steps; its results are kept '
                 'as they are.', workdir, done_before.get('step'))
    return {k: v for k, v in done_before.items()
            if k not in ('step', 'finished')}
  workdir_lib.check_usable(workdir, create=primary)
  with (workdir_lib.WorkdirLock(workdir) if primary
        else contextlib.nullcontext()):
    # Again, now that no other writer can change the workdir.
    changes = workdir_lib.check_config(workdir, config, allow=allow)
    try:
      s = step_lib.setup(config)
    except ValueError as e:
      raise SetupError(str(e)) from e
    if primary and (changes or workdir_lib.read_stored_config(workdir) is None):
      workdir_lib.write_config(workdir, config, changes)
    return _train(s, workdir)


THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def huge_page_hint(backend: str, *, environ=os.environ,
                   thp_path: str = THP_ENABLED,
                   libc: str | None = None) -> str | None:
  """A line for CPU runs whose malloc could use huge pages but does not.

  XLA:CPU allocates each step's large buffers afresh; with glibc's default
  they come from new small pages, faulted in on every step. With
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35, transparent huge
  pages `madvise` or `always`) malloc asks for huge pages: ViT-B/16 steps on
  a 2-core EPYC VM took 0.84-0.85x the time, with equal results (README).
  The tunable is read when the process starts, so pgf can only say so.
  """
  if backend != 'cpu' or 'glibc.malloc.hugetlb' in environ.get(
      'GLIBC_TUNABLES', ''):
    return None
  if libc is None:
    try:
      libc = os.confstr('CS_GNU_LIBC_VERSION') or ''
    except (ValueError, OSError):
      return None
  name, _, version = libc.partition(' ')
  try:
    if name != 'glibc' or tuple(map(int, version.split('.')[:2])) < (2, 35):
      return None
    with open(thp_path) as f:
      if '[never]' in f.read():
        return None
  except (ValueError, OSError):
    return None
  return ('Tip: started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, malloc '
          'gives XLA\'s buffers huge pages on this CPU: same results, '
          'steps about 15 % faster (ViT-B/16 on a 2-core CPU; README).')


def _train(s: step_lib.Setup, workdir: str) -> dict[str, float]:
  """The training loop of `train_and_evaluate`, once the workdir is ours."""
  config = s.config
  logging.info('Mesh %s; %d processes; run of %d steps (%d per epoch).',
               dict(s.mesh.shape), jax.process_count(), s.run.total,
               s.run.steps_per_epoch)
  hint = huge_page_hint(jax.default_backend())
  if hint:
    logging.info('%s', hint)
  logging.info('Sparsity plans: %s', [p.describe() for p in
                                      s.schedule.distinct_plans()])
  state = step_lib.init_state(s, jax.random.key(config.seed))
  train_iter = s.task.pipeline.make_train_iterator(
      config, global_batch_size=config.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(state, train_iter)
  host = {'pending': []}
  if restored is not None:
    state, host = restored
    logging.info('%s %d in %s.', RESUMING, int(state.step), ckpt.directory)
  start = int(state.step)
  writer = metrics_lib.MetricWriter(
      workdir, enabled=jax.process_index() == 0,
      resume_step=start if restored is not None else None)

  train_step = step_lib.make_train_step(s)
  stats_step = step_lib.make_stats_step(s)
  eval_step = step_lib.make_eval_step(s)
  progress = metrics_lib.Progress(s.run.total, start)
  batch_sh = sharding.batch_sharding(s.mesh)
  diagnose_on_logs = bool(s.diagnosed)
  # Per-step train metrics since the last log; saved with checkpoints so
  # that a resumed run logs the same means as an uninterrupted one.
  pending: list[tuple[int, dict]] = [(st, m) for st, m in host['pending']]
  last_eval: dict[str, float] = {}
  t0 = time.monotonic()
  if start == 0:
    # The untrained model's evaluation: the baseline every curve starts at.
    writer.write(0, step_lib.evaluate(s, eval_step, state, workdir))
  for step in range(start, s.run.total):
    plan = s.schedule.plan(step)
    done = step + 1
    is_last = done == s.run.total
    is_log = done % s.run.log_every == 0 or is_last
    batch = sharding.global_batch(next(train_iter), batch_sh)
    state, metrics = train_step(state, batch, plan,
                                diagnose_on_logs and is_log)
    pending.append((done, metrics))
    if is_log:
      pending = jax.device_get(pending)
      _check_finite(pending)
      # Diagnostics exist on log steps only: log their values, not means.
      summary = _means([(st, {k: v for k, v in m.items()
                              if not k.startswith('diag/')})
                        for st, m in pending])
      summary.update({k: float(v) for k, v in pending[-1][1].items()
                      if k.startswith('diag/')})
      if s.sparsifier.sparse_sites():
        stats, state = stats_step(state, plan)
        summary.update(jax.device_get(stats))
        summary.update(s.sparsifier.pattern_metrics(plan))
      summary['sparsity/phase'] = PHASES.index(s.schedule.phase(step))
      summary.update(progress.report(done))
      writer.write(done, summary)
      pending = []
    t = time.monotonic()
    if done % s.run.eval_every == 0 or is_last:
      last_eval = step_lib.evaluate(s, eval_step, state, workdir)
      writer.write(done, last_eval)
    if done % s.run.checkpoint_every == 0 or is_last:
      pending = jax.device_get(pending)
      _check_finite(pending)
      ckpt.save(done, state, train_iter, {'pending': [
          (st, {k: float(v) for k, v in m.items()}) for st, m in pending]})
    progress.exclude(time.monotonic() - t)
  ckpt.wait()
  ckpt.close()
  if not last_eval:
    # Killed after the last checkpoint but before the results were written:
    # the final evaluation is in metrics.jsonl already; recompute it (the
    # same state, the same numbers) for final_metrics.json only.
    last_eval = step_lib.evaluate(s, eval_step, state, workdir)
  final = dict(last_eval)
  if jax.process_index() == 0:
    final['train_seconds_this_run'] = time.monotonic() - t0
    final.update(_flops_summary(s))
    tmp = os.path.join(workdir, FINAL_METRICS + '.tmp')
    with open(tmp, 'w') as f:
      json.dump({'step': int(state.step), 'finished': True, **final}, f,
                indent=2)
    os.replace(tmp, os.path.join(workdir, FINAL_METRICS))
  writer.close()
  return final


def _flops_summary(s: step_lib.Setup) -> dict[str, float]:
  """The run's training and inference FLOPs (pgf.flops conventions)."""
  from pgf import flops as flops_lib  # Lowers the model: only at the end.
  report = flops_lib.flops_report(s.config, s.task, s.schedule, s.run)
  return {'flops/train': report.total_train,
          'flops/train_dense': report.total_train_dense,
          'flops/inference_per_example': report.inference}


def dry_run(config) -> str:
  """Checks a config and describes the run without allocating the model.

  Works on a laptop for a pod config: the dataset need not be prepared (its
  published size is used) and the mesh is described, not built.
  """
  from clu import parameter_overview  # Only the dry run prints the table.

  from pgf import flops as flops_lib  # Only the dry run needs it.
  pipeline = tasks.task_class(config.task).pipeline if (
      config.task in tasks.available()) else None
  try:
    info, run, schedule, task = step_lib.plan_run(config)
    data_note = 'prepared'
  except data_lib.DatasetNotPreparedError as e:
    counts = data_lib.published_counts(config.data.name)
    if counts is None or pipeline is None:
      raise
    info = pipeline.published_info(config, *counts)
    info, run, schedule, task = step_lib.plan_run(config, info=info)
    data_note = f'not prepared here ({e.args[0].splitlines()[0]})'
  abstract, sparsifier, _, _ = step_lib.abstract_model(config, run, schedule,
                                                       task)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  sparsifier.check_sharding({'data': 1, 'model': config.mesh.model}, rules)
  lines = [f'config: task={config.task}, model={config.model.name} '
           f'{config.model.variant}, data={config.data.name} ({data_note}), '
           f'{info.num_train_examples} train examples',
           f'run: {run.total} steps of batch {config.batch_size} '
           f'({run.steps_per_epoch} steps/epoch)']
  params = nn.unbox(abstract.params)
  sizes = {k: int(np.prod(v.shape)) for k, v in flatten(params).items()}
  total = sum(sizes.values())
  final = schedule.final_plan()
  sparse_sites = sparsifier.sparse_sites()
  sparse = sum(sparsifier.sites[p].size for p in sparse_sites)
  nonzero = total - sparse + sum(
      sparsifier.sites[p].size * r.nm.density
      for p, (r, _) in sparsifier.matched(final).items())
  lines += [f'parameters: {total:,} total, {sparse:,} in sparse kernels '
            f'({len(sparse_sites)} kernels), {int(nonzero):,} non-zero '
            f'after sparsity (density {nonzero / total:.4f})',
            f'sparsity: {final.describe()}; plans over the run: '
            f'{[p.describe() for p in schedule.distinct_plans()]}']
  report = flops_lib.flops_report(config, task, schedule, run)
  lines.append(report.describe())
  data = (config.mesh.data if config.mesh.data != -1 else
          f'-1 (device count / {config.mesh.model})')
  lines.append(f'mesh: data={data} x model={config.mesh.model}; '
               f'{jax.device_count()} device(s) on this machine')
  boxed = flatten(abstract.params)
  lines.append('largest parameters (logical axes -> mesh axes, resolved by '
               'Flax):')
  for key in sorted(sizes, key=sizes.get, reverse=True)[:8]:
    box = boxed[key]
    names = (tuple(box.names) if isinstance(box, nn.Partitioned)
             else (None,) * len(np.shape(box)))
    mesh_axes = sp.sparsifier.mesh_axes(names, rules)
    lines.append(f'  {key}: {sizes[key]:,} {names} -> '
                 f'PartitionSpec{tuple(mesh_axes)}')
  lines.append('parameter overview (clu):')
  lines.append(parameter_overview.get_parameter_overview(
      params, include_stats=False))
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when pgf.train is the program, so
  that other programs can import it as a library)."""
  config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG, 'Experiment config file (configs/*.py), '
      'optionally with an argument: file.py:runlocal.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and results; '
                      'default: workdirs/<config file name>[_<arg>].')
  flags.DEFINE_bool('dry_run', False, 'Validate the config, describe the run '
                    '(parameters, FLOPs, mesh) and exit without training.')
  flags.DEFINE_list(
      'allow_config_change', [], 'Config keys that may differ from the '
      "workdir's config.json when resuming; only keys that cannot change "
      f'what is trained: {", ".join(workdir_lib.SAFE_TO_CHANGE)}.')
  flags.DEFINE_bool(
      'distributed', False, 'Call jax.distributed.initialize() first: with '
      '--coordinator_address, --num_processes and --process_id, or from the '
      'cluster environment (TPU pods, Slurm, Open MPI) where they are absent.')
  flags.DEFINE_string(
      'coordinator_address', None, 'HOST:PORT where process 0 serves the '
      'coordinator; every process passes the same. Implies --distributed.')
  flags.DEFINE_integer('num_processes', None, 'Processes of a multi-process '
                       'run. Implies --distributed.')
  flags.DEFINE_integer('process_id', None, "This process's index, 0 to "
                       '--num_processes - 1. Implies --distributed.')


def _default_workdir() -> str:
  path = FLAGS['config'].config_filename
  name = os.path.splitext(os.path.basename(path.split(':')[0]))[0]
  arg = path.split(':', 1)[1] if ':' in path else ''
  return os.path.join('workdirs', name + (f'_{arg}' if arg else ''))


def _fail(message: str) -> None:
  """Ends the program with one message on stderr: no traceback, no usage."""
  sys.stderr.write(f'pgf.train: error: {message}\n')
  sys.stderr.flush()
  sys.exit(1)


def _root_cause(error: BaseException) -> BaseException:
  """The innermost exception of a chain (absl and ml_collections wrap a
  config file's error twice, the second time with its traceback as text)."""
  while True:
    inner = error.__cause__ or error.__context__
    if inner is None:
      return error
    error = inner


def _config_argument(argv: Sequence[str]) -> str:
  """The value of --config on the command line (or the default)."""
  value = DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _unknown_key(argv: Sequence[str]) -> str | None:
  """Names the first --config.KEY override that the config does not have."""
  path, _, arg = _config_argument(argv).partition(':')
  try:
    spec = importlib.util.spec_from_file_location('pgf_config_keys', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None  # The file itself fails; the flag error says how.
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0]
    node, seen = config, []
    for part in path.split('.'):
      where = '.'.join(seen) or 'the config'
      if not hasattr(node, 'keys'):
        return (f'{arg}: {where} is a value ({type(node).__name__}), not a '
                'section of keys.')
      keys = list(node.keys())
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=3)
        hint = (f' Did you mean {" or ".join(map(repr, close))}?' if close
                else '')
        return (f'{arg}: unknown config key {".".join(seen + [part])!r} '
                f'({where} has no {part!r}).{hint} Every key is declared, '
                'with a comment, in configs/base.py.')
      node = node[part]
      seen.append(part)
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one readable line for each way a --config
  argument can be wrong (absl and ml_collections print tracebacks)."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    cause = _root_cause(e)
    if str(e).startswith('flag --config=') and cause is not e:
      _fail(f'--config={_config_argument(argv)}: {cause}')
    _fail(f'{e}. Pass --helpshort for the flags.')
  except (AttributeError, KeyError, TypeError) as e:
    # ml_collections raises these for an override of a key the config lacks.
    _fail(_unknown_key(argv) or f'--config overrides: {e}')
  if not isinstance(FLAGS.config, ml_collections.ConfigDict):
    # ml_collections defers a config file's load error to the first access.
    path = _config_argument(argv).split(':', 1)[0]
    if not os.path.isfile(path):
      _fail(f'--config={_config_argument(argv)}: no config file {path!r} '
            f'(relative paths start at {os.getcwd()}).')
    try:
      FLAGS.config.keys()
    except OSError as e:
      _fail(f'--config={_config_argument(argv)}: {_root_cause(e)}')
    _fail(f'--config={_config_argument(argv)}: get_config() returned '
          f'{type(FLAGS.config).__name__}, not a ConfigDict.')
  return rest


def _initialize_distributed() -> None:
  """jax.distributed.initialize() with the flags that were given; JAX
  detects the others from the cluster environment."""
  given = {name: FLAGS[name].value for name in (
      'coordinator_address', 'num_processes', 'process_id')
           if FLAGS[name].value is not None}
  if not (FLAGS.distributed or given):
    return
  try:
    jax.distributed.initialize(**given)
  except (ValueError, RuntimeError) as e:
    args = ', '.join(f'{k}={v!r}' for k, v in given.items())
    _fail(f'jax.distributed.initialize({args}) failed: '
          f'{str(e).rstrip(".")}. Outside a '
          'detected cluster (TPU pod, Slurm, Open MPI), pass '
          '--coordinator_address=HOST:PORT, --num_processes=N and '
          '--process_id=I to every process.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _initialize_distributed()
  tfds.disable_progress_bar()  # Preparing pgf's own datasets is quick.
  quiet = metrics_lib.QuietLibraries()
  for handler in logging.get_absl_logger().handlers + [
      logging.get_absl_handler()]:
    handler.addFilter(quiet)
  config = FLAGS.config
  if FLAGS.dry_run:
    try:
      print(dry_run(config))
    except ValueError as e:  # Nothing is compiled by a dry run.
      _fail(str(e))
    return
  workdir = FLAGS.workdir or _default_workdir()
  try:
    final = train_and_evaluate(
        config, workdir, allow_config_change=FLAGS.allow_config_change)
  except (SetupError, NonFiniteLossError, workdir_lib.WorkdirError,
          checkpointing.RestoreError) as e:
    _fail(str(e))
  if jax.process_index() == 0:
    print(f'Done. Results in {os.path.abspath(workdir)}: metrics.jsonl, '
          'final_metrics.json, tensorboard/, checkpoints/.')
    print('Final: ' + ', '.join(f'{k}={v:.4f}' for k, v in final.items()
                                if isinstance(v, float)))


if __name__ == '__main__':
  define_flags()
  jax.config.config_with_absl()
  app.run(main, flags_parser=_parse_flags)
