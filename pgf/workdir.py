"""A workdir belongs to one run: its config, one writer at a time.

  check_usable(workdir)                  # a directory pgf can write, or why not
  with WorkdirLock(workdir):             # one writer; a killed one's lock goes
    changes = check_config(workdir, config, allow=('eval_every',))
    write_config(workdir, config, changes)

`config.json` records the config a workdir was started with. A rerun with
the same flags resumes; a rerun whose config differs is refused before
anything is compiled or written, with one message listing the differing keys
(stored -> now), unless every difference is in a key of `SAFE_TO_CHANGE` and
named in `allow` (`--allow_config_change`). Keys that change what is trained
are never allowed: such a run is another run and needs another workdir.

The lock is `fcntl.flock` on `pgf.lock` in the workdir. The kernel drops it
when its process ends, however it ends, so the lock file a killed run leaves
behind never blocks a resume; the file only says who held the lock last
(pid, host, start time, command) for the message a second writer gets. It
works on local filesystems and on NFS (Linux maps flock to NFS locks). In a
multi-process run only process 0 takes the lock and writes pgf's own files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Iterable, Mapping

from absl import logging

CONFIG_FILE = 'config.json'
CONFIG_CHANGES_FILE = 'config_changes.jsonl'
LOCK_FILE = 'pgf.lock'

# Keys that may differ between the config a workdir was started with and the
# config of a resume, when named in --allow_config_change; each with why a
# change cannot alter the trained parameters. Anything else changes the run
# (the schedule, the data order, the model, the numerics or the iterator
# state) and is refused.
SAFE_TO_CHANGE: dict[str, str] = {
    'log_every': 'where the train metrics are averaged and logged; the step '
                 'that trains is the same one (not with diagnostics.enabled: '
                 'log steps then run a second compiled step)',
    'eval_every': 'evaluation reads the parameters and never changes them or '
                  'the training randomness',
    'checkpoint_every': 'a resumed run equals the uninterrupted one bit for '
                        'bit wherever its checkpoints fall',
    'keep_checkpoints': 'how many checkpoints stay on disk',
    'num_eval_examples': 'how many decoded examples an evaluation writes',
    'data.data_dir': 'where the prepared dataset is read from, not what it '
                     'holds (point it at the same dataset)',
    'data.source_dir': 'where pgf prepares its own datasets from; a prepared '
                       'dataset is not prepared again',
}
# Considered and refused: data.num_workers. The data order does not depend
# on it, but the grain iterator's saved state does ({'next_index'} without
# workers, one state per worker with them), so a checkpoint saved with one
# value cannot set the iterator of another.


class WorkdirError(Exception):
  """The workdir cannot be used for this run; the message says why."""


class ConfigChangedError(WorkdirError):
  pass


class WorkdirLockedError(WorkdirError):
  pass


def check_allowed(keys: Iterable[str]) -> tuple[str, ...]:
  """Validates --allow_config_change's keys; returns them."""
  keys = tuple(k.strip() for k in keys if k.strip())
  bad = [k for k in keys if k not in SAFE_TO_CHANGE]
  if bad:
    raise WorkdirError(
        f'--allow_config_change={",".join(keys)}: {", ".join(bad)} cannot '
        'change on resume (it changes what is trained); the keys that can: '
        f'{", ".join(SAFE_TO_CHANGE)}.')
  return keys


def check_usable(workdir: str, *, create: bool) -> None:
  """Raises WorkdirError unless `workdir` is (or, with `create`, can become)
  a directory pgf can write to; creates it with `create`."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} exists and is not a directory.')
  if not create:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.pgf_write_test.{os.getpid()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'--workdir={workdir} cannot be written: '
                       f'{e.strerror or e} ({e.filename or workdir}).'
                       ) from None


# ---- The config ------------------------------------------------------------

def normalised(config) -> dict[str, Any]:
  """The config as JSON would store it (tuples as lists), flattened to
  dotted keys: {'sparsity.ff.n': 1, ...}."""
  tree = json.loads(config.to_json_best_effort()) if hasattr(
      config, 'to_json_best_effort') else json.loads(json.dumps(config))
  return _flatten(tree)


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


_ABSENT = object()


def config_diff(stored: Mapping[str, Any], new: Mapping[str, Any],
                defaults: Mapping[str, Any] | None = None
                ) -> dict[str, tuple[Any, Any]]:
  """{key: (stored, new)} of the flattened configs' differences. A key only
  in `new` whose value is its default in `defaults` is no difference: keys
  added to pgf later keep the old behaviour at their default."""
  defaults = defaults or {}
  out = {}
  for key in sorted(set(stored) | set(new)):
    old, now = stored.get(key, _ABSENT), new.get(key, _ABSENT)
    if old is _ABSENT and key in defaults and now == defaults[key]:
      continue
    if old != now or type(old) is not type(now):
      out[key] = (old, now)
  return out


def _show(value) -> str:
  return '(absent)' if value is _ABSENT else json.dumps(value)


def read_stored_config(workdir: str) -> dict[str, Any] | None:
  """The flattened config.json of `workdir`, or None if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return _flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise WorkdirError(
        f'{path} cannot be read ({e}); it records the config this workdir '
        'was started with, so the run cannot be checked. Restore the file, '
        'or use a new --workdir.') from None


def check_config(workdir: str, config, *, allow: Iterable[str] = ()
                 ) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the workdir's config.json.

  Returns the accepted differences ({} when identical or when the workdir
  has no config.json yet); raises ConfigChangedError listing every
  difference unless all are in `allow` (a subset of SAFE_TO_CHANGE).
  """
  stored = read_stored_config(workdir)
  if stored is None:
    return {}
  from pgf.configs import base  # The defaults of keys added since.
  diff = config_diff(stored, normalised(config),
                     normalised(base.get_base_config()))
  allow = set(allow)
  refused = {k: v for k, v in diff.items() if k not in allow}
  if not refused:
    return diff
  lines = [f'  {k}: {_show(old)} -> {_show(new)}'
           for k, (old, new) in diff.items()]
  safe = [k for k in refused if k in SAFE_TO_CHANGE]
  unsafe = [k for k in refused if k not in SAFE_TO_CHANGE]
  advice = []
  if unsafe:
    advice.append(f'{", ".join(unsafe)} change{"s" if len(unsafe) == 1 else ""}'
                  ' what is trained: that is another run; give it a new '
                  '--workdir (or rerun with the stored values).')
  if safe:
    advice.append(f'{", ".join(safe)} may change on resume: add '
                  f'--allow_config_change={",".join(safe)}.')
  n = len(diff)
  raise ConfigChangedError(
      f'{workdir} holds a run started with another config '
      f'({os.path.join(workdir, CONFIG_FILE)}); {n} '
      f'{"keys differ" if n != 1 else "key differs"} (stored -> now):\n'
      + '\n'.join(lines) + '\n' + ' '.join(advice))


def write_config(workdir: str, config,
                 changes: Mapping[str, tuple[Any, Any]] | None = None) -> None:
  """Writes config.json (atomically); accepted `changes` are appended to
  config_changes.jsonl, so the workdir keeps what it was started with."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)
  if changes:
    record = {'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
              'changes': {k: [None if o is _ABSENT else o,
                              None if n is _ABSENT else n]
                          for k, (o, n) in changes.items()}}
    with open(os.path.join(workdir, CONFIG_CHANGES_FILE), 'a') as f:
      f.write(json.dumps(record) + '\n')
    logging.warning('Config of %s changed on resume (allowed): %s', workdir,
                    ', '.join(f'{k}: {_show(o)} -> {_show(n)}'
                              for k, (o, n) in changes.items()))


# ---- One writer ------------------------------------------------------------

class WorkdirLock:
  """An exclusive flock on workdir/pgf.lock while the `with` block runs."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    # O_CLOEXEC: a program started from this one does not inherit the lock.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f'Cannot lock {self.path}: {e}') from None
      raise WorkdirLockedError(_locked_message(self.workdir, holder)
                               ) from None
    info = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': time.strftime('%Y-%m-%dT%H:%M:%S'),
            'command': sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + '\n').encode(), 0)
    self._fd = fd

  def release(self) -> None:
    # The file stays: removing it would let a process that opened it before
    # the removal and one that creates it anew both hold "the" lock.
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _read_holder(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 65536, 0).decode())
  except (OSError, ValueError):
    return {}


def _locked_message(workdir: str, holder: dict) -> str:
  who = (f'pid {holder.get("pid")} on {holder.get("host")}, since '
         f'{holder.get("started")}: {" ".join(holder.get("command") or [])}'
         if holder else 'its holder did not say who it is')
  hint = ''
  pid = holder.get('pid')
  if holder.get('host') == socket.gethostname() and isinstance(pid, int):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      lock = os.path.join(workdir, LOCK_FILE)
      hint = (f' Process {pid} is gone; a process it started (a data worker) '
              f'still holds the lock: `fuser {lock}` names it.')
    except PermissionError:
      pass
  return (f'{workdir} is in use by another pgf.train ({who}). One writer per '
          'workdir: wait for it to finish or stop it, or give this run another '
          f'--workdir.{hint}')
