"""The report's figures (matplotlib, Agg backend, PNG).

  sparsity.png     primary metric vs sparsity 1 - N/M (evenly spaced
                   patterns), one line per recipe through the cell means,
                   every seed a point; dense cells are a line with a +-sd
                   band
  differences.png  forest plot of the paired differences with their 95 %
                   t-intervals
  flops.png        primary metric vs training FLOPs ('flops/train' of
                   final_metrics.json), every seed a point, one marker per
                   recipe (only when runs report FLOPs)
  curves.png       eval metric and train loss vs step, mean over seeds with
                   a +-sd band, one column per pattern (dense cells in each)
  diag_<name>.png  per 'diag/<layer>/<name>' key: one panel per layer, one
                   line per cell, mean over seeds (when runs log them)

Only finished runs are drawn, as in the tables.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from pgf.study import grid as grid_lib
from pgf.study import records
from pgf.study import report as report_lib

DIAG = re.compile(r'diag/(.+)/([^/]+)')
MARKERS = 'osD^vP*Xh<>'


def _pyplot():
  import matplotlib  # Only reports draw.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _styles(report: dict) -> dict[str, tuple[str, str]]:
  """recipe -> (colour, marker), in order of first appearance."""
  recipes = list(dict.fromkeys(c['recipe'] for c in report['cells'].values()))
  return {r: (f'C{i % 10}', MARKERS[i % len(MARKERS)])
          for i, r in enumerate(recipes)}


def _finished(results: Sequence[report_lib.RunResult], cell: str):
  return [r for r in results if r.cell == cell
          and r.status == records.FINISHED]


def series(history: Sequence[dict], key: str) -> dict[float, float]:
  """step -> value of `key` over a run's records (finite values only)."""
  out = {}
  for record in history:
    value = record.get(key)
    if isinstance(value, (int, float)) and np.isfinite(value):
      out[record['step']] = float(value)
  return out


def mean_band(runs: Sequence[dict[float, float]]):
  """(steps, mean, sd) over runs at each step some run has; sd is 0 where
  fewer than two runs have the step."""
  steps = sorted(set().union(*runs)) if runs else []
  mean, sd = [], []
  for step in steps:
    v = np.array([r[step] for r in runs if step in r])
    mean.append(v.mean())
    sd.append(v.std(ddof=1) if v.size > 1 else 0.0)
  return np.array(steps), np.array(mean), np.array(sd)


def plot_sparsity(report: dict, path: str) -> bool:
  metric = report['metrics'][0]
  table, cells = report['tables'][metric], report['cells']
  sparse = {n: c for n, c in cells.items()
            if c['sparsity'] is not None and c['recipe'] != 'dense'}
  if not sparse:
    return False
  plt = _pyplot()
  styles = _styles(report)
  patterns = sorted({c['pattern'] for c in sparse.values()},
                    key=lambda p: grid_lib.sparsity_of(p))
  x_of = {p: i for i, p in enumerate(patterns)}
  recipes = list(dict.fromkeys(c['recipe'] for c in sparse.values()))
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  width = 0.25 / max(len(recipes), 1)
  for k, recipe in enumerate(recipes):
    colour, marker = styles[recipe]
    offset = (k - (len(recipes) - 1) / 2) * width
    line = []
    for name, cell in sparse.items():
      if cell['recipe'] != recipe:
        continue
      row = table[name]
      x = x_of[cell['pattern']] + offset
      values = list(row['values'].values())
      ax.scatter([x] * len(values), values, color=colour, marker=marker,
                 s=14, alpha=0.5)
      if row['mean'] is not None:
        line.append((x, row['mean']))
    if line:
      line.sort()
      ax.plot(*zip(*line), color=colour, marker=marker, label=recipe)
  for name, cell in cells.items():
    row = table[name]
    if cell['recipe'] == 'dense' and row['mean'] is not None:
      ax.axhline(row['mean'], color='k', ls='--', lw=1,
                 label=f'{name} (n={row["n"]})')
      if row['sd']:
        ax.axhspan(row['mean'] - row['sd'], row['mean'] + row['sd'],
                   color='k', alpha=0.08)
  ax.set_xlim(-0.5, len(patterns) - 0.5)
  ax.set_xticks(range(len(patterns)), [
      f'{p}\n{100 * grid_lib.sparsity_of(p):.1f}%' for p in patterns])
  ax.set_xlabel('pattern N:M (sparsity 1 - N/M)')
  ax.set_ylabel(metric)
  ax.set_title(_title(report, 'mean over seeds; points: seeds'))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _title(report: dict, what: str) -> str:
  return f'{report["title"] or "study"} ({report["scale"]}): {what}'


def plot_differences(report: dict, path: str) -> bool:
  metric = report['metrics'][0]
  rows = [r for r in report['comparisons'][metric] if r.get('mean')
          is not None]
  if not rows:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
  ys = np.arange(len(rows))[::-1]
  for y, row in zip(ys, rows):
    if row.get('low') is not None:
      ax.plot([row['low'], row['high']], [y, y], color='C0', lw=2)
    ax.plot(row['mean'], y, 'o', color='C0')
    p = row.get('p_t_holm')
    note = f'n={row["n"]}' + (f', Holm p (t) {p:.3g}' if p is not None
                                  else '')
    ax.annotate(note, (1.01, y), xycoords=('axes fraction', 'data'),
                va='center', fontsize=7)
  ax.axvline(0, color='k', lw=1)
  ax.set_yticks(ys, [f'{r["cell"]} - {r["reference"]}' for r in rows],
                fontsize=8)
  ax.set_xlabel(f'paired difference of {metric} (95 % t-interval)')
  ax.set_title(_title(report, 'paired differences'), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_flops(report: dict, path: str) -> bool:
  metric = report['metrics'][0]
  points = [r for r in report['runs'] if r.get(report_lib.FLOPS_KEY)
            and r.get(metric) is not None]
  if not points:
    return False
  plt = _pyplot()
  styles = _styles(report)
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  seen = set()
  for r in points:
    recipe = report['cells'][r['cell']]['recipe']
    colour, marker = styles[recipe]
    ax.scatter(r[report_lib.FLOPS_KEY], r[metric], color=colour,
               marker=marker, s=20, label=None if recipe in seen else recipe)
    seen.add(recipe)
  ax.set_xscale('log')
  ax.set_xlabel('training FLOPs of the run (flops/train)')
  ax.set_ylabel(metric)
  ax.set_title(_title(report, 'points: seeds'), fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _groups(report: dict) -> list[tuple[str, list[str]]]:
  """(title, cells) per pattern; cells without a pattern or with the dense
  recipe join every group."""
  cells = report['cells']
  shared = [n for n, c in cells.items()
            if c['pattern'] is None or c['recipe'] == 'dense']
  patterns = list(dict.fromkeys(
      c['pattern'] for n, c in cells.items() if n not in shared))
  if not patterns:
    return [('all cells', shared)]
  return [(p, [n for n, c in cells.items() if n in shared
               or c['pattern'] == p]) for p in patterns]


def _band(ax, runs, label, colour) -> None:
  steps, mean, sd = mean_band(runs)
  if not steps.size:
    return
  ax.plot(steps, mean, color=colour, label=f'{label} (n={len(runs)})')
  ax.fill_between(steps, mean - sd, mean + sd, color=colour, alpha=0.15)


def plot_curves(report: dict, results: Sequence[report_lib.RunResult],
                path: str) -> bool:
  metric = report['metrics'][0]
  keys = (metric, 'train/loss')
  groups = _groups(report)
  curves = {(name, key): [s for s in (series(r.history, key)
                                      for r in _finished(results, name)) if s]
            for _, names in groups for name in names for key in keys}
  if not any(curves.values()):
    return False
  plt = _pyplot()
  fig, axes = plt.subplots(len(keys), len(groups), squeeze=False,
                           figsize=(4.2 * len(groups), 3.2 * len(keys)))
  for j, (title, names) in enumerate(groups):
    for i, key in enumerate(keys):
      ax = axes[i][j]
      for k, name in enumerate(names):
        _band(ax, curves[name, key], name, f'C{k % 10}')
      ax.set_title(f'{title}: {key}', fontsize=9)
      ax.set_xlabel('step')
      ax.legend(fontsize=6)
  fig.suptitle(_title(report, 'mean over seeds, band +-sd'), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def diag_keys(results: Sequence[report_lib.RunResult]
              ) -> dict[str, list[str]]:
  """name -> layer paths of the 'diag/<layer>/<name>' keys of finished
  runs."""
  found: dict[str, dict[str, None]] = {}
  for r in results:
    if r.status != records.FINISHED:
      continue
    for record in r.history:
      for key in record:
        match = DIAG.fullmatch(key)
        if match:
          found.setdefault(match.group(2), {})[match.group(1)] = None
  return {name: sorted(layers) for name, layers in sorted(found.items())}


def plot_diagnostics(report: dict, results: Sequence[report_lib.RunResult],
                     out: str) -> list[str]:
  """One figure per diagnostic; returns the file names written."""
  written = []
  names = list(report['cells'])
  for diag, layers in diag_keys(results).items():
    plt = _pyplot()
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False,
                             figsize=(3.6 * cols, 2.8 * rows))
    for idx, layer in enumerate(layers):
      ax = axes[idx // cols][idx % cols]
      for k, name in enumerate(names):
        runs = [s for s in (series(r.history, f'diag/{layer}/{diag}')
                            for r in _finished(results, name)) if s]
        if runs:
          steps, mean, _ = mean_band(runs)
          ax.plot(steps, mean, color=f'C{k % 10}', label=name)
      ax.set_title(layer, fontsize=7)
      ax.set_xlabel('step', fontsize=7)
      ax.tick_params(labelsize=6)
    for idx in range(len(layers), rows * cols):
      axes[idx // cols][idx % cols].axis('off')
    axes[0][0].legend(fontsize=6)
    fig.suptitle(_title(report, f'{diag}, mean over seeds'), fontsize=10)
    fig.tight_layout()
    name = f'diag_{re.sub(r"[^A-Za-z0-9_.-]", "_", diag)}.png'
    fig.savefig(os.path.join(out, name), dpi=100)
    plt.close(fig)
    written.append(name)
  return written


def plot_all(report: dict, results: Sequence[report_lib.RunResult],
             out: str) -> list[str]:
  """Draws every figure that has data; returns the file names written."""
  os.makedirs(out, exist_ok=True)
  written = []
  for name, draw in (
      ('sparsity.png', lambda p: plot_sparsity(report, p)),
      ('differences.png', lambda p: plot_differences(report, p)),
      ('flops.png', lambda p: plot_flops(report, p)),
      ('curves.png', lambda p: plot_curves(report, results, p))):
    if draw(os.path.join(out, name)):
      written.append(name)
  return written + plot_diagnostics(report, results, out)
