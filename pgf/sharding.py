"""Device mesh, logical axis rules and shardings (one code path: a single
device is a mesh of one)."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np


def make_mesh(config, devices=None) -> Mesh:
  """A ('data', 'model') mesh over all devices (of all processes)."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  model = config.mesh.model
  data = config.mesh.data if config.mesh.data != -1 else n // model
  if data * model != n or n % model:
    raise ValueError(
        f'mesh.data={config.mesh.data} x mesh.model={model} does not cover '
        f'the {n} available devices; use mesh.data=-1 or a factorisation of '
        f'{n}.')
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh((data, model), devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, ('data', 'model'))


def logical_rules(config) -> tuple[tuple[str, str | None], ...]:
  return tuple((name, axis) for name, axis in config.mesh.rules)


def logical_to_mesh_axis(config) -> dict[str, str | None]:
  return dict(logical_rules(config))


def shardings_of(abstract_boxed, mesh: Mesh, rules):
  """NamedShardings for the unboxed version of a boxed abstract tree."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles per-process numpy batches into global sharded jax Arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
