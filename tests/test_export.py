"""Compressed N:M export: exact round trip, exact N:M, and the exported
weights, run as a plain dense model, score what the run's evaluation said."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgf import export
from pgf import sparsity as sp
from pgf import step as step_lib
from pgf import train as train_lib
from pgf.configs import vit_base


def test_compress_round_trip_random_kernels():
  rng = np.random.default_rng(0)
  params = {'a': {'kernel': rng.normal(size=(16, 8)).astype(np.float32),
                  'bias': rng.normal(size=(8,)).astype(np.float32)},
            'o': {'kernel': rng.normal(size=(2, 8, 4)).astype(np.float32)}}
  sparsifier = sp.Sparsifier.create(params, (
      sp.GroupSpec('ff', '^a/kernel$', sp.NM(2, 8)),
      sp.GroupSpec('o', '^o/kernel$', sp.NM(1, 4), group_axes=(0, 1))),
                                    total_steps=10)
  plan = sparsifier.schedule.final_plan()
  arrays = export.compress(params, sparsifier)
  assert arrays['a/kernel/values'].shape == (2, 8, 2)  # 2 groups x 8 cols.
  assert arrays['a/kernel/indices'].dtype == np.uint8
  assert arrays['o/kernel/values'].shape == (4, 4, 1)  # (2*8)/4 groups.
  back = export.decompress(arrays)
  want = sparsifier.hard_masked(params, plan)
  for key, w in flax.traverse_util.flatten_dict(want, sep='/').items():
    np.testing.assert_array_equal(
        flax.traverse_util.flatten_dict(back, sep='/')[key], np.asarray(w))


def test_exported_run_is_the_evaluated_nm_model(data_dir, tmp_path):
  c = vit_base.get_config('srste,1:8,runlocal')
  c.data.data_dir = data_dir
  c.model.variant = 'mu/2'
  c.total_steps = '6'
  c.batch_size = 16
  c.eval_batch_size = 128
  c.log_every = c.eval_every = c.checkpoint_every = '6'
  workdir = str(tmp_path / 'run')
  final = train_lib.train_and_evaluate(c, workdir)
  path = export.export_run(workdir)
  arrays = dict(np.load(path))
  params = export.decompress(arrays)
  s = step_lib.setup(c)
  reports = sp.verify_nm(flax.traverse_util.flatten_dict(params, sep='/'),
                         s.sparsifier.export_patterns())
  # mu/2: 2 blocks x (wi, wo).
  assert len(reports) == 4 and all(r.is_nm for r in reports.values())
  assert all(r.density == pytest.approx(1 / 8) for r in reports.values())
  # A plain dense model with the exported weights: no sparsity machinery.
  model = s.task.build_model(None)
  correct = count = 0.0
  for batch in s.task.pipeline.make_eval_iterable(
      c, global_batch_size=c.eval_batch_size, process_index=0,
      process_count=1):
    logits = model.apply({'params': jax.tree.map(jnp.asarray, params)},
                         batch['image'], train=False)
    correct += float(((logits.argmax(-1) == batch['label']) *
                      batch['mask']).sum())
    count += float(batch['mask'].sum())
  assert correct / count == pytest.approx(final['eval/accuracy'], abs=1e-6)
