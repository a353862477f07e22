r"""Seeded studies: a grid of pgf.train runs, a parallel runner, statistics.

  python -m pgf.study run experiments/<study>/grid.py [--parallel=2]
      [--root=workdirs/<study>/<scale>] [--only=CELL_REGEX] [--seeds=0,1]
      [--scale=cpu] [--dry]
  python -m pgf.study report experiments/<study>/grid.py
      [--root=...] [--out=experiments/<study>/<scale>]

A grid file defines `get_grid(scale) -> Grid` with the dataclasses here
(pgf.study.grid has an example); seeds are the unit of replication.
Modules: grid (definition, flags, checking), runner (processes, resume,
threads), records (a workdir's files), stats (summaries, paired tests),
report (tables, comparisons, markdown), plots (figures).
"""

from pgf.study.grid import Base
from pgf.study.grid import Cell
from pgf.study.grid import Grid
