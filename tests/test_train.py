"""End to end: train_and_evaluate on tiny models and real offline data."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pgf import step as step_lib
from pgf import train as train_lib
from pgf.configs import swinv2_base
from pgf.configs import t5_base
from pgf.configs import vit_base
from pgf.data import images as images_lib
from pgf.data import text as text_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vit(data_dir, **overrides):
  c = vit_base.get_config('mdgf_exp,1:4,runlocal')
  c.data.data_dir = data_dir
  c.total_steps = '8'
  c.batch_size = 16
  c.eval_batch_size = 128
  c.log_every = '2'
  c.eval_every = '4'
  c.checkpoint_every = '4'
  c.optimizer.warmup = '2'
  c.sparsity.ff.decay = 0.1
  c.model.variant = 'mu/2'  # Width 32, 2 blocks: the loop, not the model.
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (c[section] if section else c)[name] = value
  return c


def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_vit_trains_logs_evaluates_checkpoints(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  final = train_lib.train_and_evaluate(tiny_vit(data_dir), workdir)
  assert set(final) >= {'eval/loss', 'eval/accuracy'}
  records = read_jsonl(workdir)
  train = [r for r in records if 'train/loss' in r]
  assert [r['step'] for r in train] == [2, 4, 6, 8]
  last = train[-1]
  for key in ('train/loss', 'train/accuracy', 'train/grad_norm',
              'train/lr', 'sparsity/ff/alpha', 'sparsity/ff/density',
              'sparsity/ff/mask_change', 'sparsity/ff/n', 'sparsity/ff/m'):
    assert key in last, key
  assert (last['sparsity/ff/n'], last['sparsity/ff/m']) == (1, 4)
  # MdGf-Exponential, c = 0.1: alpha is exp(-0.1 t) averaged over the
  # logged steps t = 6, 7 (metrics of a log are the mean since the last).
  assert last['sparsity/ff/alpha'] == pytest.approx(
      np.mean(np.exp(-0.1 * np.array([6, 7]))), rel=1e-5)
  # alpha > 0: every weight of the effective kernel is non-zero.
  assert last['sparsity/ff/density'] == pytest.approx(1.0, abs=1e-6)
  assert 0 <= last['sparsity/ff/mask_change'] <= 1
  evals = [r for r in records if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [0, 4, 8]
  assert os.path.exists(os.path.join(workdir, 'final_metrics.json'))
  steps = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert steps == ['4', '8']
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def tiny_t5(data_dir, **overrides):
  c = t5_base.get_config('mdgf_exp,1:16,runlocal')
  c.data.data_dir = data_dir
  c.total_steps = '8'
  c.batch_size = 8
  c.eval_batch_size = 64
  c.data.inputs_length = 64
  c.data.targets_length = 16
  c.log_every = '2'
  c.eval_every = '4'
  c.checkpoint_every = '4'
  c.num_eval_examples = 2
  c.sparsity.ff.decay = 0.1
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (c[section] if section else c)[name] = value
  return c


@pytest.mark.parametrize('model', ['vit', 't5'])
def test_resume_equals_uninterrupted(data_dir, tmp_path, monkeypatch, model):
  # Logs (every 3) and checkpoints (every 4) do not align: the resumed run
  # must still log the means over the same steps.
  config = (tiny_vit if model == 'vit' else tiny_t5)(data_dir, log_every='3')
  full = train_lib.train_and_evaluate(config, str(tmp_path / 'full'))

  # Interrupt after the step-4 checkpoint: the 6th batch raises.
  workdir = str(tmp_path / 'resumed')
  pipeline = images_lib if model == 'vit' else text_lib
  real = pipeline.make_train_iterator

  class Killed(Exception):
    pass

  def dying_iterator(*args, **kwargs):
    it = real(*args, **kwargs)
    nxt = it.__next__
    count = {'n': 0}

    class Proxy:
      def __iter__(self):
        return self

      def __next__(self):
        count['n'] += 1
        if count['n'] == 6:
          raise Killed()
        return nxt()

      def get_state(self):
        return it.get_state()

      def set_state(self, state):
        return it.set_state(state)

    return Proxy()

  monkeypatch.setattr(pipeline, 'make_train_iterator', dying_iterator)
  with pytest.raises(Killed):
    train_lib.train_and_evaluate(config, workdir)
  monkeypatch.setattr(pipeline, 'make_train_iterator', real)
  resumed = train_lib.train_and_evaluate(config, workdir)
  for key in ('eval/loss', 'eval/accuracy'):
    assert resumed[key] == full[key]  # Bit-equal.
  full_log = read_jsonl(str(tmp_path / 'full'))
  resumed_log = read_jsonl(workdir)
  strip = lambda rs: [{k: v for k, v in r.items()
                       if k != 'train/steps_per_sec'} for r in rs]
  # The same records, bit for bit: the step-0 evaluation once, the means
  # over the same steps (the log at 6 straddles the step-4 checkpoint).
  assert strip(resumed_log) == strip(full_log)


def test_compiles_once_per_sdgf_frame(data_dir):
  c = tiny_vit(data_dir, total_steps='20')
  c.sparsity.ff.recipe, c.sparsity.ff.sdgf = 'ste', 'stepwise'
  c.sparsity.ff.n, c.sparsity.ff.m = 1, 8
  c.sparsity.dense_warmup = '4'
  s = step_lib.setup(c)
  state = step_lib.init_state(s, jax.random.key(0))
  step = step_lib.make_train_step(s)
  it = s.task.pipeline.make_train_iterator(
      c, global_batch_size=c.batch_size, process_index=0, process_count=1)
  batch = train_lib.sharding.global_batch(
      next(it), train_lib.sharding.batch_sharding(s.mesh))
  for t in range(s.run.total):
    state, _ = step(state, batch, s.schedule.plan(t))
  plans = s.schedule.distinct_plans()
  # Dense warm-up, then 7:8, 4:8, 2:8, 1:8.
  assert [p.describe() for p in plans] == [
      'dense', 'ff=7:8', 'ff=4:8', 'ff=2:8', 'ff=1:8']
  assert step.jitted._cache_size() == len(plans)


def test_non_finite_loss_stops_without_bad_checkpoint(data_dir, tmp_path):
  c = tiny_vit(data_dir)
  c.optimizer.lr = 1e30
  c.optimizer.clip_norm = 0.0
  workdir = str(tmp_path / 'nan')
  with pytest.raises(train_lib.NonFiniteLossError, match=r'at step \d+'):
    train_lib.train_and_evaluate(c, workdir)
  ckpts = os.path.join(workdir, 'checkpoints')
  assert not os.path.exists(ckpts) or not [
      d for d in os.listdir(ckpts) if d.isdigit()]


def test_t5_trains_and_decodes(data_dir, tmp_path):
  c = tiny_t5(data_dir, total_steps='4')
  workdir = str(tmp_path / 't5')
  final = train_lib.train_and_evaluate(c, workdir)
  assert np.isfinite(final['eval/loss'])
  records = read_jsonl(workdir)
  assert records[-1]['step'] == 4
  assert os.listdir(os.path.join(workdir, 'eval_examples'))


def _cli(*args, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'pgf.train', *args], cwd=REPO,
      capture_output=True, text=True, env=env, timeout=600)


def test_cli_mistyped_key_fails_at_parsing():
  r = _cli('--config=configs/vit_base.py:runlocal',
           '--config.sparsity.ff.nn=1', '--dry_run')
  assert r.returncode != 0
  assert 'nn' in r.stderr


def test_cli_bad_value_one_clear_error(tmp_path):
  r = _cli('--config=configs/vit_base.py:runlocal',
           '--config.sparsity.ff.recipe=magic', '--dry_run')
  assert r.returncode != 0
  assert "sparsity.ff.recipe='magic'" in r.stderr
  assert 'mdgf_exp' in r.stderr
  assert 'Traceback' not in r.stderr


def test_dry_run_vit_base_prints_parameter_count():
  r = _cli('--config=configs/vit_base_1to16_mdgf.py', '--dry_run')
  assert r.returncode == 0, r.stderr[-3000:]
  assert '86,567,656' in r.stdout
  assert 'ff=1:16' in r.stdout
  assert 'FLOPs' in r.stdout


MESH_SCRIPT = r'''
import json, sys
import jax
from pgf.configs import t5_base, vit_base
from pgf import step as step_lib
from pgf import train as train_lib
from pgf.data import images as images_lib
from pgf.data import text as text_lib
if sys.argv[5] == 'vit':
  c = vit_base.get_config('srste,1:4,runlocal')
  c.model.variant = 'mu/2'
else:
  c = t5_base.get_config('mdgf_exp,1:16,runlocal')
  c.data.inputs_length = 64; c.data.targets_length = 16
c.data.data_dir = sys.argv[1]
c.total_steps = '4'; c.batch_size = 16; c.eval_batch_size = 64
c.log_every = '4'; c.eval_every = '4'; c.checkpoint_every = '4'
c.mesh.data = int(sys.argv[3]); c.mesh.model = int(sys.argv[4])
devices = jax.devices()[:c.mesh.data * c.mesh.model]
import pgf.sharding as sh
real = sh.make_mesh
train_lib.sharding.make_mesh = lambda config, d=None: real(config, devices)
final = train_lib.train_and_evaluate(c, sys.argv[2])
print('RESULT', json.dumps(final))
'''


@pytest.mark.parametrize('model', ['vit', 't5'])
def test_mesh_of_8_devices_matches_single_device(data_dir, tmp_path, model):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  results = []
  for data, size in ((1, 1), (4, 2)):
    r = subprocess.run(
        [sys.executable, '-c', MESH_SCRIPT, data_dir,
         str(tmp_path / f'mesh{data}x{size}'), str(data), str(size), model],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith('RESULT')][-1]
    results.append(json.loads(line.split(' ', 1)[1]))
  single, sharded = results
  for key in ('eval/loss', 'eval/accuracy'):
    assert sharded[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5)


COLLECTIVES_SCRIPT = r'''
import collections, json, re
import flax.linen as nn
from pgf import sharding, step as step_lib
from pgf.bench import memory
from pgf.configs import vit_base
out = {}
for row in ('dense', 'recompute_off', 'recompute_on'):
  c = vit_base.get_config('dense,runlocal')
  c.model.variant = 'mu/2'      # width 32, mlp 64, 2 heads: model=2 shards
  c.mesh.data, c.mesh.model, c.batch_size = 4, 2, 8
  c.sparsity.recompute = row == 'recompute_on'
  for role in ('ff', 'q', 'k', 'v', 'o') if row != 'dense' else ():
    c.sparsity[role].recipe, c.sparsity[role].n, c.sparsity[role].m = (
        'ste', 1, 16)
  s = step_lib.setup(c)
  plan = s.schedule.distinct_plans()[-1]
  with sharding.mesh_context(s.mesh), nn.logical_axis_rules(s.rules):
    text = step_lib.make_train_step(s).jitted.lower(
        memory.abstract_state(s), memory.abstract_batch(s, 8), plan,
        False).compile().as_text()
  out[row] = collections.Counter(re.findall(
      r' (all-gather|all-to-all|collective-permute|reduce-scatter)'
      r'(?:-start)?\(', text))
print('RESULT', json.dumps(out))
'''


def test_tensor_parallel_sparse_step_moves_no_kernel_or_activation():
  # Model axis 2: the MLP and the heads are sharded. The sparse layers'
  # product (the mask's bits, the CPU data ties of the recompute) must not
  # make XLA gather a kernel, a mask or an activation that the dense step
  # leaves sharded: flattening the mask to pack it, or a tie on
  # g.reshape(-1)[0], each did.
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-c', COLLECTIVES_SCRIPT], cwd=REPO,
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  line = [x for x in r.stdout.splitlines() if x.startswith('RESULT')][-1]
  counts = json.loads(line.split(' ', 1)[1])
  assert counts['dense'] == counts['recompute_off'] == {}
  assert counts['recompute_on'] == {}


def test_grad_accumulation_matches_full_batch(data_dir, tmp_path):
  # No dropout in runlocal: the mean of the micro-batch gradients equals the
  # full-batch gradient, so both runs must agree to float precision.
  c1 = tiny_vit(data_dir, total_steps='4', eval_every='4',
                checkpoint_every='4')
  c2 = tiny_vit(data_dir, total_steps='4', eval_every='4',
                checkpoint_every='4', grad_accum_steps=4)
  a = train_lib.train_and_evaluate(c1, str(tmp_path / 'a'))
  b = train_lib.train_and_evaluate(c2, str(tmp_path / 'b'))
  for key in ('eval/loss', 'eval/accuracy'):
    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
  la, lb = read_jsonl(str(tmp_path / 'a')), read_jsonl(str(tmp_path / 'b'))
  for ra, rb in zip(la, lb):
    if 'train/loss' in ra:
      assert rb['train/loss'] == pytest.approx(ra['train/loss'], rel=1e-4)


def test_swinv2_trains_with_output_axis_srste(data_dir, tmp_path):
  # The authors' SwinV2 setting: SR-STE 2:4 on FF grouped along the output
  # axis, plus Q/K/V (docs/recipes.md section 5: their Q/K/V never got the
  # step).
  c = swinv2_base.get_config('srste,2:4,runlocal')
  c.data.data_dir = data_dir
  c.total_steps = '4'
  c.batch_size = 8
  c.eval_batch_size = 128
  c.log_every = c.eval_every = c.checkpoint_every = '4'
  for role in ('q', 'k', 'v'):
    c.sparsity[role].recipe = 'mdgf_exp'
    c.sparsity[role].n, c.sparsity[role].m = 1, 4
    c.sparsity[role].decay = 0.5
  workdir = str(tmp_path / 'swin')
  final = train_lib.train_and_evaluate(c, workdir)
  assert np.isfinite(final['eval/loss'])
  last = [r for r in read_jsonl(workdir) if 'train/loss' in r][-1]
  assert (last['sparsity/ff/n'], last['sparsity/ff/m']) == (2, 4)
  # SR-STE: hard mask, half the FF weights are zero in the effective kernel.
  assert last['sparsity/ff/density'] == pytest.approx(0.5)
  # MdGf on Q/K/V: alpha = exp(-0.5 t) at the logged steps t = 0..3.
  assert last['sparsity/q/alpha'] == pytest.approx(
      np.mean(np.exp(-0.5 * np.arange(4))), rel=1e-5)


def test_killed_after_last_checkpoint_still_reports_results(data_dir,
                                                            tmp_path):
  # A kill after the last checkpoint but before final_metrics.json: the
  # rerun has no step left to train and must still report the evaluation.
  workdir = str(tmp_path / 'run')
  full = train_lib.train_and_evaluate(tiny_vit(data_dir, total_steps='4',
                                               eval_every='4'), workdir)
  os.remove(os.path.join(workdir, 'final_metrics.json'))
  log = read_jsonl(workdir)
  again = train_lib.train_and_evaluate(tiny_vit(data_dir, total_steps='4',
                                                eval_every='4'), workdir)
  for key in ('eval/loss', 'eval/accuracy'):
    assert again[key] == full[key]
  assert read_jsonl(workdir) == log  # Nothing logged twice.


def test_dry_run_t5_base_needs_no_vocabulary_file():
  # The standard T5 vocabulary is not here: the dry run uses its published
  # size and prints the T5-Base count.
  r = _cli('--config=configs/t5_base.py', '--dry_run')
  assert r.returncode == 0, r.stderr[-3000:]
  assert '247,577,856' in r.stdout


def test_huge_page_hint_only_where_the_tunable_would_act(tmp_path):
  thp = tmp_path / 'enabled'
  thp.write_text('always [madvise] never\n')

  def hint(backend='cpu', environ=None, libc='glibc 2.36'):
    return train_lib.huge_page_hint(backend, environ=environ or {},
                                    thp_path=str(thp), libc=libc)

  assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in hint()
  assert hint(libc='glibc 2.35')
  assert hint('gpu') is None and hint('tpu') is None
  assert hint(environ={'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}) is None
  assert hint(environ={'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=2'}) is None
  assert hint(libc='glibc 2.34') is None       # no hugetlb tunable yet
  assert hint(libc='') is None                 # not glibc (musl, macOS)
  thp.write_text('always madvise [never]\n')
  assert hint() is None
  thp.unlink()
  assert hint() is None                        # no transparent huge pages
