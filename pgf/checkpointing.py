"""Orbax checkpoints of the train state, the data iterator position and
host-side state (JSON), restored from the newest one that restores.

Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp` and renames
it to `<step>` when complete, so a killed save leaves no half checkpoint
under a step's name. What a kill, a full disk or a person can still leave
(a truncated array file, garbled JSON metadata, a missing item, the
temporary directory of an unfinished save) is handled by `restore_latest`:
it tries the checkpoints newest first and restores the first that restores
completely, logging each one skipped with its path and error. Nothing is
deleted: skipped checkpoints newer than the restored one, which a later save
of the same step would collide with, and unfinished temporary directories,
which Orbax would delete when saving their step again, are moved into
`<workdir>/checkpoints_skipped/` (each move recorded in its `skipped.jsonl`).
When checkpoints exist but none restores, `RestoreError` lists what failed
and nothing is moved: starting over would overwrite the run's results.

The data iterator's state (a JSON-able dict, `get_state()`) travels in the
host item. In a multi-process run every process writes its shards of the
state (Orbax; the workdir must be shared) and process 0 the JSON item; the
processes agree on which checkpoint restored before going on.
"""

from __future__ import annotations

import json
import os
import re
import time

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

SKIPPED_DIR = 'checkpoints_skipped'
_TMP_SUFFIX = '.orbax-checkpoint-tmp'


class RestoreError(Exception):
  """Checkpoints exist, but none of them restores (the message lists why)."""


def _all_processes_agree(ok: bool) -> bool:
  """True on every process iff `ok` is true on every process."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray(int(ok), np.int32))
  return bool(np.all(flags))


def _summary(error: BaseException) -> str:
  """One line of an exception (TensorStore messages run to pages)."""
  text = ' '.join(str(error).split())
  text = text.split(' See full TensorStore details')[0]
  if len(text) > 300:
    text = text[:300] + '...'
  return f'{type(error).__name__}: {text}'


class Checkpointer:
  """Saves {'state', 'host'} every so often and restores the newest that
  restores."""

  def __init__(self, workdir: str, *, keep: int):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, host: dict) -> None:
    """`host`: JSON-able host-side state (e.g. metrics not yet logged)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        host=ocp.args.JsonSave({**host, 'data': data_iterator.get_state()})))

  def restore(self, step: int, abstract_state, data_iterator):
    """Returns (state, host) of checkpoint `step`; `data_iterator` is set in
    place. Raises whatever Orbax, TensorStore or JSON raise on a bad one."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        host=ocp.args.JsonRestore()))
    host = dict(restored['host'])
    data_iterator.set_state(host.pop('data'))
    state = restored['state']
    if int(state.step) != step:
      raise ValueError(f'the state inside is at step {int(state.step)}')
    return state, host

  def restore_latest(self, abstract_state, data_iterator):
    """(state, host) of the newest checkpoint that restores, or None when
    there is no checkpoint; see the module docstring."""
    failures: list[tuple[int, str, BaseException]] = []
    result = None
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = os.path.join(self.directory, str(step))
      try:
        result = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        # Corruption shows up as any of ValueError, KeyError, JSON, OSError
        # or TensorStore's own errors: whatever fails, the next one may not.
        result, error = None, e
      if _all_processes_agree(result is not None):
        break
      if result is not None:
        error = RuntimeError('another process could not restore it')
      result = None
      logging.warning('Checkpoint %s cannot be restored (%s); trying the '
                      'one before it.', path, _summary(error))
      failures.append((step, path, error))
    if result is None and failures:
      raise RestoreError(
          f'No checkpoint in {self.directory} restores:\n' + '\n'.join(
              f'  {path}: {_summary(e)}' for _, path, e in failures) +
          '\nNothing was moved or deleted. Starting over here would overwrite '
          'the results in this workdir: use a new --workdir, or move the '
          'checkpoints away first if you mean to start over.')
    if result is not None:
      logging.info('Restored checkpoint %s.',
                   os.path.join(self.directory, str(int(result[0].step))))
    self._set_aside(failures)
    return result

  def _set_aside(self, failures) -> None:
    """Moves skipped checkpoints and unfinished saves out of the way."""
    moves = [(path, f'checkpoint of step {step} did not restore: '
              f'{_summary(e)}', str(e)) for step, path, e in failures]
    for name in sorted(os.listdir(self.directory)):
      if re.fullmatch(r'\d+' + re.escape(_TMP_SUFFIX) + r'.*', name):
        moves.append((os.path.join(self.directory, name),
                      'unfinished save (Orbax temporary directory)', ''))
    if moves and jax.process_index() == 0:
      target = os.path.join(self.workdir, SKIPPED_DIR)
      os.makedirs(target, exist_ok=True)
      for path, reason, detail in moves:
        dest = os.path.join(target, os.path.basename(path))
        n = 1
        while os.path.exists(dest):
          dest = os.path.join(target, f'{os.path.basename(path)}.{n}')
          n += 1
        os.rename(path, dest)
        with open(os.path.join(target, 'skipped.jsonl'), 'a') as f:
          f.write(json.dumps({'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
                              'from': path, 'to': dest, 'reason': reason,
                              'error': detail}) + '\n')
        logging.warning('Moved %s to %s (%s), out of the way of later saves; '
                        'nothing was deleted.', path, dest, reason)
    if jax.process_count() > 1:
      # Every process waits for process 0's moves (it alone decides them:
      # the others may list the directory mid-move) and then rereads it.
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('pgf_checkpoints_set_aside')
      self.manager.reload()
    elif moves:
      self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
