"""pgf.study's report on hand-made workdirs: status of a partial grid,
tables, paired comparisons with Holm's adjustment, markdown and plots."""

import json
import math
import os

import pytest

from pgf.study import Base
from pgf.study import Cell
from pgf.study import Grid
from pgf.study import grid as grid_lib
from pgf.study import plots
from pgf.study import records
from pgf.study import report as report_lib

ACCURACY = {  # cell -> eval/accuracy of seeds 0, 1, 2 (None: not finished).
    'dense': [0.90, 0.92, 0.91],
    'srste_1to8': [0.80, 0.82, 0.81],
    'mdgf_1to8': [0.83, 0.84, 0.85],
    'srste_1to32': [None, 0.72, 0.71],  # Seed 0 never started.
    'mdgf_1to32': [0.75, 0.73, None],   # Seed 2 killed before the end.
}
LAYERS = ('encoder/block_0/mlp/fc1', 'encoder/block_1/mlp/fc1')


def study_grid() -> Grid:
  cells = [Cell('dense', 'dense,runlocal')]
  for nm in ('1:8', '1:32'):
    tag = nm.replace(':', 'to')
    cells += [Cell(f'srste_{tag}', f'srste,{nm},runlocal'),
              Cell(f'mdgf_{tag}', f'mdgf_exp,{nm},runlocal',
                   references=(f'srste_{tag}', 'dense'))]
  return Grid(Base('configs/vit_base.py', 'runlocal'), cells,
              seeds=(0, 1, 2), title='hand-made', scale='cpu')


def history(accuracy: float, steps=(5, 10)) -> list[dict]:
  out = [{'step': 0, 'eval/accuracy': 0.1}]
  for i, step in enumerate(steps):
    out.append({'step': step, 'train/loss': 2.0 / (i + 1),
                **{f'diag/{layer}/grad_std': 0.1 * (i + 1) * (j + 1)
                   for j, layer in enumerate(LAYERS)},
                **{f'diag/{layer}/mask_change': 0.5 / (i + 1)
                   for layer in LAYERS}})
    out.append({'step': step, 'eval/accuracy': 0.5 if step < 10 else
                accuracy})
  return out


@pytest.fixture
def root(tmp_path):
  """Workdirs as pgf.train and the runner leave them."""
  root = str(tmp_path / 'root')
  for run in grid_lib.runs(study_grid(), root):
    accuracy = ACCURACY[run.cell][run.seed]
    if run.cell == 'srste_1to32' and run.seed == 0:
      continue
    records.start_attempt(run.workdir, cell=run.cell, seed=run.seed,
                          args=run.args, command=['python'])
    with open(os.path.join(run.workdir, records.HISTORY), 'w') as f:
      steps = (5,) if accuracy is None else (5, 10)
      for record in history(accuracy, steps):
        f.write(json.dumps(record) + '\n')
    if accuracy is None:
      continue  # Partial: no final_metrics.json.
    records.end_attempt(run.workdir, returncode=0, seconds=1.0)
    final = {'step': 10, 'finished': True, 'eval/accuracy': accuracy,
             'eval/loss': 1 - accuracy, 'flops/train': 1e12 * (run.seed + 1)}
    if run.cell == 'mdgf_1to32' and run.seed == 1:
      del final['eval/accuracy']  # Read from metrics.jsonl's step 10.
    records.write_json(os.path.join(run.workdir, records.FINAL), final)
  return root


def test_report_statistics(root):
  grid = study_grid()
  results = report_lib.collect(grid, root)
  report = report_lib.build_report(grid, results, root=root)
  json.dumps(report, allow_nan=False)  # Strict JSON.
  assert report['counts'] == {'finished': 13, 'partial': 1, 'failed': 0,
                              'stale': 0, 'missing': 1}
  assert report['cells']['mdgf_1to32']['status']['partial'] == [2]
  assert report['cells']['srste_1to32']['status']['missing'] == [0]
  assert report['cells']['mdgf_1to8']['sparsity'] == pytest.approx(7 / 8)
  assert report['tests']['p_perm'].startswith('exact sign-flip')

  table = report['tables']['eval/accuracy']
  assert table['srste_1to8']['n'] == 3
  assert table['srste_1to8']['mean'] == pytest.approx(0.81)
  assert table['srste_1to8']['sd'] == pytest.approx(0.01)
  assert (table['srste_1to8']['min'], table['srste_1to8']['max']) == (
      0.80, 0.82)
  assert table['mdgf_1to32']['values'] == {'0': 0.75, '1': 0.73}
  assert report['tables']['eval/loss']['dense']['mean'] == pytest.approx(
      0.09)

  rows = {(r['cell'], r['reference']): r
          for r in report['comparisons']['eval/accuracy']}
  assert len(rows) == 4
  # d = (0.03, 0.02, 0.04): mean 0.03, sd 0.01, t = 0.03 / (0.01 / sqrt 3)
  # with 2 df, where P(|T| >= t) = 1 - t / sqrt(2 + t^2).
  t = 3 * math.sqrt(3)
  p3 = 1 - t / math.sqrt(2 + t * t)
  row = rows['mdgf_1to8', 'srste_1to8']
  assert row['seeds'] == [0, 1, 2] and row['n'] == 3
  assert (row['mean'], row['sd']) == pytest.approx((0.03, 0.01))
  assert row['t'] == pytest.approx(t) and row['p_t'] == pytest.approx(p3)
  assert row['p_perm'] == 0.25 and row['p_perm_min'] == 0.25
  # d = (-0.07, -0.08, -0.06): sd 0.01 again, t = -0.07 / (0.01 / sqrt 3).
  t = 7 * math.sqrt(3)
  p7 = 1 - t / math.sqrt(2 + t * t)
  assert rows['mdgf_1to8', 'dense']['t'] == pytest.approx(-t)
  assert rows['mdgf_1to8', 'dense']['p_t'] == pytest.approx(p7)
  # 1:32 against SR-STE pairs only seed 1 (no t-test with one pair); against
  # dense seeds 0 and 1: d = (-0.15, -0.19), t = -0.17 / 0.02 = -8.5 with
  # 1 df (Cauchy), where P(|T| >= t) = 1 - 2 atan(t) / pi.
  one = rows['mdgf_1to32', 'srste_1to32']
  assert (one['seeds'], one['mean']) == ([1], pytest.approx(0.01))
  assert one['p_t'] is None and one['p_perm'] == 1.0
  p_b = 1 - 2 * math.atan(8.5) / math.pi
  assert rows['mdgf_1to32', 'dense']['seeds'] == [0, 1]
  assert rows['mdgf_1to32', 'dense']['p_t'] == pytest.approx(p_b)
  assert rows['mdgf_1to32', 'dense']['p_perm'] == 0.5
  # Holm over the three t-tests, ascending p7 < p3 < p_b: 3 p7, then the
  # running maximum of 2 p3 and p_b; the test not done stays out.
  holm = {k: r['p_t_holm'] for k, r in rows.items()}
  assert p7 < p3 < p_b
  assert holm['mdgf_1to8', 'dense'] == pytest.approx(3 * p7)
  assert holm['mdgf_1to8', 'srste_1to8'] == pytest.approx(
      max(3 * p7, 2 * p3))
  assert holm['mdgf_1to32', 'dense'] == pytest.approx(
      max(3 * p7, 2 * p3, p_b))
  assert holm['mdgf_1to32', 'srste_1to32'] is None
  # Sign-flip: 0.25, 0.25, 1.0 and 0.5 over four, each times >= 2: all 1.
  assert all(r['p_perm_holm'] == 1.0 for r in rows.values())

  by_run = {(r['cell'], r['seed']): r for r in report['runs']}
  assert by_run['dense', 2]['flops/train'] == 3e12
  assert by_run['mdgf_1to32', 2]['eval/accuracy'] is None


def test_report_markdown_and_plots(root, tmp_path):
  grid = study_grid()
  results = report_lib.collect(grid, root)
  report = report_lib.build_report(grid, results, root=root)
  out = str(tmp_path / 'out')
  written = plots.plot_all(report, results, out)
  assert written == ['sparsity.png', 'differences.png', 'flops.png',
                     'curves.png', 'diag_grad_std.png',
                     'diag_mask_change.png']
  for name in written:
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
  assert plots.diag_keys(results) == {'grad_std': list(LAYERS),
                                      'mask_change': list(LAYERS)}
  text = report_lib.markdown(report, plots=written)
  assert '13 finished, 1 partial, 0 failed, 0 stale, 1 missing' in text
  assert '| mdgf_1to32 | `mdgf_exp,1:32,runlocal` | 2 (0,1) | 1 (2) |' in text
  assert '| srste_1to8 | srste | 1:8 | 3 | 0.8100 +- 0.0100 |' in text
  assert '| mdgf_1to8 - srste_1to8 | 3 | +0.0300 |' in text
  assert 'exact sign-flip permutation test' in text
  assert '![flops](flops.png)' in text


def test_curves_average_over_seeds():
  steps, mean, sd = plots.mean_band([{0: 1.0, 5: 2.0}, {0: 3.0}])
  assert list(steps) == [0, 5]
  assert list(mean) == [2.0, 2.0]
  assert sd[0] == pytest.approx(math.sqrt(2)) and sd[1] == 0.0
  assert plots.series([{'step': 1, 'x': 0.5}, {'step': 2, 'x': 'nan'},
                       {'step': 3}], 'x') == {1: 0.5}


def test_report_without_flops_or_diagnostics(tmp_path):
  grid = Grid(Base('configs/vit_base.py', 'runlocal'),
              [Cell('a', 'srste,1:4')], seeds=(0,), scale='cpu')
  root = str(tmp_path / 'root')
  run = grid_lib.runs(grid, root)[0]
  records.start_attempt(run.workdir, cell='a', seed=0, args=run.args,
                        command=[])
  records.write_json(os.path.join(run.workdir, records.FINAL),
                     {'step': 4, 'finished': True, 'eval/accuracy': 0.5})
  results = report_lib.collect(grid, root)
  report = report_lib.build_report(grid, results)
  assert report['comparisons']['eval/accuracy'] == []
  assert report['tables']['eval/loss']['a']['n'] == 0
  written = plots.plot_all(report, results, str(tmp_path / 'out'))
  assert written == ['sparsity.png']  # No FLOPs, comparisons, histories.
