"""FLOPs accounting (docs/recipes.md section 7) against hand-computed totals
for every recipe, phase and SdGf frame, the per-kernel costs of a real
model, and the iso-FLOPs run length."""

import math
import types

import ml_collections
import pytest

from pgf import flops
from pgf import sparsity as sp
from pgf import step as step_lib
from pgf.configs import fmnist_vit
from pgf.configs import vit_base
from pgf.sparsity import NM

# A model with two sparse-capable kernels: a (f = 40 per example) and b
# (f = 24), and 100 forward FLOPs in all (36 outside them).
COSTS = flops.ModelCosts(forward=100.0, kernels={'a/kernel': 40.0,
                                                 'b/kernel': 24.0})
BATCH = 2


def _report(total, *groups, dense=0, fine_tune=0):
  schedule = sp.SparsitySchedule(tuple(groups), total_steps=total,
                                 dense_steps=dense, fine_tune_steps=fine_tune)
  return flops.flops_report(
      ml_collections.ConfigDict({'batch_size': BATCH}), None, schedule,
      types.SimpleNamespace(total=total), costs=COSTS)


def _hard(f_sparse, d):
  """Per-example train FLOPs of a step with hard-masked kernels of total
  dense forward f_sparse at density d: 3F - 3f + (2d + 1) f."""
  return 3 * 100 - 3 * f_sparse + (2 * d + 1) * f_sparse


def test_dense_run():
  r = _report(10, sp.GroupSpec('a', '^a/', NM(1, 4), recipe='dense'))
  assert r.total_train == r.total_train_dense == 3 * 100 * 10 * BATCH
  assert r.inference == 100


@pytest.mark.parametrize('recipe', ['ste', 'srste'])
def test_hard_mask_recipes(recipe):
  r = _report(10, sp.GroupSpec('a', '^a/', NM(1, 4), recipe=recipe))
  # forward d f + activation gradient d f + weight gradient f for kernel a.
  assert r.total_train == pytest.approx(_hard(40, 0.25) * 10 * BATCH)
  assert r.inference == pytest.approx(100 - 0.75 * 40)
  assert r.sparse_forward_dense == 40


def test_phases_dense_warmup_and_fine_tune():
  r = _report(20, sp.GroupSpec('a', '^a/', NM(1, 4), recipe='srste'),
              sp.GroupSpec('b', '^b/', NM(2, 8), recipe='ste'),
              dense=5, fine_tune=3)
  hard = 3 * 100 - 3 * 64 + (2 * 0.25 + 1) * 64   # both kernels at 1/4
  assert r.total_train == pytest.approx((5 * 300 + 15 * hard) * BATCH)
  assert sum(r.steps_by_phase.values()) == 20
  assert r.inference == pytest.approx(100 - 0.75 * 64)


@pytest.mark.parametrize('recipe,c,dense_steps', [
    # exp(-0.5 t) <= 0.01 from t = 10 (ln 100 / 0.5 = 9.21).
    ('mdgf_exp', 0.5, 10),
    # max(1 - 0.05 t, 0) <= 0.01 from t = 20 (0.99 / 0.05 = 19.8).
    ('mdgf_linear', 0.05, 20),
])
def test_mdgf_is_dense_while_alpha_exceeds_the_threshold(recipe, c,
                                                          dense_steps):
  total, warm = 50, 4
  r = _report(total, sp.GroupSpec('a', '^a/', NM(1, 8), recipe=recipe,
                                  decay=c), dense=warm)
  sparse = total - warm - dense_steps
  want = (warm + dense_steps) * 300 + sparse * _hard(40, 1 / 8)
  assert r.total_train == pytest.approx(want * BATCH)
  assert sorted(r.steps_by_phase.values()) == sorted(
      [warm, dense_steps, sparse])


def test_sdgf_frames_each_cost_their_density():
  # Stepwise 1:8 over 40 sparse steps: 7:8, 4:8, 2:8, 1:8, 10 steps each.
  r = _report(40, sp.GroupSpec('a', '^a/', NM(1, 8),
                               recipe='sdgf_stepwise'))
  want = sum(10 * _hard(40, d) for d in (7 / 8, 4 / 8, 2 / 8, 1 / 8))
  assert r.total_train == pytest.approx(want * BATCH)
  assert len(r.step_by_phase) == 4
  # Geometric keeps the density: every frame costs the same.
  g = _report(40, sp.GroupSpec('a', '^a/', NM(1, 8),
                               recipe='sdgf_geometric'))
  assert g.total_train == pytest.approx(40 * _hard(40, 1 / 8) * BATCH)
  assert g.inference == pytest.approx(100 - 7 / 8 * 40)


def test_model_costs_of_a_real_model(data_dir):
  c = vit_base.get_config('srste,1:4,runlocal')
  c.data.data_dir = data_dir
  _, _, _, task = step_lib.plan_run(c)
  costs = flops.model_costs(task)
  # tiny/2 on 8x8 digits: 16 patches + the class token, width 64, MLP 256.
  tokens = 17
  wi = 'Transformer/encoderblock_0/mlp/wi/kernel'
  assert costs.kernels[wi] == 2 * tokens * 64 * 256
  assert costs.kernels['Transformer/encoderblock_3/attn/out/kernel'] == (
      2 * tokens * 64 * 64)
  assert 'head/kernel' not in costs.kernels   # A plain Dense.
  assert costs.forward > sum(costs.kernels.values())


def test_iso_flops_config(data_dir):
  c = fmnist_vit.get_config('srste,1:32')
  c.data.data_dir = data_dir
  c.data.name = 'pgf_digits'
  c.data.image_size = 14
  c.total_steps = '100'
  costs = flops.ModelCosts(forward=100.0, kernels={
      f'Transformer/encoderblock_{i}/mlp/{w}/kernel': 30.0
      for i in range(2) for w in ('wi', 'wo')})
  per_step = 3 * 100 - 3 * 120 + (2 / 32 + 1) * 120
  target = 137.5 * per_step * c.batch_size
  _, _, _, task = step_lib.plan_run(c)
  longer, report = flops.iso_flops_config(c, target, costs=costs, task=task,
                                          num_train_examples=1442)
  # The smallest whole number of steps that reaches the target.
  assert longer.total_steps == '138'
  assert report.total_train == pytest.approx(138 * per_step * c.batch_size)
  # A decaying recipe keeps alpha a function of the run's fraction.
  m = fmnist_vit.get_config('mdgf_exp,1:32')
  m.data.data_dir, m.data.name, m.data.image_size = data_dir, 'pgf_digits', 14
  m.total_steps = '100'
  m.sparsity.ff.decay = math.log(100) / 60
  twice, _ = flops.iso_flops_config(m, 2 * flops.flops_report(
      m, task, step_lib.plan_run(m)[2], step_lib.plan_run(m)[1],
      costs=costs).total_train, costs=costs, task=task,
                                    num_train_examples=1442)
  assert twice.total_steps == '200'
  assert twice.sparsity.ff.decay == pytest.approx(math.log(100) / 120)
