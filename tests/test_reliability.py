"""Runs you can trust: the workdir is bound to its config and to one writer,
a corrupt checkpoint falls back to an older one, TensorBoard holds every
logged step once after any resume, and errors are one readable message."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from pgf import checkpointing
from pgf import metrics as metrics_lib
from pgf import step as step_lib
from pgf import train as train_lib
from pgf import workdir as workdir_lib
from pgf.configs import vit_base
from pgf.data import images as images_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))
import fault_injection as faults  # noqa: E402  The table's corruptions.

# Logs (every 3) straddle the checkpoints (every 4): resumes carry pending
# metrics. Checkpoints at 4 and 8.
TINY = {'total_steps': '8', 'batch_size': 16, 'eval_batch_size': 128,
        'log_every': '3', 'eval_every': '4', 'checkpoint_every': '4',
        'optimizer.warmup': '2', 'model.variant': 'mu/2'}


def tiny(data_dir, **overrides):
  c = vit_base.get_config('srste,1:4,runlocal')
  c.data.data_dir = data_dir
  c.update_from_flattened_dict({**TINY, **overrides})
  return c


def strip_rate(records):
  return [{k: v for k, v in r.items() if k != 'train/steps_per_sec'}
          for r in records]


def results(final):
  return {k: v for k, v in final.items() if k != 'train_seconds_this_run'}


def events_of(workdir):
  return metrics_lib.read_events(os.path.join(workdir, 'tensorboard'))


def assert_events_match_jsonl(workdir):
  """Every (tag, step) of metrics.jsonl exactly once in the event files,
  with its value as TensorBoard stores it (float32)."""
  expected = {}
  for r in metrics_lib.read_jsonl(workdir):
    for k, v in r.items():
      if k != 'step':
        expected.setdefault(k, []).append((r['step'], float(v)))
  got = events_of(workdir)
  assert set(got) == set(expected)
  for tag, points in expected.items():
    steps = [s for s, _ in got[tag]]
    assert steps == [s for s, _ in points], tag
    np.testing.assert_array_equal(
        np.float32([v for _, v in got[tag]]),
        np.float32([v for _, v in points]), err_msg=tag)


def snapshot(workdir):
  """{relative path: (bytes, mtime_ns)} of every file under `workdir`."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, workdir)] = (f.read(),
                                               os.stat(path).st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def full(data_dir, tmp_path_factory):
  """An uninterrupted run: (workdir, final metrics)."""
  workdir = str(tmp_path_factory.mktemp('full') / 'run')
  final = train_lib.train_and_evaluate(tiny(data_dir), workdir)
  return workdir, final


def copy_run(full, tmp_path, *, unfinish=True):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(full[0], workdir)
  if unfinish:
    os.remove(os.path.join(workdir, 'final_metrics.json'))
  return workdir


# ---- metrics.jsonl and TensorBoard -----------------------------------------

def test_events_hold_each_logged_step_once(full):
  assert_events_match_jsonl(full[0])


def test_kill_before_first_checkpoint_resumes_without_duplicates(
    full, data_dir, tmp_path, monkeypatch):
  # Killed at the 4th batch: the step-0 evaluation and the step-3 log are
  # written, no checkpoint is. The rerun starts over and must not repeat
  # them; the event files are rebuilt even if the killed run's were cut
  # short or another stale file lies beside them.
  workdir = str(tmp_path / 'run')
  real = images_lib.make_train_iterator

  class Killed(Exception):
    pass

  def dying(*args, **kwargs):
    it = real(*args, **kwargs)
    calls = iter(range(1, 10**9))

    class Proxy:
      def __iter__(self):
        return self

      def __next__(self):
        if next(calls) == 4:
          raise Killed()
        return next(it)

      get_state, set_state = it.get_state, it.set_state

    return Proxy()

  monkeypatch.setattr(images_lib, 'make_train_iterator', dying)
  with pytest.raises(Killed):
    train_lib.train_and_evaluate(tiny(data_dir), workdir)
  monkeypatch.setattr(images_lib, 'make_train_iterator', real)
  assert [r['step'] for r in metrics_lib.read_jsonl(workdir)] == [0, 3]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '4'))
  tb = os.path.join(workdir, 'tensorboard')
  (events,) = os.listdir(tb)
  with open(os.path.join(tb, events), 'rb') as f:
    data = f.read()
  with open(os.path.join(tb, events), 'wb') as f:
    f.write(data[:len(data) - 7])  # Unflushed: the last record cut short.
  with open(os.path.join(tb, 'events.out.tfevents.1.stale'), 'wb') as f:
    f.write(data)  # An older writer's file with the same steps.

  final = train_lib.train_and_evaluate(tiny(data_dir), workdir)
  assert results(final) == results(full[1])  # Bit-equal.
  assert strip_rate(metrics_lib.read_jsonl(workdir)) == strip_rate(
      metrics_lib.read_jsonl(full[0]))
  assert_events_match_jsonl(workdir)
  assert len(os.listdir(tb)) == 1


def test_read_events_stops_at_a_torn_record(full, tmp_path):
  src = os.path.join(full[0], 'tensorboard')
  (name,) = os.listdir(src)
  with open(os.path.join(src, name), 'rb') as f:
    data = f.read()
  whole = metrics_lib.read_events(src)
  tb = tmp_path / 'tb'
  tb.mkdir()
  (tb / name).write_bytes(data[:-3])
  torn = metrics_lib.read_events(str(tb))
  last_step = max(s for points in whole.values() for s, _ in points)
  # The last record (the step-8 evaluation) is lost, nothing else.
  assert torn == {
      k: [p for p in v if not (k.startswith('eval/') and p[0] == last_step)]
      for k, v in whole.items()}


# ---- A finished run stays finished ------------------------------------------

def test_finished_run_returns_its_results_and_writes_nothing(full, tmp_path,
                                                             data_dir,
                                                             monkeypatch):
  workdir = copy_run(full, tmp_path, unfinish=False)
  before = snapshot(workdir)
  monkeypatch.setattr(step_lib, 'setup', None)  # Nothing may be built.
  again = train_lib.train_and_evaluate(tiny(data_dir), workdir)
  with open(os.path.join(full[0], 'final_metrics.json')) as f:
    stored = json.load(f)
  assert again == {k: v for k, v in stored.items()
                   if k not in ('step', 'finished')}
  assert again == full[1]
  # An allowed change does not reopen it either.
  train_lib.train_and_evaluate(tiny(data_dir, eval_every='2'), workdir,
                               allow_config_change=['eval_every'])
  assert snapshot(workdir) == before


def test_finished_run_with_another_config_is_refused(full, tmp_path,
                                                     data_dir):
  workdir = copy_run(full, tmp_path, unfinish=False)
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r'total_steps: "8" -> "16"'):
    train_lib.train_and_evaluate(tiny(data_dir, total_steps='16'), workdir)


# ---- The workdir is bound to its config -------------------------------------

def test_changed_config_refused_before_anything_is_built(full, tmp_path,
                                                         data_dir,
                                                         monkeypatch):
  workdir = copy_run(full, tmp_path)
  before = snapshot(workdir)
  monkeypatch.setattr(step_lib, 'setup', None)  # Nothing may be built.
  c = tiny(data_dir, eval_every='2', **{'sparsity.ff.n': 2,
                                         'optimizer.lr': 0.5})
  with pytest.raises(workdir_lib.ConfigChangedError) as e:
    train_lib.train_and_evaluate(c, workdir)
  message = str(e.value)
  lr = tiny(data_dir).optimizer.lr
  assert ('3 keys differ (stored -> now):\n  eval_every: "4" -> "2"\n'
          f'  optimizer.lr: {lr} -> 0.5\n  sparsity.ff.n: 1 -> 2\n'
          ) in message
  assert 'new --workdir' in message
  assert '--allow_config_change=eval_every' in message
  # Allowing the safe key is not enough: the others change the run.
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r'optimizer.lr, sparsity.ff.n change what is '
                     r'trained'):
    train_lib.train_and_evaluate(c, workdir,
                                 allow_config_change=['eval_every'])
  assert snapshot(workdir) == before


def test_unsafe_key_cannot_be_allowed(tmp_path, data_dir):
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r'--allow_config_change=eval_every,seed: seed '
                     r'cannot change on resume'):
    train_lib.train_and_evaluate(tiny(data_dir), str(tmp_path),
                                 allow_config_change=['eval_every', 'seed'])


def test_config_comparison_is_json_normalised(tmp_path, data_dir):
  c = tiny(data_dir)
  workdir_lib.write_config(str(tmp_path), c)
  stored = json.loads((tmp_path / 'config.json').read_text())
  assert isinstance(stored['mesh']['rules'][0], list)  # Tuples -> lists.
  assert isinstance(c.mesh.rules[0], tuple)
  assert workdir_lib.check_config(str(tmp_path), c) == {}
  # An int where the workdir has a float (or a bool for an int) differs.
  stored['optimizer']['lr'] = 1
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  c.optimizer.lr = 1.0
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r'optimizer.lr: 1 -> 1.0'):
    workdir_lib.check_config(str(tmp_path), c)


def test_keys_added_to_pgf_later_keep_old_workdirs_resumable(tmp_path,
                                                             data_dir):
  c = tiny(data_dir)
  workdir_lib.write_config(str(tmp_path), c)
  stored = json.loads((tmp_path / 'config.json').read_text())
  del stored['data']['in_memory']  # A key this workdir predates.
  stored['data']['retired_key'] = 3  # A key pgf no longer has.
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  with pytest.raises(workdir_lib.ConfigChangedError) as e:
    workdir_lib.check_config(str(tmp_path), c)
  assert 'data.retired_key: 3 -> (absent)' in str(e.value)
  assert 'in_memory' not in str(e.value)  # At its default: no difference.
  c.data.in_memory = True  # Not the default: a difference.
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r'data.in_memory: \(absent\) -> true'):
    workdir_lib.check_config(str(tmp_path), c)


def test_allowed_change_is_recorded(tmp_path, data_dir):
  workdir = str(tmp_path)
  workdir_lib.write_config(workdir, tiny(data_dir))
  c = tiny(data_dir, checkpoint_every='2', keep_checkpoints=5)
  changes = workdir_lib.check_config(
      workdir, c, allow=('checkpoint_every', 'keep_checkpoints'))
  assert changes == {'checkpoint_every': ('4', '2'),
                     'keep_checkpoints': (3, 5)}
  workdir_lib.write_config(workdir, c, changes)
  assert workdir_lib.check_config(workdir, c) == {}  # Now the stored one.
  (record,) = [json.loads(line) for line in open(
      os.path.join(workdir, 'config_changes.jsonl'))]
  assert record['changes'] == {'checkpoint_every': ['4', '2'],
                               'keep_checkpoints': [3, 5]}


def test_allowed_change_resumes_to_the_same_parameters(full, tmp_path,
                                                       data_dir):
  # eval_every and checkpoint_every change on resume; the parameters, hence
  # the final evaluation, are bit-equal to the uninterrupted run's.
  workdir = copy_run(full, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
  final = train_lib.train_and_evaluate(
      tiny(data_dir, eval_every='8', checkpoint_every='8'), workdir,
      allow_config_change=['eval_every', 'checkpoint_every'])
  assert results(final) == results(full[1])
  stored = json.load(open(os.path.join(workdir, 'config.json')))
  assert stored['eval_every'] == '8'


# ---- One writer per workdir -------------------------------------------------

HOLD_LOCK = r'''
import sys, time
from pgf import workdir
workdir.WorkdirLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(600)
'''


@pytest.fixture
def holder(tmp_path):
  """A process holding the workdir lock (killed by the test or after it)."""
  workdir = tmp_path / 'held'
  workdir.mkdir()
  proc = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(workdir)],
                          cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'locked'
  yield str(workdir), proc
  proc.kill()
  proc.wait()


def test_second_writer_refused_naming_the_holder(holder):
  workdir, proc = holder
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match=rf'in use by another pgf.train \(pid {proc.pid} on '
                     r'.*One writer per workdir'):
    workdir_lib.WorkdirLock(workdir).acquire()
  # Killed, its lock is gone with it; the file it leaves blocks nothing.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  lock = workdir_lib.WorkdirLock(workdir)
  lock.acquire()
  info = json.load(open(os.path.join(workdir, workdir_lib.LOCK_FILE)))
  assert info['pid'] == os.getpid()
  lock.release()


def test_cli_second_writer_refused_before_compile(holder):
  workdir, proc = holder
  r = cli('--config=configs/vit_base.py:srste,1:4,runlocal',
          f'--workdir={workdir}')
  assert r.returncode == 1
  assert f'in use by another pgf.train (pid {proc.pid}' in r.stderr
  assert_one_clear_message(r)
  assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]


# ---- Checkpoint fallback ----------------------------------------------------

@pytest.fixture(scope='module')
def restore_target(data_dir):
  c = tiny(data_dir)
  s = step_lib.setup(c)
  state = step_lib.init_state(s, jax.random.key(0))
  it = s.task.pipeline.make_train_iterator(
      c, global_batch_size=c.batch_size, process_index=0, process_count=1)
  return state, it


@pytest.mark.parametrize('corruption', sorted(faults.CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back(full, tmp_path, restore_target,
                                              corruption, caplog):
  workdir = copy_run(full, tmp_path)
  ckpts = os.path.join(workdir, 'checkpoints')
  faults.CORRUPTIONS[corruption][1](os.path.join(ckpts, '8'))
  (bad,) = [n for n in os.listdir(ckpts) if n.startswith('8')]
  kept = snapshot(os.path.join(ckpts, bad))
  ckpt = checkpointing.Checkpointer(workdir, keep=3)
  with caplog.at_level('WARNING'):
    state, host = ckpt.restore_latest(*restore_target)
  ckpt.close()
  assert int(state.step) == 4
  assert host['pending']  # The metrics of step 4, logged at 6.
  assert sorted(os.listdir(ckpts)) == ['4']
  # Skipped, named, moved aside whole: nothing deleted.
  skipped = os.path.join(workdir, checkpointing.SKIPPED_DIR)
  assert snapshot(os.path.join(skipped, bad)) == kept
  if bad == '8':
    assert f'Checkpoint {ckpts}/8 cannot be restored' in caplog.text
  assert f'Moved {ckpts}/{bad} to {skipped}/{bad}' in caplog.text
  (record,) = [json.loads(line) for line in open(
      os.path.join(skipped, 'skipped.jsonl'))]
  assert (record['from'], record['to']) == (os.path.join(ckpts, bad),
                                            os.path.join(skipped, bad))


def test_no_checkpoint_restores_refuses_and_moves_nothing(full, tmp_path,
                                                          restore_target):
  workdir = copy_run(full, tmp_path)
  ckpts = os.path.join(workdir, 'checkpoints')
  faults.garble(os.path.join(ckpts, '8', 'host', 'metadata'))
  shutil.rmtree(os.path.join(ckpts, '4', 'state'))
  before = snapshot(workdir)
  ckpt = checkpointing.Checkpointer(workdir, keep=3)
  with pytest.raises(checkpointing.RestoreError) as e:
    ckpt.restore_latest(*restore_target)
  ckpt.close()
  message = str(e.value)
  assert f'No checkpoint in {ckpts} restores:' in message
  assert f'{ckpts}/8: JSONDecodeError' in message
  assert f'{ckpts}/4: KeyError: \'Item "state" was not found' in message
  assert 'Nothing was moved or deleted' in message
  assert 'new --workdir' in message
  assert snapshot(workdir) == before


def test_run_resumes_past_a_corrupt_checkpoint(full, tmp_path, data_dir):
  # End to end: the step-8 checkpoint is cut short; the rerun restores step
  # 4, trains 5-8 again and ends exactly as the uninterrupted run did.
  workdir = copy_run(full, tmp_path)
  faults.truncate_largest_array_file(
      os.path.join(workdir, 'checkpoints', '8'))
  final = train_lib.train_and_evaluate(tiny(data_dir), workdir)
  assert results(final) == results(full[1])
  assert strip_rate(metrics_lib.read_jsonl(workdir)) == strip_rate(
      metrics_lib.read_jsonl(full[0]))
  assert_events_match_jsonl(workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '4', '8']
  assert sorted(os.listdir(os.path.join(
      workdir, checkpointing.SKIPPED_DIR))) == ['8', 'skipped.jsonl']


# ---- Errors a person can read -----------------------------------------------

USAGE = 'Train and evaluate an N:M sparse Transformer'  # The usage text.


def cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'pgf.train', *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=300)


def assert_one_clear_message(r):
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert USAGE not in r.stderr + r.stdout
  errors = [line for line in r.stderr.splitlines()
            if line.startswith('pgf.train: error: ')]
  assert len(errors) == 1, r.stderr[-3000:]


@pytest.mark.parametrize('args, message', [
    (['--config=configs/vit_base.py:runlocal', '--config.sparsity.ff.nn=1'],
     "--config.sparsity.ff.nn=1: unknown config key 'sparsity.ff.nn' "
     "(sparsity.ff has no 'nn'). Did you mean 'n'?"),
    (['--config=configs/no_such_config.py'],
     "no config file 'configs/no_such_config.py'"),
    (['--config=configs/vit_base.py:srste,2:x'],
     "--config=configs/vit_base.py:srste,2:x: Config argument '2:x' is not a "
     'recipe'),
    (['--config=configs/vit_base.py:runlocal',
      '--config.sparsity.ff.recipe=magic'],
     "sparsity.ff.recipe='magic' is not allowed; choose one of"),
    (['--config=configs/vit_base.py:runlocal', '--config.batch_size=x'],
     "flag --config.batch_size=x: invalid literal for int()"),
], ids=['unknown_key', 'missing_file', 'malformed_argument',
        'invalid_value', 'unparsable_value'])
@pytest.mark.parametrize('dry_run', [True, False], ids=['dry_run', 'train'])
def test_cli_config_errors_are_one_message(args, message, dry_run,
                                           tmp_path):
  workdir = tmp_path / 'run'
  r = cli(*args, f'--workdir={workdir}', *(['--dry_run'] if dry_run else []))
  assert r.returncode == 1
  assert message in r.stderr, r.stderr[-3000:]
  assert_one_clear_message(r)
  assert not workdir.exists()


@pytest.mark.parametrize('under, message', [
    ('file/run', 'cannot be written: Not a directory'),
    ('file', 'exists and is not a directory'),
])
def test_cli_unusable_workdir_fails_before_anything_is_built(under, message,
                                                             tmp_path):
  (tmp_path / 'file').write_text('')
  r = cli('--config=configs/vit_base.py:srste,1:4,runlocal',
          f'--workdir={tmp_path / under}')
  assert r.returncode == 1
  assert message in r.stderr
  assert_one_clear_message(r)
  assert 'libtpu' not in r.stderr  # JAX's backend was never started.


def test_cli_changed_config_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  c = vit_base.get_config('srste,1:4,runlocal')
  workdir_lib.write_config(str(workdir), c)
  r = cli('--config=configs/vit_base.py:srste,1:4,runlocal',
          '--config.sparsity.ff.n=2', '--config.eval_every=7',
          f'--workdir={workdir}')
  assert r.returncode == 1
  assert ('2 keys differ (stored -> now):\n'
          f'  eval_every: "{c.eval_every}" -> "7"\n'
          '  sparsity.ff.n: 1 -> 2\n') in r.stderr
  assert_one_clear_message(r)
  assert os.listdir(workdir) == ['config.json']  # Nothing written.


def test_cli_unexpected_argument_shows_usage():
  r = cli('--config=configs/vit_base.py:runlocal', 'extra', '--dry_run')
  assert r.returncode == 1
  assert "Unexpected arguments: ['extra']" in r.stderr
  assert USAGE in r.stderr  # The command line itself is malformed.


def test_cli_distributed_without_a_cluster_says_what_to_pass():
  r = cli('--config=configs/vit_base.py:runlocal', '--distributed',
          '--dry_run')
  assert r.returncode == 1
  assert ('pass --coordinator_address=HOST:PORT, --num_processes=N and '
          '--process_id=I') in r.stderr
  assert_one_clear_message(r)
