"""One metrics writer (metrics.jsonl + TensorBoard + log) and progress.

clu's metric writers import TensorFlow, which the default install does not
have; this writer produces the same TensorBoard event files with
tensorboardX, and a `metrics.jsonl` with one object per logged step.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
import numpy as np


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
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # A run killed after logging but before its next checkpoint resumes from
    # that checkpoint: drop the lines it will write again, so the file reads
    # as one uninterrupted run.
    keep = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # A line cut by the kill.
          if resume_step is not None and record['step'] <= resume_step:
            keep.append(line if line.endswith('\n') else line + '\n')
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    self._file = open(self.path, 'a')
    from tensorboardX import SummaryWriter  # Heavy import, only when used.
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      clean[k] = v if math.isfinite(v) else str(v)
      self._tb.add_scalar(k, v, step)
    self._file.write(json.dumps({'step': int(step), **clean}) + '\n')
    self._file.flush()
    logging.info('[%d] %s', step, ', '.join(
        f'{k}={v:.5g}' if isinstance(v, float) else f'{k}={v}'
        for k, v in clean.items()))

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(name, text, step)

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


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
