"""End to end: a tiny real grid through `python -m pgf.train` processes,
rerun after one run lost its last checkpoint, then reported."""

import json
import os

from pgf.study import Base
from pgf.study import Cell
from pgf.study import Grid
from pgf.study import plots
from pgf.study import records
from pgf.study import report as report_lib
from pgf.study import runner


def tiny_grid(data_dir: str) -> Grid:
  base = Base('configs/vit_base.py', 'srste,1:4,runlocal', overrides={
      'total_steps': '6', 'checkpoint_every': '3', 'eval_every': '3',
      'log_every': '3', 'batch_size': 16, 'eval_batch_size': 128,
      'data.data_dir': data_dir})
  return Grid(base, [Cell('srste'),
                     Cell('mdgf', 'mdgf_exp,1:4,runlocal',
                          overrides={'sparsity.ff.decay': 0.5},
                          references=('srste',))],
              seeds=(0,), title='tiny', scale='cpu')


def _mtimes(folder: str) -> dict[str, int]:
  out = {}
  for dirpath, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, folder)] = os.stat(path).st_mtime_ns
  return out


def _steps(workdir: str) -> list[int]:
  return [r['step'] for r in records.history(workdir)]


def test_grid_runs_skips_finished_resumes_unfinished(data_dir, tmp_path):
  grid = tiny_grid(data_dir)
  root = str(tmp_path / 'root')
  first = runner.run_grid(grid, root, parallel=2, device='cpu')
  assert not first.failed and first.skipped == []
  srste, mdgf = (os.path.join(root, c, 'seed_0') for c in ('srste', 'mdgf'))
  for workdir in (srste, mdgf):
    assert records.is_finished(workdir)
    assert records.latest_checkpoint(workdir) == 6
  steps = _steps(srste)
  assert steps == _steps(mdgf) == [0, 3, 3, 6, 6]
  config = json.load(open(os.path.join(mdgf, 'config.json')))
  assert config['sparsity']['ff']['decay'] == 0.5
  assert (config['seed'], config['batch_size']) == (0, 16)

  # srste: as if killed after its step-3 checkpoint.
  os.remove(os.path.join(srste, records.FINAL))
  os.rename(os.path.join(srste, 'checkpoints', '6'),
            str(tmp_path / 'checkpoint_6'))
  before = _mtimes(mdgf)
  second = runner.run_grid(grid, root, parallel=2, device='cpu')
  assert [(r.cell, r.seed) for r in second.skipped] == [('mdgf', 0)]
  assert [(o.run.cell, o.finished, o.resumed_from)
          for o in second.outcomes] == [('srste', True, 3)]
  assert _mtimes(mdgf) == before  # The finished run was not touched.
  log = open(os.path.join(srste, records.LOG)).read()
  assert log.count('==== pgf.study') == 2  # Appended, not overwritten.
  assert 'Resuming from checkpoint at step 3' in log
  assert _steps(srste) == steps  # Reads as one uninterrupted run.
  record = json.load(open(os.path.join(srste, records.RECORD)))
  assert [a['resumed_from_step'] for a in record['attempts']] == [None, 3]
  assert records.is_finished(srste)

  results = report_lib.collect(grid, root)
  report = report_lib.build_report(grid, results, root=root)
  assert report['counts']['finished'] == 2
  by_cell = {r['cell']: r for r in report['runs']}
  assert (by_cell['srste']['attempts'], by_cell['mdgf']['attempts']) == (2, 1)
  row = report['comparisons']['eval/accuracy'][0]
  assert (row['cell'], row['reference'], row['n']) == ('mdgf', 'srste', 1)
  acc = {r.cell: r.value('eval/accuracy') for r in results}
  assert row['mean'] == acc['mdgf'] - acc['srste']
  out = str(tmp_path / 'out')
  written = plots.plot_all(report, results, out)
  assert {'sparsity.png', 'differences.png', 'curves.png'} <= set(written)
  if all(r['flops/train'] for r in report['runs']):  # pgf.train reports it.
    assert 'flops.png' in written
  for name in written:
    assert os.path.getsize(os.path.join(out, name)) > 1000
