"""The benchmarks' plumbing (no timed assertions: speed lives in tables)."""

import importlib.util
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from pgf import step as step_lib
from pgf.bench import inference as bench_inference
from pgf.bench import masks as bench_masks
from pgf.bench import memory
from pgf.bench import steps
from pgf.bench import stock
from pgf.configs import t5_base
from pgf.configs import vit_base
from pgf.sparsity import masks
from pgf.sparsity import trees

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize('module,variant', [(vit_base, 'B/16'),
                                            (t5_base, 'base')])
def test_stock_model_has_pgf_parameter_count(module, variant):
  config = steps.row_config(module.get_config())
  config.unlock()
  config.model.variant = variant
  config.lock()
  s = steps.bench_setup(config)
  batch = steps.synthetic_batch(s.config, s.info, 1)
  inputs = stock._inputs(s.config, batch)
  abstract = jax.eval_shape(
      lambda r: stock.build(s.config).init(r, *inputs, train=False),
      jax.random.key(0))
  assert _count(abstract['params']) == step_lib.param_count(
      s.abstract_state.params)


@pytest.mark.parametrize('module', [vit_base, t5_base])
def test_synthetic_batch_follows_the_training_spec(module):
  s = steps.bench_setup(steps.row_config(module.get_config()))
  batch = steps.synthetic_batch(s.config, s.info, 3)
  assert set(batch) == set(s.info.train_spec)
  for key, (shape, dtype) in s.info.train_spec.items():
    assert batch[key].shape == (3, *shape) and batch[key].dtype == dtype
  for key in ('encoder_input_tokens', 'decoder_input_tokens'):
    if key in batch:
      assert 0 < batch[key].min() and (
          batch[key].max() < s.config.model.vocab_size)


def test_ratios_are_paired_within_rounds():
  rows = [steps.Row('dense', '-', None, None, None, times=[1.0, 2.0, 4.0]),
          steps.Row('ste', 'ff=2:4', True, None, None,
                    times=[1.1, 2.0, 4.4])]
  out = steps.summarize(rows)[1]
  # Per-round ratios 1.1, 1.0, 1.1 (the medians of the times give 1.0).
  assert out['ratio_median'] == pytest.approx(1.1)
  assert (out['ratio_min'], out['ratio_max']) == pytest.approx((1.0, 1.1))
  assert out['overhead_ms'] == pytest.approx(100.0)


def test_rows_count_the_page_faults_of_their_steps():
  # A step that first-touches 64 MiB of fresh memory faults at least once
  # per 2 MiB (huge pages) and on 4 KiB pages 16,384 times; an empty one
  # hardly at all.
  def touch(n):
    for _ in range(n):
      np.ones(2**24, np.float32)

  rows = [steps.Row('dense', '-', None, lambda n: None, None),
          steps.Row('ste', 'ff=2:4', True, touch, None)]
  steps.time_rows(rows, rounds=3, steps=2)
  out = steps.summarize(rows)
  assert [len(r.faults) for r in rows] == [3, 3]
  assert out[0]['faults_per_step'] < 32 <= out[1]['faults_per_step']
  assert '| faults / step |' in steps.markdown(
      dict(model='m', command='c', date='d', device='x', load_before='l',
           load_after='l', host_memory='h', jax='j', batch_size=1,
           batch_note='n', dtype='f', rounds=3, steps=2, param_count=1),
      out)


def _row(name, times, recompute=True):
  return dict(row=name, pattern='-', recompute=recompute,
              samples_ms=list(times))


def test_pooled_ratio_is_a_paired_t_interval_over_rounds():
  dense = [100.0, 200.0, 400.0]
  rows = [_row('dense', dense, None),
          # Per round, the mean log of the two rows is log 1.0, 1.2, 1.1
          # times dense (1.0 = sqrt(0.8 * 1.25), 1.2 = sqrt(1.2 * 1.2)).
          _row('ste', [80.0, 240.0, 440.0]),
          _row('srste', [125.0, 240.0, 440.0]),
          _row('ste', [1e6] * 3, recompute=False),   # not pooled
          _row('mdgf_exp', []),                # untimed (--work_only)
          _row('stock_flax', [110.0, 220.0, 440.0], None)]
  out = steps.pooled(rows)
  d = np.log([1.0, 1.2, 1.1])
  half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)   # t_0.975, df 2
  assert out['sparse']['rows'] == 2 and out['sparse']['rounds'] == 3
  assert out['sparse']['ratio'] == pytest.approx(np.exp(d.mean()))
  assert (out['sparse']['low'], out['sparse']['high']) == pytest.approx(
      (np.exp(d.mean() - half), np.exp(d.mean() + half)))
  # A constant ratio has no spread.
  assert (out['stock']['ratio'], out['stock']['low'],
          out['stock']['high']) == pytest.approx((1.1, 1.1, 1.1))


def test_sparse_work_is_both_passes_and_the_recipe_gradients():
  base = memory.model_config('vit_mu', batch_size=4)
  for recompute in (True, False):
    s = steps.bench_setup(steps.row_config(base, recipe='srste', nm=(1, 4),
                                           recompute=recompute))
    plan = s.schedule.plan(s.schedule.sparse_start)
    params = step_lib.init_state(s, jax.random.key(0)).params
    grads = jax.tree.map(np.ones_like, params)
    step = s.schedule.sparse_start
    out = steps.sparse_work_fn(s, plan)(params, grads, step)
    assert len(out) == (3 if recompute else 2)
    paths = sorted(s.sparsifier.matched(plan))
    flat = trees.flatten(params)
    lam = float(s.schedule.values(step)['ff']['srste_lambda'])
    assert lam > 0
    for i, p in enumerate(paths):
      w = np.asarray(flat[p])
      m = masks.nm_mask_reference(w, masks.NM(1, 4), (0,))
      for kernels in out[:-1]:   # forward, recompute: the hard kernel
        np.testing.assert_array_equal(np.asarray(kernels[i]), w * m)
      np.testing.assert_allclose(np.asarray(out[-1][i]),
                                 np.where(m, 1.0, 1.0 + lam * w), rtol=1e-6)
  dense = steps.bench_setup(steps.row_config(base))
  assert steps.sparse_work_fn(dense, dense.schedule.plan(0)) is None


def test_sparse_work_writes_over_its_last_results():
  """Each call donates the previous call's results and gets the same
  values in their place; a gradient no transform changes (STE) is not an
  output (it would be the donated gradient itself)."""
  base = memory.model_config('vit_mu', batch_size=4)
  s = steps.bench_setup(steps.row_config(base, recipe='ste', nm=(1, 4)))
  plan = s.schedule.plan(s.schedule.sparse_start)
  params = step_lib.init_state(s, jax.random.key(0)).params
  grads = jax.tree.map(np.ones_like, params)
  fn = steps.sparse_work_fn(s, plan)
  first = fn(params, grads, s.schedule.sparse_start)
  assert len(first) == 3 and first[-1] == []
  want = jax.tree.map(np.array, first)   # copies: a view would pin them
  second = fn(params, grads, s.schedule.sparse_start, first)
  assert all(x.is_deleted() for x in jax.tree.leaves(first))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_srste_step_refills_its_gradients_in_place(monkeypatch):
  """In pgf's SR-STE step on CPU the refill kernel writes over the
  backward pass's gradient (an input-output alias), not over a copy of it
  (the step's gradient norm, which reads it too, is passed as `after`). A
  copy fused into the fusion that computes the gradient is no extra pass.
  """
  import re
  monkeypatch.setenv('PGF_MASK_KERNEL', 'kernel')
  bench = steps.Bench(memory.model_config('vit_mu', batch_size=4),
                      stock_model=False)
  row, = bench.add(steps.RowSpec('srste', 'srste', nm=(1, 4)))
  text = row.compile_fn().as_text()
  defined = dict(re.findall(r'^\s*(?:ROOT )?(%[\w.-]+) = (.*)$', text, re.M))
  calls = [line for line in text.splitlines() if 'pgf_nm_refill' in line]
  assert len(calls) == len(bench.setups['srste'].sparsifier.matched(row.plan))
  for line in calls:
    assert 'output_to_operand_aliasing={{}: (1, {})}' in line, line
    g = re.search(r'custom-call\(([^)]*)\)', line).group(1).split(', ')[1]
    assert ' copy(' not in defined[g], (g, defined[g])
    fused = re.search(r'calls=(%[\w.-]+)', defined[g])
    if fused:
      body = text.split(f'\n{fused.group(1)} ', 1)[1].split('\n}', 1)[0]
      ops = set(re.findall(r'= \S+ (\w[\w-]*)\(', body))
      assert ops - {'parameter', 'bitcast', 'copy'}, (g, ops)


def test_a_run_killed_after_its_rounds_keeps_them(tmp_path, monkeypatch):
  # The work timing comes after every round; a run that dies there (a
  # kill, a restart) must leave its timed rounds on disk, marked partial.
  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(steps, 'time_work', killed)
  out = str(tmp_path / 'steps.json')
  seen = []

  def partial(meta, rows):
    seen.append((meta['rounds'], meta.get('partial')))
    steps.write(out, meta, rows)

  specs = steps.default_specs(recipes=('ste',), patterns=('1:4',), sdgf=(),
                              recompute_off=())
  with pytest.raises(KeyboardInterrupt):
    steps.run_bench(memory.model_config('vit_mu', batch_size=4),
                    config_name='vit_mu', command='c', rounds=2, steps=1,
                    warmup=1, batch_note='n', specs=specs, work_repeats=1,
                    stock_model=False, partial=partial)
  assert seen == [(1, 'not yet run: 1 of 2 rounds, the sparse work'),
                  (2, 'not yet run: the sparse work')]
  with open(out) as f:
    saved = json.load(f)
  assert saved['meta']['rounds'] == 2
  assert [(r['row'], len(r['samples_ms'])) for r in saved['rows']] == [
      ('dense', 2), ('ste', 2)]
  assert all('work_ms' not in r for r in saved['rows'])
  text = (tmp_path / 'steps.md').read_text()
  assert '**Partial results**' in text and '| ste | ff=1:4 |' in text
  assert not list(tmp_path.glob('*.tmp'))


def test_every_mask_sample_follows_a_floor_sample():
  order = []

  def fake(name):
    def fn(x):
      order.append(name)
      return x
    return fn, (np.zeros(2),)

  calls = {'floor': fake('floor'), 'a': fake('a'), 'b': fake('b')}
  samples, pairs = bench_masks._round_robin(calls, repeats=3,
                                            min_sample_s=0.0)
  # Two calls each to size the samples (one call per sample here), then
  # per round floor, a, floor, b, each sample after two untimed calls.
  assert order[6:] == (['floor'] * 3 + ['a'] * 3 + ['floor'] * 3
                       + ['b'] * 3) * 3
  assert [len(samples[k]) for k in ('floor', 'a', 'b')] == [6, 3, 3]
  assert [x for _, x in pairs['a']] == samples['a']
  assert [f for f, _ in pairs['a']] == samples['floor'][0::2]
  assert [f for f, _ in pairs['b']] == samples['floor'][1::2]
  # Median over rounds of row / the floor just before it: 2, 1.5, 1.
  assert bench_masks._paired_ratio([(1.0, 2.0), (2.0, 3.0), (4.0, 4.0)]) == (
      1.5, 1.0, 2.0)


def test_two_pass_bound_reads_each_group_then_writes_the_mask():
  w = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
  (read, (a,)), (write, (index,)) = bench_masks._two_passes(
      jax.numpy.asarray(w), (0,))
  np.testing.assert_array_equal(
      np.asarray(read(a)),
      np.abs(w).reshape(4, 16, 3).max(axis=1).view(np.int32))
  mask = np.asarray(write(index))
  assert mask.shape == w.shape and mask.dtype == bool
  np.testing.assert_array_equal(
      mask, np.broadcast_to(np.arange(64)[:, None] % 16 == 0, w.shape))


def test_mask_markdown_counts_rows_against_the_goal(tmp_path):
  def impl(min_ms, x, paired):
    return {'min_ms': min_ms, 'median_ms': min_ms, 'x_floor': x,
            'x_floor_paired': paired}

  def row(pattern, pgf, kernel, xla):
    return {'pattern': pattern, 'pgf': impl(*pgf), 'kernel': impl(*kernel),
            'xla': impl(*xla), 'agree': True}

  out = {
      'command': 'python -m pgf.bench.masks', 'date_utc': '2026-12-07',
      'device': 'cpu', 'jax': '0', 'numba': '0', 'note': 'Idle.',
      'machine': {'processor': 'x', 'cpu': 'A CPU', 'cpus': 2,
                  'load_average_start': [1, 1, 1],
                  'load_average_end': [1, 1, 1], 'memory_gb_per_s': 30.0},
      'results': [{
          'kernels': ['k'], 'shape': [64, 32], 'axes': [0], 'dtype': 'float32',
          'floor_ms': [0.1, 0.1], 'floor_gb_per_s': 1.0, 'two_pass_ms': 0.2,
          'two_pass_x_floor': 2.0,
          'rows': [row('1:8', (0.2, 2.0, 1.5), (0.1, 1.0, 1.0), (0.4, 4, 3)),
                   row('8:16', (0.3, 3.0, 2.5), (0.3, 3.0, 2.1), (0.3, 3, 3)),
                   row('1:16', (0.3, 3.0, 2.5), (0.2, 2.1, 2.0), (0.1, 1, 1))],
      }],
      'vit_ti_ff': None,
  }
  path = tmp_path / 'masks.json'
  path.write_text(json.dumps(out))
  assert bench_masks.write_markdown(str(path)) == str(tmp_path / 'masks.md')
  text = (tmp_path / 'masks.md').read_text()
  assert ('by the paired median, of 3 rows: `pgf` 1 / 1, `xla` 1 / 1, '
          '`kernel` 1 / 2.') in text
  assert 'never come within 2x (paired): 8:16.' in text
  # kernel / xla min times: 0.25, 1.0, 2.0.
  assert ("k: the kernel took 0.25-2.00x the XLA ops' min time, median "
          '1.00x') in text
  assert '| 8:16 | 0.300 / 0.300 | 3.00 | 2.50 |' in text
  assert 'A CPU, 2 CPUs; JAX 0, numba 0.' in text and 'Idle.' in text
  # Runs that recorded numba's threading layer name it; the ViT-Ti table
  # names the patterns it could not run.
  small = {'float32': {'floor_ms': [0.5, 0.6], 'skipped': ['1:128'],
                       'rows': [{'pattern': '1:8', 'min_ms': 0.6,
                                 'median_ms': 0.7, 'x_floor': 1.2,
                                 'x_floor_paired': 1.1}]}}
  path.write_text(json.dumps(dict(
      out, numba_threading='numba 0 (threading layer tbb)', vit_ti_ff=small)))
  bench_masks.write_markdown(str(path))
  text = (tmp_path / 'masks.md').read_text()
  assert 'JAX 0, numba 0 (threading layer tbb).' in text
  assert 'Floor 0.500 ms. Not run: 1:128 (M does not divide 192).' in text
  assert '| 1:8 | 0.600 / 0.700 | 1.20 | 1.10 |' in text


def test_vit_ti_rows_take_the_patterns_that_divide_its_kernels():
  # ViT-Ti's FF kernels group 192 and 768 weights: 1:128 and 8:256 cannot
  # run there (the default patterns of the benchmark include them).
  assert bench_masks._vit_ti_fits(masks.NM(8, 64))
  assert bench_masks._vit_ti_fits(masks.NM(1, 32))
  assert not bench_masks._vit_ti_fits(masks.NM(1, 128))
  assert not bench_masks._vit_ti_fits(masks.NM(8, 256))


def test_inference_samples_follow_untimed_calls(monkeypatch):
  monkeypatch.setattr(bench_inference, 'SAMPLE_SECONDS', 0.0)
  order = []
  fns = {k: (lambda k=k: order.append(k)) for k in ('dense', 'nm')}
  out = bench_inference.interleaved(fns, repeats=2)
  # Two calls each to size the samples (one call per sample here), then
  # per round one untimed and one timed call of each path in turn.
  assert order == ['dense'] * 2 + ['nm'] * 2 + (['dense'] * 2
                                                + ['nm'] * 2) * 2
  assert set(out) == {'dense', 'nm'}


def test_default_specs_cover_every_frame_map_and_recompute_off():
  specs = steps.default_specs(recipes=('ste', 'srste'),
                              patterns=('2:4', '1:64'),
                              recompute_off=('1:16',))
  assert [(x.name, x.nm, x.recompute) for x in specs] == [
      ('ste', (2, 4), True), ('srste', (2, 4), True), ('ste', (1, 64), True),
      ('srste', (1, 64), True), ('sdgf_stepwise', (1, 8), True),
      ('sdgf_geometric', (1, 8), True), ('ste', (1, 16), False),
      ('srste', (1, 16), False)]


def test_recompute_gives_bit_equal_results():
  # Recomputing masks and effective kernels in the backward pass is the
  # same function of the same weights, in the same order of operations.
  base = memory.model_config('vit_mu', batch_size=8)
  # SR-STE (refill term) and MdGf (alpha > 0: the soft effective kernel).
  for r in memory.recompute_equal(base, recipes=('srste', 'mdgf_exp'),
                                  steps=3):
    assert r['bit_equal'], r


def test_memory_rows_report_overhead_against_dense():
  base = memory.model_config('vit_mu', batch_size=4)
  rows = memory.memory_rows(base, rows=('dense', 'ste'), label='vit_mu')
  assert [(r['row'], r['recompute']) for r in rows] == [
      ('dense', None), ('ste', True), ('ste', False)]
  assert all(r['temp_over_dense_bytes'] == r['temp_bytes']
             - rows[0]['temp_bytes'] for r in rows)
  assert all(r['temp_bytes'] > 0 and r['peak_bytes'] >= r['temp_bytes']
             for r in rows)
  assert rows[0]['temp_over_dense'] == 0
  text = memory.markdown(dict(command='c', date='d', device='x', jax='j',
                              dtype='float32', equal_model='m'), rows, [])
  assert '| ste | ff=1:16 |' in text


def test_abstract_state_matches_the_real_one():
  s = steps.bench_setup(steps.row_config(
      memory.model_config('vit_mu', batch_size=4), recipe='ste'))
  real = step_lib.init_state(s, jax.random.key(0))
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), memory.abstract_state(s))
  assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), real)


def test_gpu_check_script_runs_tiny(tmp_path):
  """scripts/gpu_check.sh --tiny: every section, no GPU needed."""
  proc = subprocess.run(
      ['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh'), '--tiny',
       f'--out_dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  platform = jax.devices()[0].platform
  with open(tmp_path / f'gpu_check_tiny_{platform}.json') as f:
    out = json.load(f)
  assert not out['errors']
  sections = out['sections']
  assert set(sections) == {'vit', 'schedule', 't5', 'masks', 'inference'}
  names = [r['row'] for r in sections['vit']['rows']]
  assert names[:3] == ['dense', 'stock_flax', 'ste']
  assert names.count('sdgf_stepwise') == 2
  assert sections['schedule']['executables'] == sections['schedule'][
      'frames'] == 2
  for r in sections['vit']['rows'] + sections['t5']['rows']:
    assert r['temp_bytes'] > 0 and len(r['samples_ms']) >= 3
  assert sections['masks']['rows'] and sections['inference']['rows']
  assert all(r['x_two_passes'] > 0 and r['x_floor_paired'] > 0
             for r in sections['masks']['rows'])
  text = (tmp_path / f'gpu_check_tiny_{platform}.md').read_text()
  assert '## Compiles over an SdGf schedule' in text
  assert '| x floor paired | x two passes |' in text


def _step_profile():
  path = os.path.join(ROOT, 'experiments', 'bench', 'step_profile.py')
  spec = importlib.util.spec_from_file_location('step_profile', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_step_profile_times_each_op_kind_and_its_time_alone():
  # Two worker threads over 2 steps (times in us). Thread 1 runs
  # ffi_call.3 over [0, 1000] and [5000, 6000]; thread 2 runs fusions over
  # [0, 300] and [800, 2000] (overlapping the first call for 500 us) and
  # nothing during the second. A host event is not an op.
  p = _step_profile()
  ev = [dict(name='ffi_call.3', tid=1, ts=0, dur=1000),
        dict(name='ffi_call.12', tid=1, ts=5000, dur=1000),
        dict(name='add_fusion.1', tid=2, ts=0, dur=300),
        dict(name='add_fusion', tid=2, ts=800, dur=1200),
        dict(name='dot.7', tid=2, ts=2500, dur=100),
        dict(name='dot.7', tid=1, ts=7000, dur=50)]
  ev = [dict(e, ph='X') for e in ev]
  s = p.summary(ev, 2)
  assert s['ffi_call'] == pytest.approx(dict(ms=1.0, calls=1.0, alone=0.75))
  assert s['add_fusion'] == pytest.approx(dict(ms=0.75, calls=1.0,
                                               alone=0.5))
  assert s['dot'] == pytest.approx(dict(ms=0.075, calls=1.0, alone=0.075))
  text = p.table({'dot': s['dot']}, s)
  assert '| ffi_call | 0.0 | 1.0 | +1.0 | 1 | 0.8 |' in text
