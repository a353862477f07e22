"""A 2-process run (jax.distributed on 127.0.0.1, one CPU device each) ends
where a 1-process run on 2 devices and one on 1 device end.

Tolerance: the 2-process and the 2-device runs compute the same sharded
program (the gradient all-reduce sums the same two partial sums, through
gloo in one case and in-process in the other), and are compared at
rel 1e-6; the 1-device run sums over the batch in another order, so it is
compared at rel 1e-4, abs 1e-5 (float32 reduction order, 6 steps).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from pgf import metrics as metrics_lib
from pgf import tasks
from pgf.configs import vit_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/vit_base.py:srste,1:4,runlocal'
OVERRIDES = {'total_steps': '6', 'batch_size': 16, 'eval_batch_size': 128,
             'log_every': '2', 'eval_every': '6', 'checkpoint_every': '3',
             'optimizer.warmup': '2', 'model.variant': 'mu/2'}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(data_dir, tmp_path):
  c = vit_base.get_config(CONFIG.split(':', 1)[1])
  c.data.data_dir = data_dir
  # Prepared here, once: the processes must not race to prepare it.
  tasks.task_class(c.task).pipeline.check_available(c)
  args = [sys.executable, '-m', 'pgf.train', f'--config={CONFIG}',
          f'--config.data.data_dir={data_dir}'] + [
              f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  port = _free_port()
  runs = {'2proc': [[f'--coordinator_address=127.0.0.1:{port}',
                     '--num_processes=2', f'--process_id={i}']
                    for i in range(2)],
          '2dev': [[]], '1dev': [[]]}
  procs = []
  for name, members in runs.items():
    devices = 2 if name == '2dev' else 1
    for extra in members:
      procs.append((name, subprocess.Popen(
          args + [f'--workdir={tmp_path / name}'] + extra, cwd=REPO,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
          env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count='
                   f'{devices}'))))
  for name, proc in procs:  # All at once: the pair needs each other.
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f'{name}:\n{out[-3000:]}'

  final, train_loss = {}, {}
  for name in runs:
    with open(tmp_path / name / 'final_metrics.json') as f:
      final[name] = json.load(f)
    records = metrics_lib.read_jsonl(str(tmp_path / name))
    train_loss[name] = [r['train/loss'] for r in records
                        if 'train/loss' in r]
  # Process 0 alone wrote the metrics: each logged step once.
  steps = {name: [r['step'] for r in metrics_lib.read_jsonl(
      str(tmp_path / name))] for name in runs}
  assert steps['2proc'] == steps['1dev'] == [0, 2, 4, 6, 6]
  assert len(train_loss['2proc']) == 3
  for key in ('eval/loss', 'eval/accuracy'):
    assert final['2proc'][key] == pytest.approx(final['2dev'][key], rel=1e-6)
    assert final['2proc'][key] == pytest.approx(final['1dev'][key],
                                                rel=1e-4, abs=1e-5)
  assert train_loss['2proc'] == pytest.approx(train_loss['2dev'], rel=1e-6)
  assert train_loss['2proc'] == pytest.approx(train_loss['1dev'], rel=1e-4,
                                              abs=1e-5)
  assert final['2proc']['flops/train'] == final['1dev']['flops/train']
