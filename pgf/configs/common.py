"""Recipe presets shared by the experiment configs.

A config argument is a comma list of tokens, in any order:
  a recipe   any name in pgf.sparsity.recipes.RECIPES (dense, ste, srste,
             mdgf_linear, mdgf_exp, sdgf_stepwise, sdgf_geometric): the same
             names `--config.sparsity.ff.recipe` takes
  a pattern  N:M, e.g. 1:16
  runlocal   the small variant that runs on a CPU in minutes
e.g. `--config=configs/vit_base.py:srste,2:4,runlocal`.
"""

import re

import ml_collections

from pgf.sparsity import recipes


def parse_arg(arg: str | None, *, recipe: str, nm: str,
              extra: tuple[str, ...] = ()):
  """Returns (recipe, n, m, flags) from a config argument; `flags` is the
  set of tokens among 'runlocal' and `extra` that were given."""
  flags = set()
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if token in ('runlocal',) + tuple(extra):
      flags.add(token)
    elif token in recipes.RECIPES:
      recipe = token
    elif re.fullmatch(r'\d+:\d+', token):
      nm = token
    else:
      raise ValueError(
          f'Config argument {token!r} is not a recipe '
          f'({", ".join(recipes.RECIPES)}), an N:M pattern like 1:16, or '
          f'one of: {", ".join(("runlocal",) + tuple(extra))}.')
  n, m = (int(x) for x in nm.split(':'))
  return recipe, n, m, flags


def set_recipe(group: ml_collections.ConfigDict, recipe: str, n: int,
               m: int) -> None:
  """Sets one sparsity role (e.g. config.sparsity.ff) to a named recipe."""
  group.recipe = recipe
  group.n, group.m = n, m
