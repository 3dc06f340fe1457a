"""The one place that knows about devices and meshes.

Parameters carry T5X logical axis names (see t5.py); `LOGICAL_AXIS_RULES`
maps them to mesh axes ('data', 'model') as T5X's standard rules do, so the
same model runs data-parallel on one host or model-parallel on a pod by
changing the mesh shape only.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# T5X's standard_logical_axis_rules (1-D parameter partitioning).
LOGICAL_AXIS_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ('batch', 'data'),
    ('vocab', 'model'),
    ('embed', None),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('joined_kv', 'model'),
    ('relpos_buckets', None),
    ('projection', None),
    ('length', None),
)


def make_mesh(model_parallel: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'model') mesh over all devices (of all hosts)."""
  devices = list(devices if devices is not None else jax.devices())
  if len(devices) % model_parallel:
    raise ValueError(f'{len(devices)} devices cannot be split into model_parallel='
                     f'{model_parallel}')
  grid = np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel)
  return Mesh(grid, ('data', 'model'))


def param_shardings(logical_axes: Any, mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a pytree of logical-axis PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_axes, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over 'data', the rest replicated."""
  return NamedSharding(mesh, P('data', *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def onto_mesh(tree: Any, mesh: Mesh) -> Any:
  """Leaves already laid out on `mesh` stay; any other leaf (e.g. a step counter
  XLA committed to one device) is replicated over the mesh."""
  def put(x):
    s = getattr(x, 'sharding', None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return x
    return jax.device_put(x, replicated(mesh))
  return jax.tree.map(put, tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Places this process's slice of a global batch onto the mesh.

  Each process passes the rows it loaded (its contiguous slice of the global
  batch); the result is a global jax.Array split over 'data'.
  """
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(put, batch)
