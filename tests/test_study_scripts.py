"""The GPU study script runs end to end at its 'smoke' scale on a CPU, so it
cannot break unnoticed before a GPU session runs it for real."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs the dataset-fashion-mnist package')
def test_gpu_study_script_smoke(data_dir, tmp_path):
  env = dict(os.environ, SMOKE='1', ONLY='^dense$',
             ROOT=str(tmp_path / 'runs'), OUT_ROOT=str(tmp_path / 'out'),
             TFDS_DATA_DIR=data_dir, JAX_PLATFORMS='cpu')
  r = subprocess.run(['bash', 'scripts/gpu_study.sh'], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
  for study in ('fmnist', 'pydocs'):
    out = tmp_path / 'out' / study / 'smoke'
    assert 'device: 1 x cpu' in (out / 'device.txt').read_text()
    results = json.loads((out / 'results.json').read_text())
    assert results  # The report's tables were written.
    for cell in ('dense',):
      final = tmp_path / 'runs' / study / 'smoke' / cell / 'seed_0' / (
          'final_metrics.json')
      assert json.loads(final.read_text())['finished']
