"""One metrics writer (metrics.jsonl + TensorBoard + log) and progress.

clu's metric writers import TensorFlow, which the default install does not
have; this writer produces the same TensorBoard event files with
tensorboardX's protos, and a `metrics.jsonl` with one object per logged step.

`metrics.jsonl` is the source of truth. A run killed after logging but
before its next checkpoint resumes from that checkpoint and logs those steps
again, so on every (re)start the writer keeps the records up to the resumed
step and rebuilds the TensorBoard events from them (pgf's own event files in
`tensorboard/` are replaced): the events hold every logged step exactly
once, whatever was or was not flushed before the kill. Events are written
synchronously and flushed with every record. Replayed points carry the
restart's wall time (metrics.jsonl keeps no times).
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import time

from absl import logging
import numpy as np

TENSORBOARD_DIR = 'tensorboard'
_EVENTS_GLOB = 'events.out.tfevents.*'


def read_jsonl(workdir: str) -> list[dict]:
  """The records of a run's metrics.jsonl, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Writes prefixed scalars ('train/loss', 'eval/accuracy', ...)."""

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._events = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # Keep the records up to the resumed step (None: a fresh start, none);
    # later ones will be written again by this run.
    keep = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # A line cut by the kill.
          if resume_step is not None and record['step'] <= resume_step:
            keep.append(record)
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)
      os.replace(tmp, self.path)
    self._file = open(self.path, 'a')
    self._events = _rebuild_events(os.path.join(workdir, TENSORBOARD_DIR),
                                   keep)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      clean[k] = v if math.isfinite(v) else str(v)
    record = {'step': int(step), **clean}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    _write_event(self._events, record)
    self._events.flush()
    logging.info('[%d] %s', step, ', '.join(
        f'{k}={v:.5g}' if isinstance(v, float) else f'{k}={v}'
        for k, v in clean.items()))

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._events.close()


def _rebuild_events(logdir: str, records: list[dict]):
  """A fresh event file in `logdir` holding `records`; pgf's earlier event
  files there are removed (they are derived from metrics.jsonl)."""
  # A heavy import, and only process 0 needs it.
  from tensorboardX.event_file_writer import EventsWriter
  os.makedirs(logdir, exist_ok=True)
  for path in glob.glob(os.path.join(logdir, _EVENTS_GLOB)):
    os.remove(path)
  events = EventsWriter(os.path.join(logdir, 'events'), '.pgf')
  for record in records:
    _write_event(events, record)
  events.flush()
  return events


def _write_event(events, record: dict) -> None:
  from tensorboardX.proto import event_pb2
  from tensorboardX.proto import summary_pb2
  # float(): metrics.jsonl stores nan and inf as strings (JSON has none).
  values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in record.items() if k != 'step']
  events.write_event(event_pb2.Event(
      wall_time=time.time(), step=int(record['step']),
      summary=summary_pb2.Summary(value=values)))


def read_events(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the scalars of every event file in
  `logdir`, in file and record order. Reads the TFRecord framing (length,
  masked CRC-32C of the length, data, masked CRC-32C of the data) with
  tensorboardX's protos, no TensorFlow; a record cut short or failing its
  CRC ends its file (a write interrupted by a kill)."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, _EVENTS_GLOB))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack('<Q', header)
      (crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
      body = data[pos + 12:pos + 12 + length]
      end = pos + 12 + length + 4
      if crc != masked_crc32c(header) or end > len(data) or struct.unpack(
          '<I', data[end - 4:end])[0] != masked_crc32c(body):
        logging.warning('%s: record at byte %d is cut short or corrupt; '
                        'the rest of the file is ignored.', path, pos)
        break
      event = event_pb2.Event.FromString(body)
      for value in event.summary.value:
        if value.WhichOneof('value') == 'simple_value':
          out.setdefault(value.tag, []).append((event.step,
                                                value.simple_value))
      pos = end
  return out


class Progress:
  """Steps/s and ETA between reports (excludes the first, compiling, step)."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self._last_step = start_step
    self._last_time = None
    self._excluded = 0.0

  def exclude(self, seconds: float) -> None:
    """Time spent outside training (evaluation, checkpoints) since the last
    report, left out of the steps/s."""
    self._excluded += seconds

  def report(self, step: int) -> dict:
    now = time.monotonic()
    out = {}
    if self._last_time is not None and step > self._last_step:
      elapsed = max(now - self._last_time - self._excluded, 1e-9)
      rate = (step - self._last_step) / elapsed
      eta = (self.total - step) / rate
      out['train/steps_per_sec'] = rate
      logging.info('step %d/%d (%.1f%%): %.2f steps/s, ETA %s', step,
                   self.total, 100 * step / self.total, rate, _hms(eta))
    self._last_step, self._last_time, self._excluded = step, now, 0.0
    return out


class QuietLibraries:
  """A logging filter that drops INFO records of chatty libraries (orbax,
  TFDS, grain) while keeping pgf's and every warning."""

  QUIET = ('orbax', 'tensorflow_datasets', 'grain', 'etils', 'absl/')

  def filter(self, record) -> bool:
    if record.levelno > 20:
      return True
    path = record.pathname.replace('\\', '/')
    return not any(f'/{q}' in path for q in self.QUIET)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
