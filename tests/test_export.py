"""Compressed N:M export: exact round trip, exact N:M, and the exported
weights, run as a plain dense model, score what the run's evaluation said."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vit_base
from pgf import data as data_lib
from pgf import export
from pgf import sparsity as sp
from pgf import train as train_lib


def test_compress_round_trip_random_kernels():
  rng = np.random.default_rng(0)
  infos = {
      'a': sp.KernelInfo('a', (16, 8), ('embed', 'mlp'), (0,), (1,)),
      'o': sp.KernelInfo('o', (2, 8, 4), ('heads', 'kv', 'embed'), (0, 1),
                         (2,)),
  }
  params = {'a': {'kernel': rng.normal(size=(16, 8)).astype(np.float32),
                  'bias': rng.normal(size=(8,)).astype(np.float32)},
            'o': {'kernel': rng.normal(size=(2, 8, 4)).astype(np.float32)}}
  plan = sp.SparsityPlan((sp.LayerRule('ff', '^a$', sp.NM(2, 8), 'in'),
                          sp.LayerRule('o', '^o$', sp.NM(1, 4), 'in')))
  arrays = export.compress(params, plan, infos)
  assert arrays['a/kernel/values'].shape == (2, 8, 2)  # 2 groups x 8 cols.
  assert arrays['a/kernel/indices'].dtype == np.uint8
  assert arrays['o/kernel/values'].shape == (4, 4, 1)  # (2*8)/4 groups.
  back = export.decompress(arrays)
  want = sp.hard_masked_params(params, plan, infos)
  for key, w in flax.traverse_util.flatten_dict(want, sep='/').items():
    np.testing.assert_array_equal(
        flax.traverse_util.flatten_dict(back, sep='/')[key], np.asarray(w))


def test_exported_run_is_the_evaluated_nm_model(data_dir, tmp_path):
  c = vit_base.get_config('srste,1:8,runlocal')
  c.data.data_dir = data_dir
  c.total_steps = '6'
  c.batch_size = 16
  c.eval_batch_size = 128
  c.log_every = c.eval_every = c.checkpoint_every = '6'
  workdir = str(tmp_path / 'run')
  final = train_lib.train_and_evaluate(c, workdir)
  path = export.export_run(workdir)
  arrays = dict(np.load(path))
  params = export.decompress(arrays)
  s = train_lib.setup(c)
  reports = sp.verify_nm(flax.traverse_util.flatten_dict(params, sep='/'),
                         sp.export_patterns(s.schedule.final_plan(), s.infos))
  assert len(reports) == 8 and all(r.is_nm for r in reports.values())
  assert all(r.density == pytest.approx(1 / 8) for r in reports.values())
  # A plain dense model with the exported weights: no sparsity machinery.
  model = s.task.build_model(None)
  correct = count = 0.0
  for batch in data_lib.make_eval_iterable(
      c, global_batch_size=c.eval_batch_size, process_index=0,
      process_count=1):
    logits = model.apply({'params': jax.tree.map(jnp.asarray, params)},
                         batch['image'], train=False)
    correct += float(((logits.argmax(-1) == batch['label']) *
                      batch['mask']).sum())
    count += float(batch['mask'].sum())
  assert correct / count == pytest.approx(final['eval/accuracy'], abs=1e-6)
