"""A grid's results: status, per-cell tables, paired comparisons.

`build_report` reads every run's workdir and returns one JSON-able dict;
`markdown` renders it. Only finished runs enter the statistics; the status
table says how many of each cell's runs are finished, partial (started, not
finished), failed, stale (started with other train flags than the grid's
now) or missing, so a partial grid is reported as one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

from pgf.study import grid as grid_lib
from pgf.study import records
from pgf.study import stats

FLOPS_KEY = 'flops/train'


@dataclasses.dataclass
class RunResult:
  """One run of the grid as its workdir has it."""

  cell: str
  seed: int
  workdir: str
  status: str
  final: dict
  history: list[dict]

  def value(self, key: str) -> float | None:
    """`key` of a finished run (see records.metric_value); None otherwise."""
    if self.status != records.FINISHED:
      return None
    return records.metric_value(self.final, self.history, key)


def collect(grid: grid_lib.Grid, root: str, *,
            grid_file: str | None = None) -> list[RunResult]:
  """Every run the grid defines, finished or not, in the grid's order."""
  out = []
  for run in grid_lib.runs(grid, root, grid_file=grid_file):
    status = records.status(run.workdir, run.args)
    out.append(RunResult(
        cell=run.cell, seed=run.seed, workdir=run.workdir, status=status,
        final=records.final_metrics(run.workdir),
        history=(records.history(run.workdir)
                 if status != records.MISSING else [])))
  order = {c.name: i for i, c in enumerate(grid.cells)}
  return sorted(out, key=lambda r: (order[r.cell], r.seed))


def _clean(x: float | None) -> float | None:
  return None if x is None or not math.isfinite(x) else x


def build_report(grid: grid_lib.Grid, results: Sequence[RunResult], *,
                 root: str = '', grid_file: str = '') -> dict[str, Any]:
  """Status, tables and comparisons of every metric the grid names."""
  by_cell: dict[str, list[RunResult]] = {c.name: [] for c in grid.cells}
  for r in results:
    by_cell[r.cell].append(r)
  cells = {}
  for cell in grid.cells:
    recipe, pattern = grid_lib.recipe_and_pattern(grid, cell)
    runs = by_cell[cell.name]
    cells[cell.name] = {
        'arg': grid.arg_of(cell), 'recipe': recipe, 'pattern': pattern,
        'sparsity': grid_lib.sparsity_of(pattern),
        'overrides': {k: grid_lib.format_value(v)
                      for k, v in grid.overrides_of(cell).items()},
        'seeds': list(grid.seeds_of(cell)),
        'status': {s: sorted(r.seed for r in runs if r.status == s)
                   for s in records.STATES},
    }
  tables, comparisons = {}, {}
  for metric in grid.metrics:
    table = {}
    for cell in grid.cells:
      values = {r.seed: r.value(metric) for r in by_cell[cell.name]}
      values = {s: v for s, v in values.items() if v is not None}
      table[cell.name] = {**dataclasses.asdict(
          stats.summarize(list(values.values()))),
                          'values': {str(s): v for s, v in values.items()}}
    tables[metric] = table
    comparisons[metric] = _compare(grid, table)
  runs = [{'cell': r.cell, 'seed': r.seed, 'status': r.status,
           'workdir': r.workdir, 'step': r.final.get('step'),
           'train_seconds_this_run': r.final.get('train_seconds_this_run'),
           **_attempts(r.workdir),
           FLOPS_KEY: r.value(FLOPS_KEY),
           **{m: r.value(m) for m in grid.metrics}} for r in results]
  return {
      'title': grid.title, 'grid_file': grid_file, 'scale': grid.scale,
      'root': root, 'config': grid.base.config, 'metrics': list(grid.metrics),
      'tests': stats.TEST_NAMES, 'cells': cells, 'tables': tables,
      'comparisons': comparisons, 'runs': runs,
      'counts': {s: sum(r.status == s for r in results)
                 for s in records.STATES},
  }


def _attempts(workdir: str) -> dict[str, Any]:
  """How many times the runner started the run and their wall seconds."""
  record = records.read_json(os.path.join(workdir, records.RECORD)) or {}
  attempts = record.get('attempts') or []
  return {'attempts': len(attempts),
          'wall_seconds': sum(a.get('seconds') or 0.0 for a in attempts)}


def _compare(grid: grid_lib.Grid, table: dict) -> list[dict]:
  """Paired comparisons (cell - reference, same seeds) with Holm's
  adjustment over the family of every comparison the grid declares."""
  rows = []
  for cell, ref in grid.comparisons():
    x, y = table[cell]['values'], table[ref]['values']
    seeds = sorted((s for s in x if s in y), key=int)
    row = {'cell': cell, 'reference': ref, 'seeds': [int(s) for s in seeds],
           'n': len(seeds)}
    if seeds:
      test = stats.paired_test([x[s] for s in seeds], [y[s] for s in seeds])
      row.update({k: (_clean(v) if isinstance(v, float) else v)
                  for k, v in dataclasses.asdict(test).items()})
    rows.append(row)
  for test in ('p_t', 'p_perm'):
    adjusted = stats.holm([row.get(test) for row in rows])
    for row, p in zip(rows, adjusted):
      row[f'{test}_holm'] = p
  return rows


def _fmt(x: float | None, digits: int = 4) -> str:
  return 'n/a' if x is None else f'{x:.{digits}f}'


def _p(x: float | None) -> str:
  if x is None:
    return 'n/a'
  return f'{x:.2g}' if x < 0.001 else f'{x:.3f}'


def markdown(report: dict, *, plots: Sequence[str] = ()) -> str:
  """The report as markdown: status, one table per metric, comparisons,
  the tests used, and the plots."""
  lines = [f'# {report["title"] or "Study"}', '']
  c = report['counts']
  lines += [f'Grid `{report["grid_file"]}` (scale `{report["scale"]}`), '
            f'config `{report["config"]}`, runs under `{report["root"]}`: '
            + ', '.join(f'{c[s]} {s}' for s in records.STATES) + '.', '',
            '## Status', '',
            '| cell | config argument | ' + ' | '.join(records.STATES)
            + ' |', '| --- | --- |' + ' --- |' * len(records.STATES)]
  for name, cell in report['cells'].items():
    status = cell['status']
    lines.append(f'| {name} | `{cell["arg"]}` | ' + ' | '.join(
        (f'{len(status[s])} ({",".join(map(str, status[s]))})'
         if status[s] else '0') for s in records.STATES) + ' |')
  for metric in report['metrics']:
    lines += ['', f'## {metric}', '',
              'Finished runs only; sd over seeds (n - 1).', '',
              '| cell | recipe | pattern | n | mean +- sd | min | max |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for name, row in report['tables'][metric].items():
      cell = report['cells'][name]
      spread = f' +- {row["sd"]:.4f}' if row['sd'] is not None else ''
      lines.append(
          f'| {name} | {cell["recipe"]} | {cell["pattern"] or "-"} | '
          f'{row["n"]} | {_fmt(row["mean"])}{spread} | {_fmt(row["min"])} '
          f'| {_fmt(row["max"])} |')
    rows = report['comparisons'][metric]
    if rows:
      lines += ['', f'Paired differences of {metric} (cell - reference, '
                'same seeds):', '',
                '| cell - reference | n | mean | sd | 95 % t-interval | '
                'p (t) | p (t, Holm) | p (sign-flip) | smallest p '
                '(sign-flip) | p (sign-flip, Holm) |',
                '| --- |' + ' --- |' * 9]
      for row in rows:
        interval = (f'[{row["low"]:+.4f}, {row["high"]:+.4f}]'
                    if row.get('low') is not None else 'n/a')
        mean = f'{row["mean"]:+.4f}' if row.get('mean') is not None else \
            'n/a'
        lines.append(
            f'| {row["cell"]} - {row["reference"]} | {row["n"]} | {mean} | '
            f'{_fmt(row.get("sd"))} | {interval} | {_p(row.get("p_t"))} | '
            f'{_p(row.get("p_t_holm"))} | {_p(row.get("p_perm"))} | '
            f'{_p(row.get("p_perm_min"))} | {_p(row.get("p_perm_holm"))} |')
  lines += ['', '## Tests', '']
  lines += [f'- {k}: {v}' for k, v in report['tests'].items()]
  lines += ['- Holm families: the comparisons listed for one metric, '
            'adjusted separately for each test.',
            '- The sign-flip test cannot go below its smallest p: 2 / 2^n '
            'with n paired seeds (n = 5: 0.0625), so few seeds can never '
            'reach p < 0.05 with it.']
  if plots:
    lines += ['', '## Plots', '']
    lines += [f'![{os.path.splitext(p)[0]}]({p})' for p in plots]
  return '\n'.join(lines) + '\n'
