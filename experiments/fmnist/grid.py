r"""The vision study: recipes x N:M x paired seeds on Fashion-MNIST.

  python -m pgf.study run experiments/fmnist/grid.py --parallel=2
  python -m pgf.study run experiments/fmnist/grid.py --only='1to32' --seeds=0
  python -m pgf.study report experiments/fmnist/grid.py
  python -m pgf.study run experiments/fmnist/grid.py --scale=gpu --parallel=8

Every run is `python -m pgf.train --config=configs/fmnist_vit.py:<recipe>,
<N:M> --config.seed=<seed> ...`: a 'mini/7' ViT, FF layers sparse, 4 epochs
(scale 'cpu'). A seed fixes the initialisation and the data order, so cells
are compared seed by seed (paired). Cells, in the order they run:

  core (5 seeds): dense; SR-STE and MdGf-Exponential at 2:4 and 1:32 -- the
    paper's claim: decaying ahead of SR-STE at high sparsity, not at 2:4;
  1:32 (3 seeds): STE, MdGf-Linear, SdGf-Stepwise;
  iso-FLOPs (5 seeds): SR-STE at 1:32 trained for as many training FLOPs as
    MdGf-Exponential at 1:32 spends (pgf.flops.iso_flops_config: a longer
    run, its warm-up and cosine stretched);
  1:8 (3 seeds): SR-STE, MdGf-Exponential and SdGf-Geometric (its 8:64
    frame fits the 64-wide FF input; at 1:32 its first frame 8:256 needs
    contraction lengths of 256, which the 64-wide model does not have);
  1:16 with diagnostics (3 seeds): dense, STE, SR-STE, MdGf-Exponential,
    logging per-layer gradient std, mask change, AdamW second-moment
    variance and noise-to-signal (Figure 3 of the paper).

Scale 'gpu': the same cells on a 'wide/4' ViT (width 256, 4 blocks, MLP
1024), batch 256, with more seeds, plus SdGf-Geometric at 1:32 (its 8:256
frame fits), for one H100/H200 (scripts/gpu_study.sh). Scale 'smoke': 8
steps, one seed, to check the scripts.
"""

import functools

from pgf.study import Base
from pgf.study import Cell
from pgf.study import Grid

CONFIG = 'configs/fmnist_vit.py'
SMOKE = {'total_steps': '8', 'log_every': '4', 'eval_every': '4',
         'checkpoint_every': '4'}
SCALES = {
    # scale: overrides of every cell, seeds (core, other)
    'cpu': ({}, 5, 3),
    'gpu': ({'model.variant': 'wide/4', 'batch_size': 256}, 8, 4),
    'smoke': (SMOKE, 1, 1),  # A seconds-long check of the scripts.
}


@functools.lru_cache(maxsize=None)
def iso_flops_steps(scale: str, nm: str) -> int:
  """Steps at which SR-STE at `nm` costs the training FLOPs of
  MdGf-Exponential at `nm` (same model, batch and data)."""
  from pgf import flops
  from pgf import step
  from pgf.configs import fmnist_vit
  overrides = _base_overrides(scale)

  def config(recipe):
    c = fmnist_vit.get_config(f'{recipe},{nm}')
    for key, value in overrides.items():
      *parents, name = key.split('.')
      node = c
      for part in parents:
        node = node[part]
      node[name] = value
    return c

  mdgf = config('mdgf_exp')
  info, run, schedule, task = step.plan_run(mdgf)
  costs = flops.model_costs(task)
  target = flops.flops_report(mdgf, task, schedule, run,
                              costs=costs).total_train
  srste, _ = flops.iso_flops_config(
      config('srste'), target, costs=costs, task=task,
      num_train_examples=info.num_train_examples)
  return int(srste.total_steps)


def _steps(overrides) -> int:
  if 'total_steps' in overrides:
    return int(overrides['total_steps'])
  from pgf.configs import fmnist_vit
  batch = overrides.get('batch_size', 128)
  return fmnist_vit.EPOCHS * (60_000 // batch)


def _rescaled(scale: str) -> bool:
  from pgf.configs import fmnist_vit
  return _steps(SCALES[scale][0]) != fmnist_vit.EPOCHS * (60_000 // 128)


def _base_overrides(scale: str) -> dict:
  """The scale's overrides; where its run length is not the config's, with
  MdGf's coefficient for that length (alpha 0.01 at 60 % of the run)."""
  from pgf.configs import fmnist_vit
  overrides = dict(SCALES[scale][0])
  if _rescaled(scale):
    overrides['sparsity.ff.decay'] = fmnist_vit.decay_for(
        'mdgf_exp', _steps(overrides))
  return overrides


def get_grid(scale: str) -> Grid:
  from pgf.configs import fmnist_vit
  _, core_seeds, other_seeds = SCALES[scale]
  core, other = range(core_seeds), range(other_seeds)
  overrides = _base_overrides(scale)
  steps, rescaled = _steps(overrides), _rescaled(scale)
  base = Base(CONFIG, 'dense,1:32', overrides=overrides)
  cells = [Cell('dense', 'dense', priority=9)]
  for nm in ('2:4', '1:32'):
    tag = nm.replace(':', 'to')
    cells.append(Cell(f'srste_{tag}', f'srste,{nm}', references=('dense',),
                      priority=9))
    cells.append(Cell(f'mdgf_exp_{tag}', f'mdgf_exp,{nm}',
                      references=(f'srste_{tag}', 'dense'), priority=9))
  for recipe in ('ste', 'mdgf_linear', 'sdgf_stepwise'):
    extra = ({'sparsity.ff.decay': fmnist_vit.decay_for(recipe, steps)}
             if recipe == 'mdgf_linear' and rescaled else {})
    cells.append(Cell(f'{recipe}_1to32', f'{recipe},1:32', seeds=other,
                      overrides=extra, references=('srste_1to32', 'dense'),
                      priority=5))
  iso = iso_flops_steps(scale, '1:32')
  cells.append(Cell(
      'srste_1to32_isoflops', 'srste,1:32', recipe='srste_isoflops',
      pattern='1:32', overrides={'total_steps': str(iso)},
      references=('mdgf_exp_1to32', 'srste_1to32'), priority=4))
  for recipe in ('srste', 'mdgf_exp', 'sdgf_geometric'):
    refs = () if recipe == 'srste' else ('srste_1to8', 'dense')
    cells.append(Cell(f'{recipe}_1to8', f'{recipe},1:8', seeds=other,
                      references=refs, priority=3))
  if scale == 'gpu':
    # The wider model holds SdGf-Geometric's first 1:32 frame, 8:256.
    cells.append(Cell('sdgf_geometric_1to32', 'sdgf_geometric,1:32',
                      seeds=other, references=('srste_1to32', 'dense'),
                      priority=5))
  diag_refs = {'dense': (), 'srste': ('dense_1to16_diag',),
               'ste': ('srste_1to16_diag', 'dense_1to16_diag'),
               'mdgf_exp': ('srste_1to16_diag', 'dense_1to16_diag')}
  for recipe, refs in diag_refs.items():
    cells.append(Cell(f'{recipe}_1to16_diag', f'{recipe},1:16,diag',
                      seeds=other, recipe=recipe, pattern='1:16',
                      references=refs, priority=2))
  return Grid(base, cells, seeds=core,
              metrics=('eval/accuracy', 'eval/loss'),
              title='Recipes x N:M on Fashion-MNIST (ViT, FF sparse)')
