"""Tests of pgf.sparsity.schedules and recipes against docs/recipes.md
sections 2-3."""

import math
import re

import jax
import numpy as np
import pytest

from pgf import durations
from pgf.sparsity import NM
from pgf.sparsity import GroupSpec
from pgf.sparsity import LayerRule
from pgf.sparsity import SparsityPlan
from pgf.sparsity import SparsitySchedule
from pgf.sparsity import layer_collection
from pgf.sparsity import sdgf_frames


def _group(name='ff', nm='1:16', **kw):
  return GroupSpec(name, layers=kw.pop('layers', 'mlp'), nm=NM.parse(nm),
                   **kw)


def _values(schedule, step, train=True):
  """values() on the host, as floats."""
  return jax.tree.map(float, schedule.values(step, train=train))


def _alpha_curve(schedule, steps, group='ff', train=True):
  """alpha at many steps in one jitted call, with the step traced."""
  fn = jax.jit(jax.vmap(lambda s: schedule.values(s, train=train)))
  return {k: np.asarray(v) for k, v in fn(np.asarray(steps))[group].items()}


# -- MdGf alpha ---------------------------------------------------------------


def test_mdgf_exp_matches_the_released_coefficients():
  sched = SparsitySchedule((_group(nm='1:32', recipe='mdgf_exp', decay=1e-4),),
                           total_steps=100_000)
  alpha = _alpha_curve(sched, [0, 10_000, 30_000, 50_000])['alpha']
  np.testing.assert_allclose(alpha, [1.0, 0.37, 0.05, 0.007], atol=5e-3)
  np.testing.assert_allclose(alpha, np.exp(-1e-4 * np.array(
      [0, 10_000, 30_000, 50_000])), rtol=1e-5)
  assert alpha[0] == 1.0


def test_mdgf_linear_hits_zero_at_one_over_c():
  c = 2e-3
  sched = SparsitySchedule(
      (_group(recipe='mdgf_linear', decay=c),), total_steps=2000)
  steps = np.arange(2000)
  alpha = _alpha_curve(sched, steps)['alpha']
  np.testing.assert_allclose(alpha, np.maximum(1 - c * steps, 0), atol=1e-6)
  assert alpha[0] == 1.0 and alpha[250] == pytest.approx(0.5)
  assert alpha[499] > 0 and (alpha[500:] == 0).all()


@pytest.mark.parametrize('recipe', ['mdgf_exp', 'mdgf_linear'])
def test_mdgf_clock_starts_at_sparse_phase_with_warmup(recipe):
  # Not the authors' defect 5.1 (which subtracted 1 % of the dense phase):
  # alpha is exactly 1 at the first sparse step.
  c = 1e-3
  sched = SparsitySchedule((_group(recipe=recipe, decay=c),),
                           total_steps=3000, dense_steps=1000,
                           fine_tune_steps=500)
  steps = np.array([1000, 1001, 1500, 2499, 2500, 2999])
  a = _alpha_curve(sched, steps)['alpha']
  t = steps - 1000
  decayed = np.exp(-c * t) if recipe == 'mdgf_exp' else np.maximum(
      1 - c * t, 0)
  want = np.where(steps < 2500, decayed, 0.0)
  np.testing.assert_allclose(a, want, atol=1e-6)
  assert a[0] == 1.0
  assert _values(sched, 1000)['ff']['alpha'] == 1.0
  # Fine-tune: hard mask; evaluation: hard mask at every step.
  assert _values(sched, 2500)['ff']['alpha'] == 0.0
  for step in (0, 999, 1000, 1700, 2500):
    assert _values(sched, step, train=False)['ff']['alpha'] == 0.0
  assert sched.phase(999) == 'dense' and sched.phase(1000) == 'sparse'
  assert sched.phase(2499) == 'sparse' and sched.phase(2500) == 'fine_tune'


@pytest.mark.parametrize('recipe', ['ste', 'srste'])
def test_hard_mask_recipes_have_alpha_zero(recipe):
  sched = SparsitySchedule((_group(recipe=recipe),), total_steps=100,
                           dense_steps=10, fine_tune_steps=10)
  v = _alpha_curve(sched, np.arange(100))
  # alpha is 1 (no mask) in the dense warm-up, then 0: a hard mask.
  assert (v['alpha'][:10] == 1).all() and (v['alpha'][10:] == 0).all()
  assert (v['grad_scale'] == 1).all()


# -- phases -------------------------------------------------------------------


@pytest.mark.parametrize('dense,fine_tune', [('10', '20'), ('0.1', '0.2'),
                                             ('10%', '20%'), ('1ep', '2ep')])
def test_phase_boundaries_steps_and_fractions(dense, fine_tune):
  conv = lambda key, v: durations.to_steps(v, total_steps=100,
                                           steps_per_epoch=10, key=key)
  sched = SparsitySchedule(
      (_group(),), total_steps=100,
      dense_steps=conv('sparsity.dense_warmup', dense),
      fine_tune_steps=conv('sparsity.fine_tune', fine_tune))
  phases = [sched.phase(s) for s in range(100)]
  assert phases == ['dense'] * 10 + ['sparse'] * 70 + ['fine_tune'] * 20
  assert sched.sparse_start == 10 and sched.fine_tune_start == 80


def test_phases_edge_cases():
  no_sparse = SparsitySchedule((_group(recipe='dense'),), total_steps=10,
                               dense_steps=2, fine_tune_steps=3)
  assert {no_sparse.phase(s) for s in range(10)} == {'dense'}
  assert not no_sparse.plan(5) and no_sparse.values(5) == {}
  assert no_sparse.distinct_plans() == (SparsityPlan(),)
  plain = SparsitySchedule((_group(),), total_steps=5)
  assert [plain.phase(s) for s in range(5)] == ['sparse'] * 5
  only_ft = SparsitySchedule((_group(),), total_steps=5, fine_tune_steps=5)
  assert [only_ft.phase(s) for s in range(5)] == ['fine_tune'] * 5


# -- SdGf frame maps ----------------------------------------------------------


@pytest.mark.parametrize('nm,want', [
    ('1:8', ['7:8', '4:8', '2:8', '1:8']),
    ('1:16', ['15:16', '8:16', '4:16', '2:16', '1:16']),
    ('1:32', ['31:32', '16:32', '8:32', '4:32', '2:32', '1:32']),
    ('2:4', ['3:4', '2:4']),
    ('2:16', ['15:16', '8:16', '4:16', '2:16']),
])
def test_stepwise_frames(nm, want):
  frames = sdgf_frames(_group(nm=nm, sdgf='stepwise'))
  assert [str(f) for f in frames] == want
  target = NM.parse(nm)
  assert len(frames) == math.log2(target.m / target.n) + 1
  assert frames[-1] == target


@pytest.mark.parametrize('nm,want', [
    ('1:8', ['8:64', '4:32', '2:16', '1:8']),
    ('1:16', ['8:128', '4:64', '2:32', '1:16']),
    ('1:32', ['8:256', '4:128', '2:64', '1:32']),
    ('2:4', ['16:32', '8:16', '4:8', '2:4']),
])
def test_geometric_frames(nm, want):
  frames = sdgf_frames(_group(nm=nm, sdgf='geometric'))
  assert [str(f) for f in frames] == want
  assert {f.density for f in frames} == {NM.parse(nm).density}


@pytest.mark.parametrize('nm', ['3:16', '1:12', '4:4', '5:8', '1:1'])
def test_stepwise_needs_power_of_two(nm):
  pat = NM.parse(nm)
  with pytest.raises(ValueError, match=re.escape(
      f'sparsity.ff: stepwise SdGf needs M/N to be a power of two >= 2; got '
      f'{nm} (M/N={pat.m / pat.n:g})')):
    _group(nm=nm, sdgf='stepwise')


@pytest.mark.parametrize('sdgf,nm,sparse_len', [
    ('stepwise', '1:16', 100), ('stepwise', '1:16', 47),
    ('geometric', '1:8', 100), ('geometric', '1:8', 13),
    ('stepwise', '1:32', 6)])
def test_frames_split_the_sparse_phase_equally(sdgf, nm, sparse_len):
  dense, ft = 7, 5
  group = _group(nm=nm, sdgf=sdgf)
  frames = sdgf_frames(group)
  nf = len(frames)
  sched = SparsitySchedule((group,), total_steps=dense + sparse_len + ft,
                           dense_steps=dense, fine_tune_steps=ft)
  pats = [sched.pattern(s, group) for s in range(sched.total_steps)]
  assert pats[:dense] == [None] * dense
  for t in range(sparse_len):
    # Frame i covers the i-th equal fraction [i L / F, (i + 1) L / F).
    i = t * nf // sparse_len
    assert i / nf <= t / sparse_len < (i + 1) / nf
    assert pats[dense + t] == frames[i], t
  assert pats[dense + sparse_len:] == [frames[-1]] * ft
  if sparse_len >= nf:
    # Every frame is used; lengths differ by at most one step.
    lengths = [pats.count(f) for f in frames]
    lengths[-1] -= ft
    assert sum(lengths) == sparse_len
    assert max(lengths) - min(lengths) <= 1


def test_custom_frames():
  frames = ((0, NM(4, 8)), (25, NM(2, 8)), (50, NM(1, 8)))
  group = _group(nm='1:8', sdgf='custom', custom_frames=frames)
  sched = SparsitySchedule((group,), total_steps=100, dense_steps=10,
                           fine_tune_steps=20)
  pats = [sched.pattern(s, group) for s in range(100)]
  assert pats == ([None] * 10 + [NM(4, 8)] * 25 + [NM(2, 8)] * 25
                  + [NM(1, 8)] * 40)
  assert [p.describe() for p in sched.distinct_plans()] == [
      'dense', 'ff=4:8', 'ff=2:8', 'ff=1:8']


@pytest.mark.parametrize('frames,match', [
    ((), 'sparsity.ff.sdgf=custom needs sparsity.ff.custom_frames'),
    (((5, NM(2, 8)), (50, NM(1, 8))), r'starts \[5, 50\] must begin at 0'),
    (((0, NM(2, 8)), (0, NM(1, 8))), r'starts \[0, 0\] must begin at 0 and '
     'strictly increase'),
    (((0, NM(2, 8)), (9, NM(3, 8)), (4, NM(1, 8))), r'starts \[0, 9, 4\]'),
    (((0, NM(4, 8)), (9, NM(2, 8))), 'ends with 2:8 but the target pattern '
     'is 1:8'),
])
def test_custom_frames_validation(frames, match):
  with pytest.raises(ValueError, match=match):
    _group(nm='1:8', sdgf='custom', custom_frames=frames)


# -- gradient scale and SR-STE lambda -----------------------------------------


def test_grad_scale_and_srste_lambda():
  kw = dict(total_steps=60, dense_steps=10, fine_tune_steps=20)
  scaled = _group('a', recipe='mdgf_exp', decay=0.05, mdgf_grad='scaled')
  straight = _group('b', recipe='mdgf_linear', decay=0.01)
  srste = _group('c', recipe='srste', srste_lambda=3e-4)
  ste = _group('d')
  sched = SparsitySchedule((scaled, straight, srste, ste), **kw)
  steps = np.arange(60)
  sparse = (steps >= 10) & (steps < 40)
  curve = {g: _alpha_curve(sched, steps, group=g) for g in 'abcd'}
  a = curve['a']
  np.testing.assert_allclose(a['alpha'], np.where(
      sparse, np.exp(-0.05 * (steps - 10)), np.where(steps < 10, 1, 0)),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(a['grad_scale'],
                                np.where(sparse, a['alpha'], 1.0))
  assert (a['grad_scale'][sparse] < 1).sum() == sparse.sum() - 1
  for g in 'bcd':
    assert (curve[g]['grad_scale'] == 1).all()
  for g in 'abd':
    assert (curve[g]['srste_lambda'] == 0).all()
  np.testing.assert_allclose(curve['c']['srste_lambda'],
                             np.where(sparse, 3e-4, 0.0), rtol=1e-6)
  ev = _alpha_curve(sched, steps, group='c', train=False)
  assert (ev['srste_lambda'] == 0).all() and (ev['alpha'] == 0).all()


def test_sdgf_with_mdgf_and_srste():
  mdgf = _group('ff', nm='1:8', sdgf='stepwise', recipe='mdgf_exp',
                decay=0.01)
  srste = _group('q', nm='1:8', sdgf='geometric', recipe='srste',
                 layers='attn/query')
  sched = SparsitySchedule((mdgf, srste), total_steps=100, dense_steps=20)
  # The pattern changes by frame, the MdGf clock does not restart per frame.
  assert str(sched.pattern(20, mdgf)) == '7:8'
  assert str(sched.pattern(40, mdgf)) == '4:8'
  assert str(sched.pattern(99, mdgf)) == '1:8'
  assert str(sched.pattern(20, srste)) == '8:64'
  assert str(sched.pattern(99, srste)) == '1:8'
  steps = np.arange(100)
  c = _alpha_curve(sched, steps)
  np.testing.assert_allclose(
      c['alpha'], np.where(steps >= 20, np.exp(-0.01 * (steps - 20)), 1),
      rtol=1e-6)
  q = _alpha_curve(sched, steps, group='q')
  np.testing.assert_allclose(q['srste_lambda'],
                             np.where(steps >= 20, 2e-4, 0), rtol=1e-6)
  assert (q['alpha'][:20] == 1).all() and (q['alpha'][20:] == 0).all()
  plan = sched.plan(45)
  assert plan.describe() == 'ff=4:8, q=4:32'
  assert plan.lookup('block_0/mlp/wi/kernel') == LayerRule(
      'ff', 'mlp', NM(4, 8), 'in')
  assert plan.lookup('block_0/attn/query').nm == NM(4, 32)
  assert plan.lookup('block_0/attn/key') is None


# -- plans --------------------------------------------------------------------


def _first_appearance(sched):
  out = []
  for step in range(sched.total_steps):
    p = sched.plan(step)
    if p not in out:
      out.append(p)
  return out


@pytest.mark.parametrize('dense', [0, 8])
def test_distinct_plans_one_per_frame(dense):
  group = _group(nm='1:16', sdgf='stepwise')
  sched = SparsitySchedule((group,), total_steps=40 + dense, dense_steps=dense)
  plans = sched.distinct_plans()
  assert len(plans) == 5 + (dense > 0)
  assert list(plans) == _first_appearance(sched)
  assert len(set(plans)) == len(plans)  # hashable, each listed once
  assert [p.describe() for p in plans] == (['dense'] if dense else []) + [
      'ff=15:16', 'ff=8:16', 'ff=4:16', 'ff=2:16', 'ff=1:16']
  mdgf = SparsitySchedule((_group(recipe='mdgf_exp'),), total_steps=40)
  assert mdgf.distinct_plans() == (mdgf.plan(0),)


def test_distinct_plans_random_schedules():
  rng = np.random.default_rng(3)
  choices = [('stepwise', '1:16'), ('stepwise', '2:8'), ('geometric', '1:4'),
             ('none', '2:4'), ('custom', '1:8')]
  for _ in range(40):
    total = int(rng.integers(1, 120))
    dense = int(rng.integers(0, total + 1))
    ft = int(rng.integers(0, total - dense + 1))
    groups = []
    for name in ('ff', 'q', 'o')[:int(rng.integers(1, 4))]:
      sdgf, nm = choices[int(rng.integers(len(choices)))]
      kw = {}
      if sdgf == 'custom':
        starts = [0] + sorted(set(rng.integers(1, 100, size=2).tolist()))
        pats = [NM(4, 8), NM(2, 8), NM(1, 8)][-len(starts):]
        kw['custom_frames'] = tuple(zip(starts, pats))
      groups.append(_group(name, nm=nm, sdgf=sdgf, layers=name, **kw))
    try:
      sched = SparsitySchedule(tuple(groups), total_steps=total,
                               dense_steps=dense, fine_tune_steps=ft)
    except ValueError as e:
      # A sparse phase too short for a group's frames is refused.
      assert 'too few for its' in str(e)
      continue
    assert list(sched.distinct_plans()) == _first_appearance(sched), sched


def test_eval_and_final_plan():
  group = _group(nm='1:16', sdgf='stepwise')
  sched = SparsitySchedule((group,), total_steps=60, dense_steps=10,
                           fine_tune_steps=10)
  final = SparsityPlan((LayerRule('ff', 'mlp', NM(1, 16), 'in'),))
  assert sched.final_plan() == final
  # During the warm-up evaluation uses the final pattern, not frame 0.
  for step in (0, 9):
    assert sched.plan(step) == SparsityPlan()
    assert sched.eval_plan(step) == final
  for step in (10, 25, 49, 50, 59):
    assert sched.eval_plan(step) == sched.plan(step)
  assert sched.eval_plan(10).describe() == 'ff=15:16'
  # A sparse phase too short to visit every frame is refused.
  with pytest.raises(ValueError, match=r'sparsity.ff: the sparse phase has 3 '
                     r'steps, too few for its 5 SdGf frames'):
    SparsitySchedule((group,), total_steps=3)
  # Only fine-tune (no sparse phase) trains the target pattern throughout.
  only_ft = SparsitySchedule((group,), total_steps=3, fine_tune_steps=3)
  assert only_ft.plan(0) == final and only_ft.final_plan() == final


def test_plan_lookup_first_rule_wins_and_layer_collection():
  ff = _group('ff', nm='1:4', layers=r'mlp/w[io]$', recipe='mdgf_exp')
  qkv = _group('qkv', nm='2:8', layers='attn/(query|key|value)',
               recipe='srste')
  catch_all = _group('all', nm='2:4', layers='.', axis='out')
  sched = SparsitySchedule((ff, qkv, catch_all), total_steps=10)
  plan = sched.plan(0)
  assert plan and not SparsityPlan()
  assert plan.describe() == 'ff=1:4, qkv=2:8, all=2:4'
  assert SparsityPlan().describe() == 'dense'
  assert plan.lookup('enc/mlp/wi').group == 'ff'
  assert plan.lookup('enc/mlp/wi_extra').group == 'all'
  assert plan.lookup('enc/attn/key').group == 'qkv'
  assert plan.lookup('head').axis == 'out'
  values = sched.values(0)
  paths = ('enc/mlp/wi', 'enc/attn/key/kernel', 'head/kernel')
  coll = layer_collection(values, plan, paths)
  # alpha sits at the module of each kernel (the path without 'kernel').
  assert set(coll) == {'enc', 'head'}
  assert coll['enc']['mlp'] == {'alpha': values['ff']['alpha']}
  assert coll['enc']['attn']['key'] == {'alpha': values['qkv']['alpha']}
  assert coll['head'] == {'alpha': values['all']['alpha']}
  only_ff = SparsityPlan((plan.rules[0],))
  coll = layer_collection(values, only_ff, paths)
  assert coll == {'enc': {'mlp': {'alpha': values['ff']['alpha']}}}
  assert layer_collection(values, SparsityPlan(), paths) == {}


# -- validation ---------------------------------------------------------------


@pytest.mark.parametrize('kw,match', [
    (dict(recipe='mdgf'), "sparsity.ff.recipe='mdgf' is not allowed"),
    (dict(sdgf='linear'), "sparsity.ff.sdgf='linear' is not allowed"),
    (dict(axis='row'), "sparsity.ff.axis='row' is not allowed"),
    (dict(mdgf_grad='autodiff'),
     "sparsity.ff.mdgf_grad='autodiff' is not allowed"),
    (dict(decay=-0.5), r'sparsity.ff.decay=-0.5 must be >= 0'),
    (dict(srste_lambda=-1e-3), r'sparsity.ff.srste_lambda=-0.001 must be'),
    (dict(layers='mlp/(wi'), r"sparsity.ff.layers='mlp/\(wi' is not a valid"),
])
def test_group_validation(kw, match):
  with pytest.raises(ValueError, match=match):
    _group(**kw)


@pytest.mark.parametrize('total,dense,ft,match', [
    (100, 60, 50, r'sparsity.dense_warmup \(60 steps\) plus sparsity.fine_tune'
     r' \(50 steps\).*\(100 steps\)'),
    (100, -1, 0, r'sparsity.dense_warmup \(-1 steps\)'),
    (100, 0, -5, r'sparsity.fine_tune \(-5 steps\)'),
    (0, 0, 0, r'total_steps=0 must be >= 1'),
])
def test_schedule_validation(total, dense, ft, match):
  with pytest.raises(ValueError, match=match):
    SparsitySchedule((_group(),), total_steps=total, dense_steps=dense,
                     fine_tune_steps=ft)


def test_duplicate_group_names():
  with pytest.raises(ValueError, match=r"duplicate names: \['ff', 'ff'\]"):
    SparsitySchedule((_group(), _group()), total_steps=10)


# -- the recipe registry ------------------------------------------------------


def test_every_recipe_has_one_definition_used_everywhere():
  from pgf.configs import common
  from pgf.sparsity import recipes
  # The config argument and --config.sparsity.ff.recipe take the same names.
  for name in recipes.RECIPES:
    recipe, n, m, _ = common.parse_arg(f'{name},1:8', recipe='dense',
                                       nm='2:4')
    assert (recipe, n, m) == (name, 1, 8)
    GroupSpec('ff', layers='mlp', nm=NM(1, 8), recipe=name)  # Accepted.


@pytest.mark.parametrize('name', ['ste', 'srste', 'mdgf_linear', 'mdgf_exp',
                                  'sdgf_stepwise', 'sdgf_geometric'])
def test_host_and_traced_alpha_agree(name):
  # One formula serves the jitted step (jnp) and FLOPs accounting (host).
  g = _group(recipe=name, decay=3e-3)
  sched = SparsitySchedule((g,), total_steps=2000, dense_steps=100,
                           fine_tune_steps=100)
  steps = np.array([0, 99, 100, 101, 500, 1899, 1900, 1999])
  traced = _alpha_curve(sched, steps)['alpha']
  host = [sched.alpha_host(int(t), g) for t in steps]
  np.testing.assert_allclose(traced, host, rtol=1e-6, atol=1e-7)


def test_steps_until_threshold():
  from pgf.sparsity import recipes
  exp = recipes.RECIPES['mdgf_exp']
  # exp(-1e-4 t) <= 0.01  <=>  t >= ln(100) / 1e-4 = 46051.7.
  assert exp.steps_until(0.01, 1e-4) == 46052
  lin = recipes.RECIPES['mdgf_linear']
  # max(1 - 2e-3 t, 0) <= 0.5  <=>  t >= 250.
  assert lin.steps_until(0.5, 2e-3) == 250
  assert recipes.RECIPES['ste'].steps_until(0.01, 1e-4) == 0
  assert exp.steps_until(0.01, 0.0) is None  # alpha stays 1.


def test_sdgf_recipes_are_ste_with_their_frame_map():
  for mode in ('stepwise', 'geometric'):
    a = _group(nm='1:8', recipe=f'sdgf_{mode}')
    b = _group(nm='1:8', recipe='ste', sdgf=mode)
    assert sdgf_frames(a) == sdgf_frames(b) and a.frames_mode == mode
    sa = SparsitySchedule((a,), total_steps=40)
    sb = SparsitySchedule((b,), total_steps=40)
    assert sa.distinct_plans() == sb.distinct_plans()
    assert jax.tree.map(float, sa.values(7)) == jax.tree.map(
        float, sb.values(7))
  # MdGf combines with an SdGf frame map (the authors' combination).
  c = _group(nm='1:8', recipe='mdgf_exp', sdgf='stepwise')
  assert [str(f) for f in sdgf_frames(c)] == ['7:8', '4:8', '2:8', '1:8']


@pytest.mark.parametrize('kw,match', [
    (dict(recipe='sdgf_stepwise', sdgf='geometric'),
     r"recipe='sdgf_stepwise' implies sdgf='stepwise', but "
     r"sparsity.ff.sdgf='geometric'"),
    (dict(recipe='srste', mdgf_grad='scaled'),
     r"sparsity.ff.mdgf_grad='scaled'.*only decaying recipes.*mdgf_exp"),
])
def test_contradictory_recipe_settings(kw, match):
  with pytest.raises(ValueError, match=match):
    _group(**kw)
