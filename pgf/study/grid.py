"""A study's grid: cells of config overrides, each replicated over seeds.

A study is a Python file (e.g. experiments/<study>/grid.py) with a function
`get_grid(scale)` returning a `Grid`; `scale` (e.g. 'cpu' or 'gpu', from
`python -m pgf.study run ... --scale=gpu`) lets the file choose sizes, so a
larger version of the same grid runs unchanged. Overrides are plain Python
values, computed however the file likes:

  from pgf.study import Base, Cell, Grid

  def get_grid(scale):
    steps = {'cpu': 600, 'gpu': 20_000}[scale]
    base = Base('configs/vit_base.py', 'runlocal',
                overrides={'total_steps': str(steps)})
    cells = [Cell('dense', 'dense,runlocal')]
    for nm in ('1:8', '1:32'):
      tag = nm.replace(':', 'to')
      cells.append(Cell(f'srste_{tag}', f'srste,{nm},runlocal',
                        references=('dense',)))
      cells.append(Cell(f'mdgf_{tag}', f'mdgf_exp,{nm},runlocal',
                        references=(f'srste_{tag}', 'dense')))
    return Grid(base, cells, seeds=range(5))

Run (cell, seed) has the workdir `<root>/<cell>/seed_<seed>` and the command

  python -m pgf.train --config=<path>:<arg> --workdir=<dir> \
      --config.seed=<seed> --config.<key>=<value> ...

with the values written so that ml_collections parses them back (ints,
floats, strings, bools, tuples). `check_grid` parses every cell's flags
exactly as pgf.train will, before anything is launched.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import re
import sys
from typing import Any, Mapping, Sequence

CELL_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.+-]*')
PATTERN = re.compile(r'(\d+):(\d+)')
TRAIN_MODULE = 'pgf.train'


class GridError(ValueError):
  """A grid that cannot run (the message lists every problem found)."""


@dataclasses.dataclass(frozen=True)
class Base:
  """The experiment config every cell starts from.

  config: a config file, relative to the working directory or to the
    checkout that holds pgf (e.g. 'configs/vit_base.py').
  arg: its default config argument (e.g. 'srste,1:32,runlocal'); a cell's
    own `arg` replaces it.
  overrides: dotted config keys -> values, for every cell; a cell's own
    overrides win.
  """

  config: str
  arg: str = ''
  _: dataclasses.KW_ONLY
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One treatment of the study, replicated over seeds.

  name: the cell's folder under the root ([A-Za-z0-9_.+-]).
  arg: the config argument; None: the base's.
  overrides: dotted config keys -> values, over the base's overrides.
  seeds: None: the grid's seeds.
  recipe, pattern: how plots place the cell (e.g. 'srste', '1:32'); None:
    read from the config argument ('dense' recipes are the reference line).
  references: names of the cells this one is compared with, seed by seed;
    all the grid's references together form the family that Holm's
    adjustment covers.
  priority: higher runs first (all its seeds before lower priorities).
  """

  name: str
  arg: str | None = None
  _: dataclasses.KW_ONLY
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seeds: Sequence[int] | None = None
  recipe: str | None = None
  pattern: str | None = None
  references: Sequence[str] = ()
  priority: int = 0


@dataclasses.dataclass(frozen=True)
class Grid:
  """The cells of a study, their seeds and the metrics its report shows.

  metrics: keys of final_metrics.json; the first is the primary one (plots,
    ordering); each gets a table and paired comparisons.
  """

  base: Base
  cells: Sequence[Cell]
  _: dataclasses.KW_ONLY
  seeds: Sequence[int] = (0, 1, 2)
  metrics: Sequence[str] = ('eval/accuracy', 'eval/loss')
  title: str = ''
  scale: str = ''  # Set by load_grid: the scale the grid was made for.

  def cell(self, name: str) -> Cell:
    for c in self.cells:
      if c.name == name:
        return c
    raise KeyError(name)

  def seeds_of(self, cell: Cell) -> tuple[int, ...]:
    return tuple(int(s) for s in (self.seeds if cell.seeds is None
                                  else cell.seeds))

  def arg_of(self, cell: Cell) -> str:
    return self.base.arg if cell.arg is None else cell.arg

  def overrides_of(self, cell: Cell) -> dict[str, Any]:
    return {**self.base.overrides, **cell.overrides}

  def comparisons(self) -> list[tuple[str, str]]:
    """(cell, reference) pairs, in the grid's order."""
    return [(c.name, r) for c in self.cells for r in c.references]


@dataclasses.dataclass(frozen=True)
class Run:
  """One (cell, seed) of a grid.

  args: the train flags other than --workdir, with the config path as the
    grid names it: what a rerun must repeat for the run to resume.
  """

  cell: str
  seed: int
  workdir: str
  args: tuple[str, ...]
  config_file: str  # The config path resolved, for the subprocess.
  priority: int = 0

  def command(self, python: str | None = None) -> list[str]:
    """The `python -m pgf.train` command line of this run."""
    _, sep, arg = self.args[0][len('--config='):].partition(':')
    return [python or sys.executable, '-m', TRAIN_MODULE,
            f'--config={self.config_file}{sep}{arg}', *self.args[1:],
            f'--workdir={self.workdir}']


def format_value(value: Any) -> str:
  """A config value as a --config.KEY= flag value ml_collections parses
  back to the same value for a field of the value's type."""
  if hasattr(value, 'item') and not isinstance(value, (str, bytes)):
    value = value.item()  # numpy scalars.
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (int, str)):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)) or value is None:
    return repr(tuple(value) if isinstance(value, list) else value)
  raise GridError(f'Override value {value!r} of type {type(value).__name__} '
                  'cannot be passed as a flag (use int, float, str, bool, '
                  'tuple or None).')


def load_grid(path: str, *, scale: str = 'cpu') -> Grid:
  """Runs the grid file and returns its `get_grid(scale)`, checked."""
  if not os.path.isfile(path):
    raise GridError(f'No grid file at {path!r}.')
  name = 'pgf_study_grid_' + re.sub(r'\W', '_', os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_grid'):
    raise GridError(f'{path} defines no get_grid(scale) function.')
  grid = module.get_grid(scale)
  if not isinstance(grid, Grid):
    raise GridError(f'{path}: get_grid({scale!r}) returned '
                    f'{type(grid).__name__}, not pgf.study.Grid.')
  grid = dataclasses.replace(grid, scale=scale)
  validate(grid)
  return grid


def validate(grid: Grid) -> None:
  """Checks the grid's own structure (names, seeds, references, values)."""
  problems = []
  names = [c.name for c in grid.cells]
  if not names:
    problems.append('the grid has no cells')
  for name in sorted({n for n in names if names.count(n) > 1}):
    problems.append(f'cell name {name!r} is used more than once')
  if not grid.metrics:
    problems.append('the grid names no metrics')
  for cell in grid.cells:
    where = f'cell {cell.name!r}'
    if not CELL_NAME.fullmatch(cell.name):
      problems.append(f'{where}: a name must match {CELL_NAME.pattern}')
    seeds = grid.seeds_of(cell)
    if not seeds:
      problems.append(f'{where}: no seeds')
    if len(set(seeds)) != len(seeds):
      problems.append(f'{where}: repeated seeds {list(seeds)}')
    for ref in cell.references:
      if ref == cell.name:
        problems.append(f'{where}: references itself')
      elif ref not in names:
        problems.append(f'{where}: reference {ref!r} is not a cell '
                        f'({", ".join(names)})')
    for key, value in grid.overrides_of(cell).items():
      if key == 'seed':
        problems.append(f'{where}: override "seed": seeds come from the '
                        'grid (Cell.seeds / Grid.seeds)')
      try:
        format_value(value)
      except GridError as e:
        problems.append(f'{where}: override {key}: {e}')
  if problems:
    raise GridError('Grid problems:\n  ' + '\n  '.join(problems))


def resolve_config(path: str, *, grid_file: str | None = None) -> str:
  """An absolute config path: `path` itself, or relative to the working
  directory, the checkout that holds pgf, or the grid file's folder."""
  if os.path.isabs(path):
    candidates = [path]
  else:
    pgf_root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    candidates = [os.path.abspath(path), os.path.join(pgf_root, path)]
    if grid_file:
      candidates.append(os.path.join(os.path.dirname(
          os.path.abspath(grid_file)), path))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise GridError(f'Config file {path!r} not found (looked at '
                  f'{", ".join(candidates)}).')


def cell_args(grid: Grid, cell: Cell, seed: int) -> tuple[str, ...]:
  arg = grid.arg_of(cell)
  config = grid.base.config + (f':{arg}' if arg else '')
  return (f'--config={config}', f'--config.seed={seed}', *(
      f'--config.{k}={format_value(v)}'
      for k, v in grid.overrides_of(cell).items()))


def runs(grid: Grid, root: str, *, grid_file: str | None = None,
         only: str | None = None, seeds: Sequence[int] | None = None
         ) -> list[Run]:
  """The grid's runs in launch order: higher priority first, then seed
  rounds (the first seed of every cell, then the second, ...), then the
  grid's cell order, so that a partial grid is balanced across cells.

  only: a regex searched in cell names; seeds: run only these seeds.
  """
  config_file = resolve_config(grid.base.config, grid_file=grid_file)
  pattern = re.compile(only) if only else None
  keyed = []
  for index, cell in enumerate(grid.cells):
    if pattern and not pattern.search(cell.name):
      continue
    for rank, seed in enumerate(grid.seeds_of(cell)):
      if seeds is not None and seed not in seeds:
        continue
      run = Run(cell=cell.name, seed=seed,
                workdir=os.path.abspath(workdir_of(root, cell.name, seed)),
                args=cell_args(grid, cell, seed), config_file=config_file,
                priority=cell.priority)
      keyed.append(((-cell.priority, rank, index), run))
  return [run for _, run in sorted(keyed, key=lambda kr: kr[0])]


def workdir_of(root: str, cell: str, seed: int) -> str:
  return os.path.join(root, cell, f'seed_{seed}')


def parse_flags(argv: Sequence[str]):
  """The ConfigDict pgf.train would build from these flags (locked)."""
  from absl import flags  # Only checking needs absl and ml_collections.
  from ml_collections import config_flags
  argv = ['pgf.train', *argv]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def check_grid(grid: Grid, *, grid_file: str | None = None) -> dict:
  """Parses every cell's train flags as pgf.train will; returns cell name ->
  its ConfigDict (first seed). Raises one GridError naming every cell and
  key that does not exist or whose value does not parse."""
  from absl import flags
  from ml_collections.config_flags import config_path
  config_file = resolve_config(grid.base.config, grid_file=grid_file)
  problems, configs = [], {}
  for cell in grid.cells:
    where = f'cell {cell.name!r}'
    args = list(cell_args(grid, cell, grid.seeds_of(cell)[0]))
    args[0] = args[0].replace(grid.base.config, config_file, 1)
    try:
      plain = parse_flags(args[:1])
    except Exception as e:  # The config file's own error, e.g. its arg.
      problems.append(f'{where}: {args[0]}: {type(e).__name__}: {e}')
      continue
    missing = []
    for key in grid.overrides_of(cell):
      try:
        config_path.get_value(key, plain)
      except (AttributeError, KeyError, IndexError, ValueError):
        close = difflib.get_close_matches(key, _dotted_keys(plain), n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        missing.append(f'{where}: config key {key!r} does not exist in '
                       f'{args[0][len("--config="):]}{hint}')
    if missing:
      problems += missing
      continue
    try:
      configs[cell.name] = parse_flags(args)
    except (flags.Error, TypeError, ValueError) as e:
      problems.append(f'{where}: {e}')
  if problems:
    raise GridError('Grid problems:\n  ' + '\n  '.join(problems))
  return configs


def _dotted_keys(config, prefix: str = '') -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if hasattr(v, 'items'):
      keys += _dotted_keys(v, prefix + k + '.')
  return keys


def recipe_and_pattern(grid: Grid, cell: Cell) -> tuple[str, str | None]:
  """(recipe, pattern) of a cell for plots: its own fields, else the
  config argument's tokens (a recipe name pgf knows, an N:M),
  else the cell's name as the recipe."""
  tokens = [t.strip() for t in grid.arg_of(cell).split(',')]
  recipe, pattern = cell.recipe, cell.pattern
  if pattern is None:
    pattern = next((t for t in tokens if PATTERN.fullmatch(t)), None)
  if recipe is None:
    known = _known_recipes()
    recipe = next((t for t in tokens if t in known), cell.name)
  return recipe, pattern


def _known_recipes() -> tuple[str, ...]:
  """The recipe names config arguments take (pgf.sparsity.recipes, or the
  configs' own list in older checkouts); () if neither imports."""
  for module, name in (('pgf.sparsity.recipes', 'RECIPES'),
                       ('configs.common', 'RECIPES')):
    try:
      return tuple(getattr(importlib.import_module(module), name))
    except Exception:  # E.g. a checkout mid-change: try the next.
      continue
  return ()


def sparsity_of(pattern: str | None) -> float | None:
  """1 - N/M of an 'N:M' pattern."""
  match = PATTERN.fullmatch(pattern or '')
  if not match:
    return None
  n, m = (int(g) for g in match.groups())
  return 1 - n / m
