r"""Compressed N:M export of a trained run, and its inverse.

  python -m pgf.export --workdir=DIR [--step=N] [--out=DIR/export_nm.npz]

Every sparse kernel under the run's final pattern (the hard mask, alpha = 0:
the true N:M model evaluation reports) is stored compressed: its groups of M
along the group axes become `values` (the N kept weights of each group, in
group order) and `indices` (their positions 0..M-1 in the group, uint8 for
M <= 256). Other parameters are stored as they are. A JSON manifest inside
the file names each kernel's shape, pattern and group axes.

`decompress` rebuilds the dense-layout params (zeros where pruned), which
equal `Sparsifier.hard_masked` exactly.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pgf import sparsity as sp

MANIFEST = '__manifest__'


def _to_groups(x: np.ndarray, axes: tuple[int, ...], m: int) -> np.ndarray:
  """(...) -> (..., groups, rest..., M): the group axis M moved last."""
  a0, a1 = axes[0], axes[-1]
  length = int(np.prod(x.shape[a0:a1 + 1]))
  g = x.reshape(x.shape[:a0] + (length // m, m) + x.shape[a1 + 1:])
  return np.moveaxis(g, a0 + 1, -1)


def _from_groups(g: np.ndarray, shape: tuple[int, ...],
                 axes: tuple[int, ...]) -> np.ndarray:
  return np.moveaxis(g, -1, axes[0] + 1).reshape(shape)


def compress(params, sparsifier: sp.Sparsifier,
             plan: sp.SparsityPlan | None = None) -> dict[str, np.ndarray]:
  """Flat dict of arrays (sparse kernels as values/indices) + a manifest.

  Args:
    params: the trained (dense) parameters.
    sparsifier: the run's Sparsifier (which kernels, which group axes).
    plan: the pattern to export; the final plan by default.
  """
  plan = sparsifier.schedule.final_plan() if plan is None else plan
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(jax.device_get(params)), sep='/')
  masks = {k: np.asarray(v) for k, v in
           sparsifier.masks(params, plan).items()}
  matched = sparsifier.matched(plan)
  out, manifest = {}, {}
  for key, w in flat.items():
    if key in masks:
      rule, axes = matched[key]
      wg = _to_groups(np.asarray(w), axes, rule.nm.m)
      mg = _to_groups(masks[key], axes, rule.nm.m)
      # Positions of the kept weights, ascending within each group.
      idx = np.argsort(~mg, axis=-1, kind='stable')[..., :rule.nm.n]
      dtype = np.uint8 if rule.nm.m <= 256 else np.uint16
      out[f'{key}/values'] = np.take_along_axis(wg, idx, axis=-1)
      out[f'{key}/indices'] = idx.astype(dtype)
      manifest[key] = dict(shape=list(np.shape(w)), n=rule.nm.n,
                           m=rule.nm.m, axes=list(axes), group=rule.group,
                           dtype=str(np.asarray(w).dtype))
    else:
      out[key] = np.asarray(w)
  out[MANIFEST] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
  return out


def decompress(arrays) -> dict:
  """Nested params with every compressed kernel back in its dense layout."""
  manifest = json.loads(bytes(np.asarray(arrays[MANIFEST])).decode())
  flat = {}
  for key in arrays:
    if key == MANIFEST or key.endswith(('/values', '/indices')):
      continue
    flat[key] = np.asarray(arrays[key])
  for key, meta in manifest.items():
    values = np.asarray(arrays[f'{key}/values'])
    idx = np.asarray(arrays[f'{key}/indices']).astype(np.int64)
    axes, shape = tuple(meta['axes']), tuple(meta['shape'])
    g = np.zeros(values.shape[:-1] + (meta['m'],), values.dtype)
    np.put_along_axis(g, idx, values, axis=-1)
    flat[key] = _from_groups(g, shape, axes)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def export_run(workdir: str, *, step: int | None = None,
               out: str | None = None) -> str:
  """Compresses the params of a run's checkpoint; returns the file path."""
  from pgf import checkpointing
  from pgf import step as step_lib
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  s = step_lib.setup(config)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise ValueError(f'No checkpoint in {ckpt.directory}.')
  abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      nn.unbox(s.abstract_state), s.state_sharding)
  state = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))['state']
  arrays = compress(state.params, s.sparsifier)
  reports = sp.verify_nm(
      flax.traverse_util.flatten_dict(decompress(arrays), sep='/'),
      s.sparsifier.export_patterns())
  bad = [p for p, r in reports.items() if not r.is_nm]
  if bad:
    raise ValueError(f'Exported kernels are not N:M: {bad}')
  out = out or os.path.join(workdir, f'export_nm_step{step}.npz')
  np.savez(out, **arrays)
  return out


def main(argv):
  del argv
  path = export_run(FLAGS.workdir, step=FLAGS.step, out=FLAGS.out or None)
  size = os.path.getsize(path)
  print(f'Wrote {path} ({size / 2**20:.2f} MiB).')


if __name__ == '__main__':
  FLAGS = flags.FLAGS
  flags.DEFINE_string('workdir', None, 'Workdir of a pgf.train run.',
                      required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_string('out', '', 'Output .npz (default: in the workdir).')
  app.run(main)
