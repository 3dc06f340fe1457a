"""The one place that knows about devices and meshes: the `Partitioner`.

Parameters carry T5X logical axis names (see t5.py); logical-axis rules map
them to the mesh axes 'data' and 'model' as T5X's standard rules do, so the
same model runs data-parallel on one host or model-parallel on a pod by
changing the partitioner only. One `Partitioner`, set in gin
(`train_lib.run.partitioner = @partitioning.Partitioner()`), serves training,
export, retrieval and reranking.

Optimizer state is placed by the same rules (see `optimizer_state_shardings`),
and every sharding is derived from abstract shapes, so a train state is laid
out (and its divisibility checked) before anything is allocated.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5dual import cli

MESH_AXES = ('data', 'model')
LogicalAxisRules = tuple[tuple[str, Any], ...]


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Sequence[tuple[str, Any]] = ()
                                ) -> LogicalAxisRules:
  """T5X's standard rules: logical axis name -> mesh axis (or None: replicated).

  1-D parameter partitioning splits the large dimensions (vocab, mlp, heads)
  over 'model'; 2-D also splits 'embed' over 'data' (parameters and optimizer
  state sharded over data-parallel replicas too, as ZeRO-3/FSDP do). 2-D
  activation partitioning additionally splits activations' 'embed' over
  'model'. A name with several rules takes the first mesh axis that the same
  array does not use already (flax's logical_to_mesh semantics).

  Args:
    activation_partitioning_dims: 1 or 2.
    parameter_partitioning_dims: 1 or 2.
    additional_rules: appended after the standard rules.
  """
  dims = (activation_partitioning_dims, parameter_partitioning_dims)
  if dims not in ((1, 1), (1, 2), (2, 1), (2, 2)):
    raise cli.ConfigError(
        f'partitioning: activation_partitioning_dims {activation_partitioning_dims} and '
        f'parameter_partitioning_dims {parameter_partitioning_dims} must each be 1 or 2')
  rules = [('batch', 'data'), ('vocab', 'model'), ('mlp', 'model'), ('heads', 'model'),
           ('kv', None), ('joined_kv', 'model')]
  if activation_partitioning_dims == 2:
    rules.append(('embed', 'model'))
  if parameter_partitioning_dims == 2:
    rules.append(('embed', 'data'))
  if dims == (1, 1):
    rules.append(('embed', None))
  # Names that are always replicated. The axes of one model's own heads are not here:
  # the model declares their rules (model_api.Model.logical_axis_rules).
  rules += [('relpos_buckets', None), ('abspos_buckets', None), ('length', None),
            ('layers', None), ('stack', None), ('mlp_activations', None)]
  return tuple(rules) + tuple(tuple(r) for r in additional_rules)


def with_model_rules(rules: LogicalAxisRules, model: Any) -> LogicalAxisRules:
  """`rules` followed by the rules `model` declares for the axes only it has
  (model_api.Model.logical_axis_rules, e.g. a reranker's ('score', None)).

  The one place where a model's rules meet the partitioner's. A model rule for an
  axis that `rules` already name is left out: the partitioner's rules (standard,
  or given in gin) place the shared axes. An axis no rule names is replicated
  (flax's logical_to_mesh), as a (name, None) rule has it. A model without
  `logical_axis_rules` adds none.
  """
  known = {name for name, _ in rules}
  return tuple(rules) + tuple(tuple(r) for r in getattr(model, 'logical_axis_rules', ())
                              if r[0] not in known)


LOGICAL_AXIS_RULES: LogicalAxisRules = standard_logical_axis_rules(1, 1)


class PartitioningError(cli.ConfigError):
  """A parameter's dimension cannot be split over the mesh axes the rules give it."""


def _tuple_or_none(x):
  return None if x is None else tuple(x)


# Devices of a target the process does not own (a TPU topology description), for
# ahead-of-time compilation: see `target_devices`.
_TARGET_DEVICES: contextvars.ContextVar = contextvars.ContextVar('t5dual_target_devices',
                                                                default=None)


@contextlib.contextmanager
def target_devices(devices: Sequence):
  """Partitioners without explicit devices build their meshes over `devices` inside.

  scripts/plan.py compiles the real train step for a TPU pod from a CPU host so:
  the gin-configured partitioner stays as configured, only its devices change.
  """
  token = _TARGET_DEVICES.set(tuple(devices))
  try:
    yield
  finally:
    _TARGET_DEVICES.reset(token)


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """How arrays are laid out over devices (T5X's PjitPartitioner in spirit).

  The mesh has axes ('data', 'model'). Its shape is either
  (devices / num_partitions, num_partitions) over all devices, or given
  explicitly: `ici_mesh_shape` within a slice (or node), times
  `dcn_mesh_shape` across slices (or nodes) for multi-slice TPU and
  multi-node GPU jobs (mesh_utils.create_hybrid_device_mesh), so that the
  model axis stays on the fast interconnect.

  Attributes:
    num_partitions: model-parallel size (T5X's name); ignored when
      ici_mesh_shape is set.
    ici_mesh_shape: (data, model) within a slice / node.
    dcn_mesh_shape: (data, model) across slices / nodes; needs ici_mesh_shape.
    activation_partitioning_dims, parameter_partitioning_dims: 1 or 2, see
      `standard_logical_axis_rules`.
    logical_axis_rules: replaces the standard rules when set.
    model_rules: the rules of the model's own axes, appended to either (set by
      `for_model`, not meant for gin).
    devices: the devices of the mesh (default: all devices of all processes);
      not meant for gin: export passes this process's devices.
  """
  num_partitions: int = 1
  ici_mesh_shape: Optional[tuple[int, int]] = None
  dcn_mesh_shape: Optional[tuple[int, int]] = None
  activation_partitioning_dims: int = 1
  parameter_partitioning_dims: int = 1
  logical_axis_rules: Optional[LogicalAxisRules] = None
  model_rules: LogicalAxisRules = ()
  devices: Optional[tuple] = None

  def __post_init__(self):
    # gin gives lists; tuples keep the partitioner hashable (it keys jit caches).
    for name in ('ici_mesh_shape', 'dcn_mesh_shape', 'devices'):
      object.__setattr__(self, name, _tuple_or_none(getattr(self, name)))
    if self.logical_axis_rules is not None:
      object.__setattr__(self, 'logical_axis_rules',
                         tuple(tuple(r) for r in self.logical_axis_rules))
    cli.check_int(Partitioner, 'num_partitions', self.num_partitions, minimum=1)
    for name in ('ici_mesh_shape', 'dcn_mesh_shape'):
      shape = getattr(self, name)
      if shape is not None and (len(shape) != len(MESH_AXES) or not all(
          cli.is_int(size) and size >= 1 for size in shape)):
        raise self._error(name, f'must be {len(MESH_AXES)} positive integers '
                          f'{MESH_AXES}, got {shape!r}')
    if self.dcn_mesh_shape is not None and self.ici_mesh_shape is None:
      raise self._error('dcn_mesh_shape', 'needs ici_mesh_shape too')
    self.rules  # checks the partitioning dims

  @staticmethod
  def _error(param: str, message: str) -> cli.ConfigError:
    return cli.ConfigError(f'partitioning.Partitioner.{param}: {message}')

  # ------------------------------------------------------------------ the mesh

  @property
  def rules(self) -> LogicalAxisRules:
    base = self.logical_axis_rules
    if base is None:
      base = standard_logical_axis_rules(self.activation_partitioning_dims,
                                         self.parameter_partitioning_dims)
    return base + self.model_rules

  def for_model(self, model: Any) -> 'Partitioner':
    """This partitioner with the rules `model` declares for its own axes
    (`with_model_rules`): what lays out that model's parameters."""
    base = dataclasses.replace(self, model_rules=())
    rules = with_model_rules(base.rules, model)
    return dataclasses.replace(self, model_rules=rules[len(base.rules):])

  def _devices(self) -> Sequence:
    if self.devices is not None:
      return self.devices
    target = _TARGET_DEVICES.get()
    return target if target is not None else jax.devices()

  @property
  def num_devices(self) -> int:
    if self.devices is None and _TARGET_DEVICES.get() is None:
      return jax.device_count()  # without listing them: the devices may not exist yet
    return len(self._devices())

  @property
  def mesh_shape(self) -> tuple[int, int]:
    """(data, model) sizes, checked against the number of devices; allocates nothing."""
    n = self.num_devices
    if self.ici_mesh_shape is not None:
      shape = tuple(i * d for i, d in zip(self.ici_mesh_shape, self.dcn_mesh_shape or (1, 1)))
      if math.prod(shape) != n:
        what = (f'ici_mesh_shape {self.ici_mesh_shape} x dcn_mesh_shape '
                f'{self.dcn_mesh_shape}' if self.dcn_mesh_shape else
                f'ici_mesh_shape {self.ici_mesh_shape}')
        raise self._error('ici_mesh_shape', f'{what} has {math.prod(shape)} devices, '
                          f'but there are {n}')
      return shape
    if n % self.num_partitions:
      raise self._error('num_partitions', f'{self.num_partitions} does not divide the {n} '
                        'devices')
    return (n // self.num_partitions, self.num_partitions)

  @property
  def data_parallel(self) -> int:
    return self.mesh_shape[0]

  @property
  def model_parallel(self) -> int:
    return self.mesh_shape[1]

  @functools.cached_property
  def mesh(self) -> Mesh:
    """The ('data', 'model') mesh."""
    shape = self.mesh_shape
    devices = list(self._devices())
    if self.dcn_mesh_shape is not None:
      grid = mesh_utils.create_hybrid_device_mesh(
          self.ici_mesh_shape, self.dcn_mesh_shape, devices,
          process_is_granule=_process_is_granule(devices, math.prod(self.dcn_mesh_shape)))
    else:
      # A TPU torus (e.g. 4x4x4) holds a (8, 8) mesh only by splitting a physical
      # axis between 'data' and 'model'; elsewhere this changes nothing.
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)

  @contextlib.contextmanager
  def context(self):
    """The mesh and the logical-axis rules, for tracing code with logical constraints."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def partition(self, fn: Callable, in_shardings=None, out_shardings=None,
                donate_argnums=()) -> Callable:
    """`jax.jit(fn, ...)` whose calls (and `.lower`) run inside `context()`."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums)
    partitioner = self

    class Partitioned:
      def __call__(self, *args, **kwargs):
        with partitioner.context():
          return jitted(*args, **kwargs)

      def lower(self, *args, **kwargs):
        with partitioner.context():
          return jitted.lower(*args, **kwargs)

    return Partitioned()

  # ------------------------------------------------------------------ shardings

  def mesh_axes(self, logical_axes: Any) -> Any:
    """Pytree of logical PartitionSpecs -> pytree of mesh PartitionSpecs."""
    return nn.logical_to_mesh(logical_axes, self.rules)

  def param_shardings(self, logical_axes: Any, shapes: Any = None) -> Any:
    """NamedShardings for a pytree of logical-axis PartitionSpecs.

    With `shapes` (a matching pytree of arrays or ShapeDtypeStructs, e.g.
    `jax.eval_shape(model.init_params, rng)`), every split dimension is first
    checked to divide (`check_divisible`).
    """
    if shapes is not None:
      self.check_divisible(logical_axes, shapes)
    return nn.logical_to_mesh_sharding(logical_axes, self.mesh, self.rules)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over 'data', the rest replicated."""
    return NamedSharding(self.mesh, P('data', *([None] * (ndim - 1))))

  def batch_shardings(self, batch: Any) -> Any:
    """`batch_sharding` of each leaf of a pytree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda x: self.batch_sharding(len(x.shape)), batch)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @functools.cached_property
  def data_layout(self) -> 'DataLayout':
    """Which rows of each global batch this process loads (see `DataLayout`)."""
    return data_layout(self.mesh, jax.process_index())

  def shard_batch(self, batch: dict) -> dict:
    """Places this process's rows of a global batch onto the mesh.

    Each process passes the rows of its data shard (`data_layout`: processes
    whose devices hold the same rows pass the same rows); the result is a
    global jax.Array split over 'data'.
    """
    num_shards = self.data_layout.num_shards
    def put(x):
      x = np.asarray(x)
      sharding = self.batch_sharding(x.ndim)
      if jax.process_count() == 1:
        return jax.device_put(x, sharding)
      global_shape = (x.shape[0] * num_shards,) + x.shape[1:]
      return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return jax.tree.map(put, batch)

  def optimizer_state_shardings(self, opt_state: Any, params: Any, logical_axes: Any) -> Any:
    """NamedShardings for an optax state, derived from the parameters' logical axes.

    The rule: optax states hold pytrees shaped like the parameters (Adam's mu
    and nu, Adafactor's v_row / v_col / v). Every leaf of such a subtree is
    laid out like its parameter when it has the parameter's shape; when it has
    the parameter's shape with one dimension dropped (Adafactor's factored
    moments: v_row drops the largest dimension, v_col the second largest), it
    takes the parameter's spec with that dimension dropped; any other leaf
    (step counts, the (1,) placeholders of unfactored moments) is replicated.

    Args:
      opt_state: the state, or its `jax.eval_shape`.
      params: the parameters, or their `jax.eval_shape`.
      logical_axes: the parameters' logical PartitionSpecs.
    """
    treedef = jax.tree.structure(params)
    specs = jax.tree.leaves(self.mesh_axes(logical_axes), is_leaf=lambda x: isinstance(x, P))
    shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]
    like_params = lambda x: jax.tree.structure(x) == treedef
    parts, outer = jax.tree.flatten(opt_state, is_leaf=like_params)
    out = []
    for part in parts:
      if like_params(part):
        leaves = [NamedSharding(self.mesh, _state_spec(tuple(s.shape), shape, spec))
                  for s, shape, spec in zip(jax.tree.leaves(part), shapes, specs)]
        out.append(jax.tree.unflatten(treedef, leaves))
      else:
        out.append(self.replicated)
    return jax.tree.unflatten(outer, out)

  # ------------------------------------------------------------------ checks

  def check_divisible(self, logical_axes: Any, shapes: Any) -> None:
    """Raises PartitioningError naming the first parameter whose split dimension
    does not divide by its mesh axes' size, with the model-parallel sizes that work."""
    sizes = dict(zip(MESH_AXES, self.mesh_shape))
    problem = _first_indivisible(self.mesh_axes(logical_axes), shapes, sizes)
    if problem is None:
      return
    name, dim, axes, size, parts = problem
    n = self.num_devices
    working = [m for m in range(1, n + 1) if n % m == 0 and _first_indivisible(
        self.mesh_axes(logical_axes), shapes, {'data': n // m, 'model': m}) is None]
    raise PartitioningError(
        f'parameter {name}: dimension {dim} of size {size} cannot be split over mesh axis '
        f'{"x".join(axes)} of size {parts} (mesh data {sizes["data"]} x model '
        f'{sizes["model"]}); model-parallel sizes that work with {n} devices: '
        f'{", ".join(map(str, working)) or "none"}')


def _process_is_granule(devices: Sequence, granules: int) -> bool:
  """Whether the dcn axis runs across processes rather than across TPU slices.

  TPU slices are the granules of a multi-slice job; elsewhere (GPU nodes, CPU
  processes) a process is. Other platforms' devices may carry a `slice_index`
  too (all 0), so count the slices rather than look for the attribute.
  """
  slices = {getattr(d, 'slice_index', None) for d in devices}
  return None in slices or len(slices) != granules


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """How a global batch is split into the slices that processes load (T5X's DataLayout).

  A pod is not one process per data shard: on a v4-128 with model-parallel 8,
  each host has 4 chips, so every data shard (a row of the mesh) spans two
  hosts, and both must load the same rows; with model-parallel 1 each host's
  4 chips hold 4 shards, one contiguous slice of rows. The slices follow from
  the data-axis indices of each process's devices in the mesh: the global
  batch is cut into `num_shards` equal slices, and this process loads slice
  `shard_index`. Batchers are pure functions of (seed, step, shard), so the
  processes of one shard load identical rows without talking to each other.

  Attributes:
    num_shards: slices of the global batch (data-parallel size / data rows of
      the mesh one process holds).
    shard_index: the slice this process loads.
  """
  num_shards: int = 1
  shard_index: int = 0

  def rows(self, batch_size: int) -> range:
    """The rows of a global batch of `batch_size` that this process loads."""
    per_shard = batch_size // self.num_shards
    return range(self.shard_index * per_shard, (self.shard_index + 1) * per_shard)


def data_layout(mesh: Mesh, process_index: int) -> DataLayout:
  """The `DataLayout` of process `process_index` on `mesh` ('data' its first axis).

  Raises ConfigError (naming partitioning.Partitioner) for meshes no batch can
  follow: a process whose devices hold non-contiguous data rows, or processes
  holding different numbers of them (a mesh laid over the processes unevenly).
  """
  rows_of: dict[int, set] = {}
  for (row, _), device in np.ndenumerate(mesh.devices):
    rows_of.setdefault(device.process_index, set()).add(row)
  if process_index not in rows_of:
    raise cli.ConfigError(f'partitioning.Partitioner: process {process_index} holds no '
                          f'device of the mesh {dict(mesh.shape)}')
  counts = {len(rows) for rows in rows_of.values()}
  for process, rows in sorted(rows_of.items()):
    first = min(rows)
    if len(counts) > 1 or rows != set(range(first, first + len(rows))) or first % len(rows):
      shown = {p: sorted(r) for p, r in sorted(rows_of.items())}
      raise cli.ConfigError(
          f'partitioning.Partitioner: the mesh {dict(mesh.shape)} gives processes uneven or '
          f'non-contiguous data rows ({shown}); choose num_partitions / ici_mesh_shape so '
          'that each process holds whole, equal blocks of data rows')
  per_process = counts.pop()
  mine = min(rows_of[process_index])
  return DataLayout(mesh.shape['data'] // per_process, mine // per_process)


def _state_spec(state_shape: tuple, param_shape: tuple, param_spec: P) -> P:
  """The mesh spec of one optimizer-state leaf of a parameter (see optimizer_state_shardings)."""
  spec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
  if state_shape == param_shape:
    return P(*spec)
  if len(state_shape) == len(param_shape) - 1:
    candidates = {spec[:i] + spec[i + 1:] for i in range(len(param_shape))
                  if param_shape[:i] + param_shape[i + 1:] == state_shape}
    if len(candidates) == 1:  # equal neighbouring sizes may make the dropped dim ambiguous
      return P(*candidates.pop())
  return P()


def _first_indivisible(mesh_specs: Any, shapes: Any, sizes: dict):
  """(parameter path, dim, mesh axes, size, parts) of the first split that does not divide."""
  flat_specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  for (path, leaf), spec in zip(flat_shapes, flat_specs):
    for dim, (size, axes) in enumerate(zip(leaf.shape, spec)):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      parts = math.prod(sizes[a] for a in axes)
      if size % parts:
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        return name, dim, axes, size, parts
  return None


def place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """`value` (a host array, or a jax.Array) as a jax.Array in `sharding`.

  On a mesh that spans processes jax.device_put cannot take a host array
  (it would be a cross-host transfer): each process builds its own devices'
  slices from its copy instead, so no device ever holds more than its shard.
  """
  if sharding.is_fully_addressable or (isinstance(value, jax.Array) and
                                       not value.is_fully_addressable):
    return jax.device_put(value, sharding)  # within a process, or between global layouts
  value = np.asarray(value)  # a host array, or one on this process's devices only
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# Thin helpers for code that holds a bare Mesh (interop's checkpoint readers).

def param_shardings(logical_axes: Any, mesh: Mesh, model: Any = None,
                    rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a pytree of logical-axis PartitionSpecs on `mesh`, by `rules`
  and the rules of `model`'s own axes (`with_model_rules`) when a model is given."""
  if model is not None:
    rules = with_model_rules(rules, model)
  return nn.logical_to_mesh_sharding(logical_axes, mesh, rules)


def local_data_parallel(devices: Optional[Sequence[jax.Device]] = None) -> Partitioner:
  """A data-parallel partitioner over `devices` (default: this process's devices):
  what export, retrieval and reranking use unless given one."""
  return Partitioner(devices=tuple(devices or jax.local_devices()))
