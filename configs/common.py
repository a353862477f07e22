"""Recipe presets shared by the experiment configs.

A config argument is a comma list of tokens, in any order:
  a recipe   dense | ste | srste | mdgf_linear | mdgf_exp | sdgf_stepwise |
             sdgf_geometric   (method.md section 2)
  a pattern  N:M, e.g. 1:16
  runlocal   the small variant that runs on a CPU in minutes
e.g. `--config=configs/vit_base.py:srste,2:4,runlocal`.
"""

import re

import ml_collections

RECIPES = {
    # name: (recipe, sdgf)
    'dense': ('dense', 'none'),
    'ste': ('ste', 'none'),
    'srste': ('srste', 'none'),
    'mdgf_linear': ('mdgf_linear', 'none'),
    'mdgf_exp': ('mdgf_exp', 'none'),
    'sdgf_stepwise': ('ste', 'stepwise'),
    'sdgf_geometric': ('ste', 'geometric'),
}


def parse_arg(arg: str | None, *, recipe: str, nm: str):
  """Returns (recipe, n, m, runlocal) from a config argument."""
  runlocal = False
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if token == 'runlocal':
      runlocal = True
    elif token in RECIPES:
      recipe = token
    elif re.fullmatch(r'\d+:\d+', token):
      nm = token
    else:
      raise ValueError(
          f'Config argument {token!r} is not a recipe ({sorted(RECIPES)}), '
          "an N:M pattern like '1:16', or 'runlocal'.")
  n, m = (int(x) for x in nm.split(':'))
  return recipe, n, m, runlocal


def set_recipe(group: ml_collections.ConfigDict, recipe: str, n: int,
               m: int) -> None:
  """Sets one sparsity role (e.g. config.sparsity.ff) to a named recipe."""
  group.recipe, group.sdgf = RECIPES[recipe]
  group.n, group.m = n, m
