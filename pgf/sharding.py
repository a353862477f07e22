"""Device mesh, logical axis rules and shardings (one code path: a single
device is a mesh of one)."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax


def make_mesh(config, devices=None) -> Mesh:
  """A ('data', 'model') mesh over all devices (of all processes), laid out
  for the hardware by `jax.make_mesh`."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  model = config.mesh.model
  data = config.mesh.data if config.mesh.data != -1 else n // model
  if data * model != n or n % model:
    hint = ('use mesh.data=-1 or ' if config.mesh.data != -1 else
            f'mesh.model={model} must divide it; use ')
    raise ValueError(
        f'mesh.data={config.mesh.data} x mesh.model={model} does not cover '
        f'the {n} available devices; {hint}a factorisation of {n}.')
  # Auto axes: shardings come from in/out_shardings and Flax's logical
  # constraints, and XLA propagates the rest (not explicit sharding types).
  return jax.make_mesh((data, model), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def logical_rules(config) -> tuple[tuple[str, str | tuple | None], ...]:
  """config.mesh.rules as Flax's logical axis rules (name -> mesh axes)."""
  return tuple((name, axis) for name, axis in config.mesh.rules)


def shardings_of(abstract_boxed, mesh: Mesh, rules):
  """NamedShardings for the unboxed version of a boxed abstract tree."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def optimizer_state_shardings(tx, abstract_opt_state, abstract_params,
                              param_shardings, mesh: Mesh):
  """Optimizer state leaves take their parameter's sharding when they have
  its shape (Adam's moments); others (Adafactor's factored rows/columns,
  counters) are replicated: they are small."""
  rep = replicated(mesh)

  def pick(leaf, param, param_sharding):
    same = getattr(leaf, 'shape', None) == getattr(param, 'shape', ())
    return param_sharding if same else rep

  return optax.tree_map_params(
      tx, pick, abstract_opt_state, abstract_params, param_shardings,
      transform_non_params=lambda _: rep)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles per-process numpy batches into global sharded jax Arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def mesh_context(mesh: Mesh):
  """The mesh in context while tracing, for logical sharding constraints."""
  return jax.set_mesh(mesh)
