"""Run an exported N:M model with the compressed matmul.

`CompressedModel` holds a pgf.export file's arrays the way inference wants
them: each sparse kernel grouped along its contraction axes becomes an
`NMWeights` in the chosen backend's layout; its layer's bias stays beside
it; every other parameter (and any kernel exported with output-axis groups,
which is decompressed and runs dense) goes into `params`.

The model is pgf's own, unchanged: `flax.linen.intercept_methods` replaces
`__call__` of every `SparseDenseGeneral` (hence `SparseDense`) whose path
has a compressed kernel by `apply(x, weights) + bias`, so the params given
to `model.apply` need no dense copy of those kernels (they hold none). The
interceptor must be active while a function is traced: `classify` and
`greedy_decode` trace their own jitted functions inside it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pgf import export
from pgf.inference import nm
from pgf.sparsity import SparseDenseGeneral


def read_manifest(arrays) -> dict:
  """The export's manifest: 'path/kernel' -> dict(shape, n, m, axes, ...)."""
  return json.loads(bytes(np.asarray(arrays[export.MANIFEST])).decode())


def _interceptor(kernels: dict, biases: dict):
  """Method interceptor computing the compressed layers."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__'
        or not isinstance(module, SparseDenseGeneral)):
      return next_fun(*args, **kwargs)
    path = '/'.join(module.scope.path)
    weights = kernels.get(path)
    if weights is None:
      return next_fun(*args, **kwargs)
    (x,) = args
    n_in = 1 if isinstance(module.axis, int) else len(module.axis)
    k = math.prod(x.shape[x.ndim - n_in:])
    if k != weights.k:
      raise ValueError(f'{path}: inputs {x.shape} contract {k} features; '
                       f'the exported kernel has K = {weights.k}.')
    dtype = module.dtype or jnp.promote_types(x.dtype, module.param_dtype)
    x = x.astype(dtype).reshape(x.shape[:x.ndim - n_in] + (k,))
    y = nm.apply(x, weights, dtype=dtype)
    if module.use_bias:
      y = y + biases[path].astype(dtype)
    return y

  return intercept


class CompressedModel:
  """An exported model whose sparse layers compute with the N:M matmul.

  Attributes:
    model: the (dense-built) Flax model.
    params: every parameter except the compressed layers'.
    kernels: layer path -> NMWeights.
    biases: layer path -> bias of a compressed layer (if it has one).
    dense_paths: kernels exported sparse that run dense (output-axis groups
      or layers the interceptor does not handle, e.g. SparseConv).
  """

  def __init__(self, model: nn.Module, arrays, *, backend: str = 'auto',
               dense_layers: str = r'^$'):
    """Lays an export's arrays out for inference.

    Args:
      model: pgf's model for the run, built without a sparsity plan.
      arrays: the export file's arrays (pgf.export format).
      backend: matmul backend (pgf.inference.nm.BACKENDS).
      dense_layers: regex of kernel paths to keep dense anyway (e.g. a conv
        patch embedding exported sparse; matched with re.search).
    """
    self.model = model
    self.backend = nm.resolve_backend(backend)
    manifest = read_manifest(arrays)
    flat = {k: np.asarray(v) for k, v in arrays.items()
            if k != export.MANIFEST and not k.endswith(('/values',
                                                        '/indices'))}
    self.kernels, self.biases, dense = {}, {}, {}
    for key, meta in manifest.items():
      layer = key.rsplit('/', 1)[0]
      try:
        nm.check_contraction_grouping(key, meta['shape'], meta['axes'])
        if re.search(dense_layers, key):
          raise ValueError(f'{key} matches dense_layers={dense_layers!r}.')
      except ValueError as e:
        logging.info('Running %s dense: %s', key, e)
        dense[key] = meta
        continue
      self.kernels[layer] = nm.NMWeights.prepare(
          arrays[f'{key}/values'], arrays[f'{key}/indices'], m=meta['m'],
          backend=self.backend)
      if f'{layer}/bias' in flat:
        self.biases[layer] = jnp.asarray(flat.pop(f'{layer}/bias'))
    if dense:
      sub = {export.MANIFEST: np.frombuffer(json.dumps(dense).encode(),
                                            np.uint8)}
      for key in dense:
        sub[f'{key}/values'] = arrays[f'{key}/values']
        sub[f'{key}/indices'] = arrays[f'{key}/indices']
      flat.update(flax.traverse_util.flatten_dict(export.decompress(sub),
                                                  sep='/'))
    self.dense_paths = tuple(sorted(dense))
    self.params = jax.tree.map(
        jnp.asarray, flax.traverse_util.unflatten_dict(flat, sep='/'))
    self._jitted = {}

  def apply(self, params, kernels, biases, *args, **kwargs):
    """`model.apply` with the compressed layers (traceable; not jitted)."""
    with nn.intercept_methods(_interceptor(kernels, biases)):
      return self.model.apply({'params': params}, *args, **kwargs)

  def _state(self):
    return self.params, self.kernels, self.biases

  def classify(self, images: jax.Array) -> jax.Array:
    """Float32 logits [B, classes] of images [B, H, W, C] (jitted)."""
    if 'classify' not in self._jitted:
      self._jitted['classify'] = jax.jit(
          lambda p, k, b, x: self.apply(p, k, b, x, train=False))
    return self._jitted['classify'](*self._state(), images)

  def greedy_decode(self, encoder_input_tokens: jax.Array, *,
                    max_length: int, eos_id: int = 1) -> jax.Array:
    """T5 greedy decoding (pgf.models.t5.greedy_decode's semantics): int32
    tokens [B, max_length], the compressed layers in every step."""
    from pgf.models import t5
    key = ('decode', int(max_length), int(eos_id))
    if key not in self._jitted:

      def run(params, kernels, biases, tokens):
        # pgf.models.t5.greedy_decode caches one jitted decoder per (model,
        # length), traced once: a trace made under another interceptor
        # would be reused (with its weights). Its uncached builder, called
        # here, makes a decoder traced now, inside this interceptor, with
        # the weights as arguments (not constants).
        decoder = t5._greedy_fn.__wrapped__(self.model, int(max_length),
                                            int(eos_id))
        with nn.intercept_methods(_interceptor(kernels, biases)):
          return decoder({'params': params}, tokens)

      self._jitted[key] = jax.jit(run)
    return self._jitted[key](*self._state(),
                             jnp.asarray(encoder_input_tokens, jnp.int32))

  def compressed_bytes(self) -> int:
    return sum(a.nbytes for w in self.kernels.values() for a in w.data)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def build_task(config):
  """The run's task (its build_model, its data pipeline)."""
  from pgf import step
  return step.setup(config).task


def build_model(config) -> nn.Module:
  """The run's model without a sparsity plan (plain dense layers)."""
  return build_task(config).build_model(None)


def eval_batches(config, task, *, batch_size: int):
  """The run's evaluation batches (dicts of NumPy arrays)."""
  return task.pipeline.make_eval_iterable(
      config, global_batch_size=batch_size, process_index=0,
      process_count=1)


def find_export(workdir: str) -> str | None:
  """The export of the latest step in `workdir`, if any."""
  def step(path):
    found = re.search(r'export_nm_step(\d+)\.npz$', path)
    return int(found.group(1)) if found else -1
  paths = [p for p in glob.glob(os.path.join(workdir, 'export_nm_step*.npz'))
           if step(p) >= 0]
  return max(paths, key=step) if paths else None


def load_export(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def load(workdir: str, *, export_path: str | None = None,
         backend: str = 'auto') -> tuple[CompressedModel, dict, object]:
  """A run's export as a CompressedModel, the export's arrays, the task.

  Args:
    workdir: the run's workdir (its config.json builds the model).
    export_path: the .npz; default the latest export in the workdir, made
      by pgf.export.export_run if there is none.
    backend: matmul backend.
  """
  config = read_config(workdir)
  path = export_path or find_export(workdir) or export.export_run(workdir)
  arrays = load_export(path)
  logging.info('Loaded %s (%d compressed kernels).', path,
               len(read_manifest(arrays)))
  task = build_task(config)
  return (CompressedModel(task.build_model(None), arrays, backend=backend),
          arrays, task)
