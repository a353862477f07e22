r"""An example grid: SR-STE vs MdGf-Exponential at 1:8 and 1:32, and dense.

  python -m pgf.study run pgf/study/example_grid.py --parallel=2 --dry
  python -m pgf.study run pgf/study/example_grid.py --scale=gpu

Copy it to experiments/<study>/grid.py to start a study. The 'tiny/2' ViT
of configs/vit_base.py's runlocal variant on pgf_digits (1,442 training
images), FF layers sparse; every run of a scale trains the same number of
epochs. As in experiments/recipes_digits, MdGf-Exponential's alpha reaches
0.01 at 60 % of the run (decay = ln(100) / (0.6 * steps)), computed here
from the steps, so the last 40 % trains the hard N:M mask.
"""

import math

from pgf.study import Base
from pgf.study import Cell
from pgf.study import Grid

TRAIN_EXAMPLES = 1442  # pgf_digits' train split.
SCALES = {
    # scale: (epochs, batch, seeds)
    'cpu': (27, 64, 5),     # 621 steps of 64.
    'gpu': (200, 256, 10),  # 1,200 steps of 256, twice the seeds.
}


def get_grid(scale: str) -> Grid:
  epochs, batch, seeds = SCALES[scale]
  steps = epochs * math.ceil(TRAIN_EXAMPLES / batch)
  base = Base('configs/vit_base.py', 'runlocal', overrides={
      'total_steps': str(steps), 'batch_size': batch,
      'log_every': str(max(steps // 20, 1)),
      'eval_every': str(max(steps // 4, 1)),
      'checkpoint_every': str(max(steps // 4, 1))})
  cells = [Cell('dense', 'dense,runlocal', priority=1)]
  for nm in ('1:8', '1:32'):
    tag = nm.replace(':', 'to')
    cells.append(Cell(f'srste_{tag}', f'srste,{nm},runlocal',
                      references=('dense',)))
    cells.append(Cell(
        f'mdgf_exp_{tag}', f'mdgf_exp,{nm},runlocal',
        overrides={'sparsity.ff.decay': math.log(100) / (0.6 * steps)},
        references=(f'srste_{tag}', 'dense')))
  return Grid(base, cells, seeds=range(seeds),
              metrics=('eval/accuracy', 'eval/loss'),
              title='SR-STE vs MdGf-Exponential, ViT tiny/2 on pgf_digits')
