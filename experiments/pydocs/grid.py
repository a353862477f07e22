r"""The language study: SR-STE vs MdGf-Exponential at 2:4 and 1:32 on the
Python documentation, paired seeds.

  python -m pgf.study run experiments/pydocs/grid.py --parallel=2
  python -m pgf.study report experiments/pydocs/grid.py
  python -m pgf.study run experiments/pydocs/grid.py --scale=gpu --parallel=8

Every run is `python -m pgf.train --config=configs/pydocs_t5.py:<recipe>,
<N:M> --config.seed=<seed>`: a 'nano' T5 v1.1 (span corruption, byte
vocabulary) with all three FF matrices of every layer sparse. The primary
metric is eval/text_accuracy, the accuracy on the masked text bytes
(sentinels and EOS excluded: they are trivial to predict). Scale 'gpu': a
'micro' T5 (width 128) with longer inputs and more seeds.
"""

from pgf.study import Base
from pgf.study import Cell
from pgf.study import Grid

CONFIG = 'configs/pydocs_t5.py'
SCALES = {
    # scale: overrides of every cell, seeds
    'cpu': ({}, 3),
    'gpu': ({'model.variant': 'micro', 'data.inputs_length': 128,
             'data.targets_length': 32, 'batch_size': 64}, 5),
    'smoke': ({'total_steps': '8', 'log_every': '4', 'eval_every': '4',
               'checkpoint_every': '4',
               'data.eval_split': 'validation[:20]'}, 1),
}


def get_grid(scale: str) -> Grid:
  overrides, seeds = SCALES[scale]
  base = Base(CONFIG, 'dense,1:32', overrides=overrides)
  cells = [Cell('dense', 'dense', priority=9)]
  for nm in ('2:4', '1:32'):
    tag = nm.replace(':', 'to')
    cells.append(Cell(f'srste_{tag}', f'srste,{nm}', references=('dense',),
                      priority=9))
    cells.append(Cell(f'mdgf_exp_{tag}', f'mdgf_exp,{nm}',
                      references=(f'srste_{tag}', 'dense'), priority=9))
  return Grid(base, cells, seeds=range(seeds),
              metrics=('eval/text_accuracy', 'eval/loss', 'eval/accuracy'),
              title='SR-STE vs MdGf-Exponential, T5 on the Python docs')
