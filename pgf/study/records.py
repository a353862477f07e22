"""What a run's workdir says about it: status, results, history.

pgf.train writes `final_metrics.json` (with "finished": true) when a run
ends, `metrics.jsonl` as it goes and `checkpoints/<step>/`; the study runner
adds `study.json` (the train flags and one entry per attempt) and appends
the run's output to `train.log`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Sequence

FINAL = 'final_metrics.json'
HISTORY = 'metrics.jsonl'
RECORD = 'study.json'
LOG = 'train.log'

# Run states, in the order reports list them.
FINISHED = 'finished'
PARTIAL = 'partial'    # Started, not finished (running, killed, or resumable).
FAILED = 'failed'      # The last attempt exited non-zero.
STALE = 'stale'        # Started with other train flags than the grid's now.
MISSING = 'missing'    # Never started.
STATES = (FINISHED, PARTIAL, FAILED, STALE, MISSING)


def read_json(path: str) -> Any:
  """The file's JSON, or None if it is absent or unreadable (cut short)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, value: Any) -> None:
  """Atomic: a reader never sees half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def final_metrics(workdir: str) -> dict:
  final = read_json(os.path.join(workdir, FINAL))
  return final if isinstance(final, dict) else {}


def is_finished(workdir: str) -> bool:
  return final_metrics(workdir).get('finished') is True


def latest_checkpoint(workdir: str) -> int | None:
  """The step of the newest complete checkpoint (orbax renames a finished
  save to its step number; temporary folders have other names)."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except OSError:
    return None
  steps = [int(n) for n in names if n.isdigit()]
  return max(steps) if steps else None


def history(workdir: str) -> list[dict]:
  """metrics.jsonl's records; a line cut by a kill is skipped, and values
  pgf wrote as strings ('nan', 'inf') become floats."""
  out = []
  try:
    with open(os.path.join(workdir, HISTORY)) as f:
      lines = f.readlines()
  except OSError:
    return out
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    out.append({k: _number(v) for k, v in record.items()})
  return out


def _number(value):
  if isinstance(value, str):
    try:
      return float(value)
    except ValueError:
      return value
  return value


def status(workdir: str, args: Sequence[str]) -> str:
  """The run's state given the train flags the grid gives it now."""
  record = read_json(os.path.join(workdir, RECORD)) or {}
  if record.get('args') is not None and list(record['args']) != list(args):
    return STALE
  if is_finished(workdir):
    return FINISHED
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return MISSING
  attempts = record.get('attempts') or []
  if attempts and attempts[-1].get('returncode') not in (None, 0):
    return FAILED
  return PARTIAL


def stale_args(workdir: str) -> list[str] | None:
  record = read_json(os.path.join(workdir, RECORD)) or {}
  return record.get('args')


def start_attempt(workdir: str, *, cell: str, seed: int,
                  args: Sequence[str], command: Sequence[str]) -> dict:
  """Records the start of an attempt in study.json; returns the record."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RECORD)
  record = read_json(path) or {}
  record.update(cell=cell, seed=seed, args=list(args))
  record.setdefault('attempts', []).append({
      'started': time.strftime('%Y-%m-%dT%H:%M:%S'), 'command': list(command),
      'resumed_from_step': latest_checkpoint(workdir), 'returncode': None,
      'seconds': None})
  write_json(path, record)
  return record


def end_attempt(workdir: str, *, returncode: int, seconds: float) -> None:
  path = os.path.join(workdir, RECORD)
  record = read_json(path) or {}
  if record.get('attempts'):
    record['attempts'][-1].update(returncode=returncode,
                                  seconds=round(seconds, 3))
    write_json(path, record)


def log_tail(workdir: str, lines: int = 20) -> str:
  """The last lines of the run's train.log."""
  try:
    with open(os.path.join(workdir, LOG), 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(f.tell() - 64 * 1024, 0))
      text = f.read().decode('utf-8', 'replace')
  except OSError:
    return ''
  return '\n'.join(text.splitlines()[-lines:])


def metric_value(final: dict, records: Sequence[dict], key: str
                 ) -> float | None:
  """`key` of final_metrics.json, else of the last metrics.jsonl record of
  the final step holding it (a run killed between its last checkpoint and
  final_metrics.json, then resumed, writes the file without the evaluation
  it had logged); None if absent or not finite."""
  value = final.get(key)
  if value is None:
    step = final.get('step')
    for record in reversed(records):
      if key in record and (step is None or record.get('step') == step):
        value = record[key]
        break
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None
