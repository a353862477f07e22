"""Adding a recipe is one definition: a recipe registered in
pgf.sparsity.recipes.RECIPES (and nowhere else) is accepted by the config,
the config argument, the schedule, the FLOPs accounting and the train
loop."""

import numpy as np
import pytest

from pgf import config_lib
from pgf import flops
from pgf import sparsity as sp
from pgf import step as step_lib
from pgf import train as train_lib
from pgf.configs import common
from pgf.configs import vit_base
from pgf.sparsity import recipes


def _cosine(t, c, xp):
  # alpha = cos(c t) down to 0, then 0: a decay pgf does not ship.
  return xp.maximum(xp.cos(xp.minimum(c * xp.asarray(t, dtype=xp.float32),
                                      np.pi / 2)), 0.0)


@pytest.fixture
def cosine_recipe(monkeypatch):
  recipe = recipes.Recipe('mdgf_cosine', 'alpha = cos(c t)',
                          alpha_fn=_cosine, decays=True)
  monkeypatch.setitem(recipes.RECIPES, recipe.name, recipe)
  return recipe


def test_a_new_recipe_reaches_every_part(cosine_recipe, data_dir, tmp_path):
  c = vit_base.get_config('mdgf_cosine,1:4,runlocal')   # config argument
  assert c.sparsity.ff.recipe == 'mdgf_cosine'
  c.data.data_dir = data_dir
  c.total_steps = '6'
  c.batch_size = 16
  c.eval_batch_size = 128
  c.log_every = c.eval_every = c.checkpoint_every = '3'
  c.sparsity.ff.decay = np.pi / 2 / 4      # alpha = 0 from step 4 on
  config_lib.validate_config(c)
  s = step_lib.setup(c)
  group = s.schedule.groups[0]
  assert [s.schedule.alpha_host(t, group) for t in range(6)] == (
      pytest.approx([np.cos(np.pi / 8 * t) if t < 4 else 0 for t in range(6)],
                    abs=1e-6))
  # FLOPs: dense cost while alpha > 0.01 (steps 0-3), hard-mask after.
  report = flops.flops_report(c, s.task, s.schedule, s.run)
  assert sorted(report.steps_by_phase.values()) == [2, 4]
  final = train_lib.train_and_evaluate(c, str(tmp_path / 'run'))
  assert np.isfinite(final['eval/loss'])
  # The logged alpha is the recipe's.
  log = [r for r in train_lib.metrics_lib.read_jsonl(str(tmp_path / 'run'))
         if 'sparsity/ff/alpha' in r]
  assert log[0]['sparsity/ff/alpha'] == pytest.approx(
      np.mean([np.cos(np.pi / 8 * t) for t in range(3)]), rel=1e-5)


def test_unknown_recipe_lists_the_registry():
  with pytest.raises(ValueError, match=r"Config argument 'mdgf_cosine' is "
                     r"not a recipe \(dense, ste, srste"):
    common.parse_arg('mdgf_cosine,1:4', recipe='dense', nm='2:4')
  with pytest.raises(ValueError, match=r"sparsity.ff.recipe='mdgf_cosine' is "
                     r'not allowed'):
    sp.GroupSpec('ff', 'mlp', sp.NM(1, 4), recipe='mdgf_cosine')
