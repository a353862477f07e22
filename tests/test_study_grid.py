"""pgf.study's grid files, flag checking, run order, run records and the
runner's process handling (with a stand-in for pgf.train: no training)."""

import json
import math
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pgf.study import Base
from pgf.study import Cell
from pgf.study import Grid
from pgf.study import grid as grid_lib
from pgf.study import records
from pgf.study import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/vit_base.py'


def small_grid(**cell_overrides) -> Grid:
  return Grid(Base(CONFIG, 'srste,1:4,runlocal',
                   overrides={'total_steps': '6', 'batch_size': 16}),
              [Cell('a'), Cell('b', 'dense,runlocal', references=('a',)),
               Cell('c', 'mdgf_exp,1:4,runlocal', overrides=cell_overrides,
                    references=('a', 'b'))],
              seeds=(0, 1))


def test_load_grid_passes_scale_and_computes_overrides(tmp_path):
  path = tmp_path / 'grid.py'
  path.write_text(textwrap.dedent('''
      from pgf.study import Base, Cell, Grid

      def get_grid(scale):
        flops = {'cpu': 1e9, 'gpu': 1e12}[scale]
        steps = int(flops / 1e7)  # Steps from a FLOP budget.
        return Grid(Base('configs/vit_base.py', 'srste,1:8,runlocal'),
                    [Cell('x', overrides={'total_steps': str(steps)})],
                    seeds=range(3))
  '''))
  cpu = grid_lib.load_grid(str(path), scale='cpu')
  gpu = grid_lib.load_grid(str(path), scale='gpu')
  assert (cpu.scale, gpu.scale) == ('cpu', 'gpu')
  assert cpu.overrides_of(cpu.cells[0]) == {'total_steps': '100'}
  assert gpu.overrides_of(gpu.cells[0]) == {'total_steps': '100000'}
  assert cpu.seeds_of(cpu.cells[0]) == (0, 1, 2)
  with pytest.raises(KeyError):  # The grid file's own error.
    grid_lib.load_grid(str(path), scale='tpu')
  (tmp_path / 'empty.py').write_text('x = 1\n')
  with pytest.raises(grid_lib.GridError, match='get_grid'):
    grid_lib.load_grid(str(tmp_path / 'empty.py'))


def test_validate_lists_every_problem():
  grid = Grid(Base(CONFIG), [
      Cell('a', overrides={'seed': 3}), Cell('a'),
      Cell('bad/name', references=('zz', 'bad/name')),
      Cell('d', seeds=(1, 1), overrides={'x': object()})])
  with pytest.raises(grid_lib.GridError) as e:
    grid_lib.validate(grid)
  text = str(e.value)
  for part in ("'a' is used more than once", 'override "seed"',
               "cell 'bad/name': a name must match",
               "reference 'zz' is not a cell", 'references itself',
               'repeated seeds', "cell 'd': override x"):
    assert part in text, part


@pytest.mark.parametrize('value, flag', [
    (True, 'true'), (False, 'false'), (16, '16'), (np.int64(16), '16'),
    (0.1, '0.1'), (1e-4, '0.0001'), ('6', '6'), (None, 'None'),
    ((('batch', 'data'),), "(('batch', 'data'),)"), ([1, 2], '(1, 2)')])
def test_format_value(value, flag):
  assert grid_lib.format_value(value) == flag


def test_check_grid_parses_values_as_pgf_train_does():
  overrides = {'optimizer.lr': 0.002, 'model.remat': True,
               'batch_size': np.int64(32), 'data.data_dir': '/tmp/a b',
               'sparsity.ff.decay': 1e-4, 'optimizer.min_lr': 0,
               'mesh.rules': (('batch', 'data'), ('embed', None))}
  configs = grid_lib.check_grid(small_grid(**overrides))
  c = configs['c']
  assert c.optimizer.lr == 0.002 and c.model.remat is True
  assert c.batch_size == 32 and c.data.data_dir == '/tmp/a b'
  assert c.sparsity.ff.decay == 1e-4 and c.optimizer.min_lr == 0.0
  assert c.mesh.rules == (('batch', 'data'), ('embed', None))
  assert c.total_steps == '6'  # A string key given a string stays one.
  assert (c.sparsity.ff.recipe, c.sparsity.ff.m) == ('mdgf_exp', 4)
  assert configs['b'].sparsity.ff.recipe == 'dense'


def test_check_grid_names_cell_and_key():
  grid = small_grid(**{'optimizer.lrr': 0.1, 'sparsity.ff.nope': 1})
  grid = Grid(grid.base, [*grid.cells,
                          Cell('e', overrides={'batch_size': 'many'})])
  with pytest.raises(grid_lib.GridError) as e:
    grid_lib.check_grid(grid)
  text = str(e.value)
  assert "cell 'c': config key 'optimizer.lrr' does not exist" in text
  assert "did you mean 'optimizer.lr'" in text
  assert "cell 'c': config key 'sparsity.ff.nope' does not exist" in text
  assert "cell 'e'" in text and 'batch_size=many' in text
  assert "cell 'a'" not in text
  bad_arg = Grid(Base(CONFIG), [Cell('x', 'srste,3:q')])
  with pytest.raises(grid_lib.GridError, match="cell 'x'.*3:q"):
    grid_lib.check_grid(bad_arg)


def test_runs_interleave_seeds_and_respect_priority(tmp_path):
  root = str(tmp_path)
  order = [(r.cell, r.seed) for r in grid_lib.runs(small_grid(), root)]
  assert order == [('a', 0), ('b', 0), ('c', 0), ('a', 1), ('b', 1),
                   ('c', 1)]
  grid = small_grid()
  cells = list(grid.cells)
  cells[2] = Cell('c', 'mdgf_exp,1:4,runlocal', priority=1, seeds=(0, 5))
  grid = Grid(grid.base, cells, seeds=(0, 1))
  order = [(r.cell, r.seed) for r in grid_lib.runs(grid, root)]
  assert order == [('c', 0), ('c', 5), ('a', 0), ('b', 0), ('a', 1),
                   ('b', 1)]
  only = grid_lib.runs(grid, root, only='^[ab]$', seeds=[1])
  assert [(r.cell, r.seed) for r in only] == [('a', 1), ('b', 1)]


def test_run_command(tmp_path):
  run = grid_lib.runs(small_grid(**{'optimizer.lr': 0.5}), str(tmp_path))[5]
  assert run.workdir == str(tmp_path / 'c' / 'seed_1')
  assert run.args == ('--config=configs/vit_base.py:mdgf_exp,1:4,runlocal',
                      '--config.seed=1', '--config.total_steps=6',
                      '--config.batch_size=16', '--config.optimizer.lr=0.5')
  command = run.command('py')
  assert command[:3] == ['py', '-m', 'pgf.train']
  assert command[3] == ('--config=' + os.path.join(REPO, CONFIG)
                        + ':mdgf_exp,1:4,runlocal')
  assert command[4:-1] == list(run.args[1:])
  assert command[-1] == f'--workdir={run.workdir}'


def test_recipe_and_pattern():
  grid = small_grid()
  assert grid_lib.recipe_and_pattern(grid, grid.cells[0]) == ('srste',
                                                              '1:4')
  assert grid_lib.recipe_and_pattern(grid, grid.cells[1]) == ('dense', None)
  own = Cell('z', 'srste,1:4', recipe='mine', pattern='2:8')
  assert grid_lib.recipe_and_pattern(grid, own) == ('mine', '2:8')
  assert grid_lib.recipe_and_pattern(grid, Cell('q', 'runlocal')) == (
      'q', None)
  assert grid_lib.sparsity_of('1:32') == pytest.approx(31 / 32)
  assert grid_lib.sparsity_of(None) is None


def test_child_env(monkeypatch):
  monkeypatch.setattr(runner, 'cpu_count', lambda: 8)
  env = runner.child_env(device='cpu', parallel=2, environ={'A': '1'})
  assert {k: env[k] for k in runner.THREAD_VARS} == dict.fromkeys(
      runner.THREAD_VARS, '4')
  assert env['A'] == '1' and 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in env
  assert runner.child_env(device='cpu', parallel=16, environ={})[
      'NPROC'] == '1'
  assert runner.child_env(device='cpu', parallel=2, threads=3,
                          environ={})['OMP_NUM_THREADS'] == '3'
  untouched = runner.child_env(device='cpu', parallel=2, threads=0,
                               environ={'NPROC': '7'})
  assert untouched == {'NPROC': '7'}
  gpu = runner.child_env(device='gpu', parallel=3, environ={})
  assert gpu == {'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.300',
                 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
  assert runner.child_env(device='gpu', parallel=2, mem_fraction=0.2,
                          environ={})[
                              'XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.200'


def test_detect_device():
  assert runner.detect_device({'JAX_PLATFORMS': 'cpu'}) == 'cpu'
  assert runner.detect_device({'JAX_PLATFORMS': 'cuda,cpu'}) == 'gpu'


def test_status_of_a_workdir(tmp_path):
  wd, args = str(tmp_path / 'run'), ['--config=c.py', '--config.seed=0']
  assert records.status(wd, args) == records.MISSING
  records.start_attempt(wd, cell='x', seed=0, args=args, command=['p'])
  assert records.status(wd, args) == records.PARTIAL
  assert records.status(wd, args[:1]) == records.STALE
  records.end_attempt(wd, returncode=1, seconds=2.0)
  assert records.status(wd, args) == records.FAILED
  os.makedirs(os.path.join(wd, 'checkpoints', '3'))
  os.makedirs(os.path.join(wd, 'checkpoints', '6.orbax-checkpoint-tmp-1'))
  assert records.latest_checkpoint(wd) == 3
  records.write_json(os.path.join(wd, records.FINAL), {'step': 6})
  assert records.status(wd, args) == records.FAILED  # No "finished".
  records.write_json(os.path.join(wd, records.FINAL),
                     {'step': 6, 'finished': True})
  assert records.status(wd, args) == records.FINISHED
  record = records.read_json(os.path.join(wd, records.RECORD))
  assert [a['returncode'] for a in record['attempts']] == [1]


def test_metric_value_falls_back_to_the_final_steps_record():
  history = [{'step': 3, 'eval/accuracy': 0.5},
             {'step': 6, 'train/loss': 0.1},
             {'step': 6, 'eval/accuracy': 0.75}]
  final = {'step': 6, 'finished': True}
  assert records.metric_value(final, history, 'eval/accuracy') == 0.75
  assert records.metric_value({**final, 'eval/accuracy': 0.7}, history,
                              'eval/accuracy') == 0.7
  assert records.metric_value({'step': 9}, history, 'eval/accuracy') is None
  assert records.metric_value({'x': float('nan')}, [], 'x') is None


FAKE_TRAIN = '''\
#!{python}
"""Stands in for `python -m pgf.train`: seed 1 fails, others finish."""
import json, os, sys
if sys.argv[1] == '-c':  # The runner's dataset preparation.
  sys.exit(0)
flags = dict(a[2:].split('=', 1) for a in sys.argv[3:])
workdir, seed = flags['workdir'], int(flags['config.seed'])
print('fake train', seed, os.environ.get('NPROC'))
if seed == 1:
  print('boom: seed 1 cannot train', file=sys.stderr)
  sys.exit(3)
with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
  json.dump({{'step': 6, 'finished': True,
             'eval/accuracy': 0.5 + seed / 10}}, f)
'''


@pytest.fixture
def fake_python(tmp_path):
  path = tmp_path / 'fake_python'
  path.write_text(FAKE_TRAIN.format(python=sys.executable))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def test_runner_reports_failures_and_continues(tmp_path, fake_python,
                                               caplog):
  root = str(tmp_path / 'root')
  grid = small_grid()
  summary = runner.run_grid(grid, root, parallel=2, python=fake_python,
                            device='cpu', threads=1)
  done = {(o.run.cell, o.run.seed): o for o in summary.outcomes}
  assert len(done) == 6 and summary.skipped == []
  assert {k for k, o in done.items() if not o.finished} == {
      ('a', 1), ('b', 1), ('c', 1)}
  assert done['a', 1].returncode == 3
  log = open(os.path.join(root, 'a', 'seed_1', 'train.log')).read()
  assert 'boom: seed 1 cannot train' in log and 'fake train 1 1' in log
  failure = [r.getMessage() for r in caplog.records if 'FAILED' in
             r.getMessage() and ' a seed 1' in r.getMessage()]
  assert failure and 'boom: seed 1 cannot train' in failure[0]
  assert records.status(os.path.join(root, 'a', 'seed_1'),
                        done['a', 1].run.args) == records.FAILED
  # A rerun skips the finished runs and retries the failed ones; appending
  # keeps the first attempt's log.
  again = runner.run_grid(grid, root, parallel=1, python=fake_python,
                          device='cpu')
  assert sorted((r.cell, r.seed) for r in again.skipped) == [
      ('a', 0), ('b', 0), ('c', 0)]
  assert [(o.run.cell, o.run.seed) for o in again.outcomes] == [
      ('a', 1), ('b', 1), ('c', 1)]
  log = open(os.path.join(root, 'a', 'seed_1', 'train.log')).read()
  assert log.count('==== pgf.study') == 2


def test_runner_refuses_workdirs_of_other_flags(tmp_path, fake_python):
  root = str(tmp_path / 'root')
  runner.run_grid(small_grid(), root, only='^a$', seeds=[0],
                  python=fake_python, device='cpu')
  changed = small_grid(**{'optimizer.lr': 0.5})
  changed = Grid(Base(CONFIG, 'srste,1:4,runlocal',
                      overrides={'total_steps': '7', 'batch_size': 16}),
                 changed.cells, seeds=(0, 1))
  with pytest.raises(grid_lib.GridError, match='other train flags'):
    runner.run_grid(changed, root, python=fake_python, device='cpu')


def test_cli_run_exits_non_zero_on_failure(tmp_path, fake_python):
  grid_file = tmp_path / 'mystudy' / 'grid.py'
  grid_file.parent.mkdir()
  grid_file.write_text(textwrap.dedent('''
      from pgf.study import Base, Cell, Grid

      def get_grid(scale):
        return Grid(Base('configs/vit_base.py', 'srste,1:4,runlocal'),
                    [Cell('a'), Cell('b', 'dense,runlocal')], seeds=(0, 1))
  '''))
  cli = [sys.executable, '-m', 'pgf.study', 'run', str(grid_file),
         f'--python={fake_python}', '--parallel=2']
  # This checkout's pgf and configs, whatever the working directory.
  env = {**os.environ, 'PYTHONPATH': REPO}
  dry = subprocess.run([*cli, '--dry'], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120, env=env)
  assert dry.returncode == 0, dry.stderr
  assert not (tmp_path / 'workdirs').exists()  # Nothing launched.
  assert 'a seed 0: start' in dry.stderr
  ran = subprocess.run(cli, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120, env=env)
  assert ran.returncode == 1
  assert '2 finished now, 2 failed' in ran.stdout
  assert (tmp_path / 'workdirs' / 'mystudy' / 'cpu' / 'b' / 'seed_0' /
          'final_metrics.json').exists()
  grid_file.write_text(grid_file.read_text().replace(
      "Cell('a')", "Cell('a', overrides={'optimizer.lrr': 1.0})"))
  bad = subprocess.run(cli, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120, env=env)
  assert bad.returncode == 2
  assert "cell 'a': config key 'optimizer.lrr' does not exist" in bad.stderr
  assert json.loads((tmp_path / 'workdirs' / 'mystudy' / 'cpu' / 'a' /
                     'seed_1' / 'study.json').read_text())['attempts'][0][
                         'returncode'] == 3


@pytest.mark.parametrize('scale, steps, seeds', [('cpu', 621, 5),
                                                 ('gpu', 1200, 10)])
def test_example_grid_checks_at_both_scales(scale, steps, seeds):
  path = os.path.join(REPO, 'pgf', 'study', 'example_grid.py')
  grid = grid_lib.load_grid(path, scale=scale)
  configs = grid_lib.check_grid(grid, grid_file=path)
  mdgf = configs['mdgf_exp_1to32']
  assert mdgf.total_steps == str(steps) and mdgf.sparsity.ff.m == 32
  assert mdgf.sparsity.ff.decay == pytest.approx(math.log(100) /
                                                 (0.6 * steps))
  assert grid.comparisons()[:2] == [('srste_1to8', 'dense'),
                                    ('mdgf_exp_1to8', 'srste_1to8')]
  runs = grid_lib.runs(grid, '/r', grid_file=path)
  assert len(runs) == 5 * seeds
  assert [r.cell for r in runs[:seeds]] == ['dense'] * seeds  # Priority.
