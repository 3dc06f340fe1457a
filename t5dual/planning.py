"""Ahead-of-time plans: compile the real train and encode steps for a target one does not own.

`plan_train_step` lowers and compiles `trainer.build_train_step` (the step
training runs) for the task's batch spec (data/tasks.py: the batch the trainer
compiles for), and the dual encoder's encode step, with abstract shapes only
(jax.ShapeDtypeStruct), for

  TPU topologies  'v4:4x4x4', 'v5e:16x16', 'v5p:8x8x8', 'v6e:16x16' through
                  jax.experimental.topologies.get_topology_desc, which works on
                  a CPU host once libtpu is installed (setup.py's `tpu` extra);
  CPU devices     'cpu:N' (N host devices; the process must start with
                  XLA_FLAGS=--xla_force_host_platform_device_count>=N).

Nothing is allocated on any device. The report gives, per device, the bytes of
parameters, optimizer state, gradients and the batch in closed form (each
array's shard shape under its sharding) and a closed-form activation estimate,
beside XLA's compiled memory analysis (arguments, outputs, temporaries), the
model FLOPs in closed form beside those of XLA's cost model (which counts the
body of a scanned loop once: with scanned layers or microbatches it is far
below the real count), and whether the step fits the target's HBM.

`search` is the planner's policy for a step that does not fit (scripts/plan.py
--search): which settings to try next, cheapest first.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5dual import cli, model_api, partitioning, t5, trainer

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """What a device of a target generation has: HBM per JAX device, peak bf16 FLOP/s."""

  platform: str
  hbm_bytes: Optional[int]
  peak_flops: Optional[float]
  chip_config: Optional[str] = None  # get_topology_desc's chip_config_name


# Per JAX device. v4 and v5p run megacore (one device per chip, both cores).
ACCELERATORS = {
    'v4': Accelerator('tpu', 32 * GiB, 275e12, 'megacore'),
    'v5e': Accelerator('tpu', 16 * GiB, 197e12),
    'v5p': Accelerator('tpu', 95 * GiB, 459e12, 'megacore'),
    'v6e': Accelerator('tpu', 32 * GiB, 918e12),
    'cpu': Accelerator('cpu', None, None),
}
_TOPOLOGY = re.compile(r'^(?P<gen>[a-z0-9]+):(?P<shape>\d+(?:x\d+)*)$')


class PlanError(cli.UserError):
  """A target or setting the planner cannot use."""


def target_devices(topology: str) -> tuple[list, Accelerator]:
  """(devices, accelerator) of a topology string such as 'v4:4x4x4' or 'cpu:8'."""
  m = _TOPOLOGY.match(topology)
  if not m or m['gen'] not in ACCELERATORS:
    raise PlanError(f'--topology {topology!r}: expected GEN:AxBxC with GEN one of '
                    f'{sorted(ACCELERATORS)} (e.g. v4:4x4x4, v5e:16x16, cpu:8)')
  acc = ACCELERATORS[m['gen']]
  if acc.platform == 'cpu':
    count = math.prod(int(s) for s in m['shape'].split('x'))
    devices = jax.devices('cpu')
    if len(devices) < count:
      raise PlanError(f'--topology {topology}: this process has {len(devices)} CPU devices; '
                      f'start it with XLA_FLAGS=--xla_force_host_platform_device_count={count}')
    return devices[:count], acc
  try:
    from jax.experimental import topologies
    kwargs = {'chip_config_name': acc.chip_config} if acc.chip_config else {}
    desc = topologies.get_topology_desc(topology, 'tpu', **kwargs)
  except Exception as e:  # libtpu missing or the topology unknown to it
    first = (str(e).splitlines() or [''])[0]
    raise PlanError(f'--topology {topology}: no TPU topology description ({first}); install '
                    "libtpu with pip install -e '.[tpu]'") from e
  return list(desc.devices), acc


# --------------------------------------------------------------------------- shapes

def _sequences(model, spec: dict) -> list[tuple[int, int]]:
  """(sequences, tokens each) that the encoders run over in a batch of `spec`."""
  return [(math.prod(spec[k].shape[:-1]), spec[k].shape[-1])
          for k in model.token_features if k in spec]


def shard_bytes(tree: Any, shardings: Any = None) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings` (or their own)."""
  leaves = jax.tree.leaves(tree)
  shs = jax.tree.leaves(shardings) if shardings is not None else [x.sharding for x in leaves]
  return sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, sh in zip(leaves, shs))


def _t5_configs(model) -> list[t5.T5Config]:
  """The T5Config of a model built around one (model_api.T5Model); none for others."""
  return [model.t5_config] if isinstance(model, model_api.T5Model) else []


def activation_bytes(model, spec: dict, model_parallel: int) -> int:
  """Closed-form estimate of the activations one device keeps for the backward pass
  of the rows of `spec` (a task's batch spec of one device's rows of a microbatch).

  Per sequence of L tokens and layer: the layer input (L x d, activation dtype)
  is always kept; without remat ('none') also its attention logits and
  probabilities (heads/mp x L x L, float32), q, k, v, the attention output
  (4 x L x heads/mp x head_dim) and the MLP's gated hidden units (3 x L x
  mlp/mp). Under 'full' remat one layer's working set is live at a time in the
  backward pass. Other policies keep some of these; they are counted as 'none'
  (an upper bound). Decoder steps of a reranker (one token) are neglected.
  """
  cfgs = _t5_configs(model)
  if not cfgs:
    return 0
  cfg = cfgs[0]
  act = np.dtype(cfg.dtype).itemsize
  heads = max(1, cfg.num_heads // model_parallel)
  mlp = cfg.mlp_dim // model_parallel
  seqs = _sequences(model, spec)
  total = 0
  for count, length in seqs:
    kept = count * length * cfg.emb_dim * act
    working = count * (2 * heads * length * length * 4
                       + length * (4 * heads * cfg.head_dim + 3 * mlp) * act)
    if cfg.remat == 'full':
      total += cfg.num_layers * kept + working
    else:
      total += cfg.num_layers * (kept + working)
  return total


# --------------------------------------------------------------------------- FLOPs

def encoder_flops_per_token(cfg: t5.T5Config, length: int) -> float:
  """Forward FLOPs per token of a T5 encoder over `length`-token sequences.

  The dense matmuls (q, k, v, o and the MLP's matrices: two for ReLU, three
  for gated-GELU), 2 FLOPs per multiply-add, plus QK^T and AV. The count of
  ../shared/bench/peer_torch_t5.py, so that MFUs compare.
  """
  mlp_matrices = len(cfg.mlp_activations) + 1
  dense = 2 * (4 * cfg.emb_dim * cfg.num_heads * cfg.head_dim
               + mlp_matrices * cfg.emb_dim * cfg.mlp_dim)
  attention = 2 * 2 * length * cfg.num_heads * cfg.head_dim
  return cfg.num_layers * (dense + attention)


def train_model_flops(model, spec: dict) -> float:
  """Model FLOPs of one train step over the global batch `spec`: 3 x the encoders' forward.

  As in MFU's convention, recomputation (remat, GradCache's first pass) is not
  counted: it is the hardware's extra work, not the model's. The projection
  head, the loss and a reranker's single decoder step are left out (under 1% of
  the total at the benchmark shapes), as the peer leaves them out.
  """
  cfgs = _t5_configs(model)
  if not cfgs:
    return 0.0
  cfg = cfgs[0]
  return 3 * sum(count * length * encoder_flops_per_token(cfg, length)
                 for count, length in _sequences(model, spec))


# --------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class StepPlan:
  """What one compiled step needs per device (bytes) and costs (FLOPs)."""

  name: str
  batch: int
  params: int = 0
  opt_state: int = 0
  grads: int = 0
  batch_bytes: int = 0
  activations: int = 0
  compiled_arguments: Optional[int] = None
  compiled_outputs: Optional[int] = None
  compiled_temp: Optional[int] = None
  compiled_alias: Optional[int] = None
  flops: Optional[float] = None  # XLA's cost model, per device
  model_flops: float = 0.0  # train_model_flops / devices
  compile_s: float = 0.0
  error: Optional[str] = None
  grad_strategy: str = 'full'
  num_microbatches: int = 1

  @property
  def gradients(self) -> str:
    """How the step gets its gradients, e.g. 'full' or 'grad_cache x4'."""
    if self.grad_strategy == 'full':
      return 'full'
    return f'{self.grad_strategy} x{self.num_microbatches}'

  @property
  def closed_form_total(self) -> int:
    return self.params + self.opt_state + self.grads + self.batch_bytes + self.activations

  @property
  def compiled_peak(self) -> Optional[int]:
    """Arguments + outputs - donated (aliased) + temporaries: XLA's live bytes at peak."""
    if self.compiled_temp is None:
      return None
    return (self.compiled_arguments + self.compiled_outputs - (self.compiled_alias or 0)
            + self.compiled_temp)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {'compiled_arguments': int(m.argument_size_in_bytes),
          'compiled_outputs': int(m.output_size_in_bytes),
          'compiled_temp': int(m.temp_size_in_bytes),
          'compiled_alias': int(m.alias_size_in_bytes)}


def _flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends have no cost model
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def plan_train_step(model, task, optimizer, partitioner: partitioning.Partitioner,
                    batch_size: int, feature_lengths: dict, compile: bool = True,
                    grad_strategy: str = 'full', num_microbatches: int = 1) -> StepPlan:
  """Closed-form bytes, and (compile=True) XLA's compiled memory and FLOPs, of one train step.

  The batch is the task's (`task.batch_spec`, data/tasks.py), the one the trainer
  compiles its step for: hard negatives and teacher scores included.

  With grad_strategy 'grad_cache' or 'accumulate' (t5dual/gradients.py) only one
  microbatch's activations are alive at a time, which is what the estimate counts.
  """
  plan = StepPlan('train', batch_size, grad_strategy=grad_strategy,
                  num_microbatches=num_microbatches)
  layout = trainer.state_layout(model, optimizer, partitioner)
  plan.params = shard_bytes(layout.params)
  plan.opt_state = shard_bytes(layout.opt_state)
  plan.grads = plan.params  # float32 gradients laid out like the parameters
  spec = task.batch_spec(batch_size, feature_lengths)
  batch_sh = partitioner.batch_shardings(spec)
  plan.batch_bytes = shard_bytes(spec, batch_sh)
  rows = batch_size // partitioner.data_parallel // num_microbatches
  plan.activations = activation_bytes(model, task.batch_spec(rows, feature_lengths),
                                      partitioner.model_parallel)
  plan.model_flops = train_model_flops(model, spec) / partitioner.num_devices
  if not compile:
    return plan
  step, layout = trainer.build_train_step(model, optimizer, partitioner, spec, layout=layout,
                                          grad_strategy=grad_strategy,
                                          num_microbatches=num_microbatches)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  t0 = time.time()
  with partitioner.context():
    compiled = step.lower(layout.params, layout.opt_state, scalar, spec, scalar).compile()
  plan.compile_s = time.time() - t0
  for k, v in _memory(compiled).items():
    setattr(plan, k, v)
  plan.flops = _flops(compiled)
  return plan


def plan_encode_step(model, partitioner: partitioning.Partitioner, batch_size: int,
                     length: int, side: str = 'document') -> StepPlan:
  """The dual encoder's encode step (export) for [batch_size, length] ids, compiled."""
  from t5dual import encoding
  from t5dual.sides import Side
  plan = StepPlan(f'encode {side}', batch_size)
  fn, param_sh = encoding._jitted_encode(model, Side.parse(side), partitioner)
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, param_sh)
  plan.params = shard_bytes(params)
  ids = jax.ShapeDtypeStruct((batch_size, length), jnp.int32,
                             sharding=partitioner.batch_sharding(2))
  plan.batch_bytes = shard_bytes(ids)
  plan.model_flops = (batch_size * length * encoder_flops_per_token(model.t5_config, length)
                      / partitioner.num_devices)
  t0 = time.time()
  with partitioner.context():
    compiled = fn.lower(params, ids).compile()
  plan.compile_s = time.time() - t0
  for k, v in _memory(compiled).items():
    setattr(plan, k, v)
  plan.flops = _flops(compiled)
  return plan


def fits(plan: StepPlan, hbm_bytes: Optional[int]) -> Optional[bool]:
  """Whether the compiled step (or, uncompiled, the closed form) fits `hbm_bytes`.

  A compile the target's compiler refused for memory (RESOURCE_EXHAUSTED) does not.
  """
  if plan.error is not None:
    return False if 'RESOURCE_EXHAUSTED' in plan.error else None
  if hbm_bytes is None:
    return None
  need = plan.compiled_peak if plan.compiled_peak is not None else plan.closed_form_total
  return need <= hbm_bytes


def smaller_batches(batch_size: int, data_parallel: int) -> Sequence[int]:
  """Batch sizes to try when one does not fit: halvings that still split over 'data'."""
  out, b = [], batch_size // 2
  while b >= data_parallel and b % data_parallel == 0:
    out.append(b)
    b //= 2
  return out


def wider_meshes(partitioner: partitioning.Partitioner, model, batch_size: int,
                 limit: int = 2) -> list[partitioning.Partitioner]:
  """Up to `limit` partitioners on the same devices with 2x, 4x, ... the model axis.

  Only meshes whose data axis still divides the batch and over which every
  parameter splits (partitioner.check_divisible) are offered; the model axis
  grows inside a slice (ici_mesh_shape), never across slices.
  """
  data, model_size = partitioner.ici_mesh_shape or partitioner.mesh_shape
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  out, k = [], 2
  while len(out) < limit and data % k == 0:
    ici = (data // k, model_size * k)
    wider = dataclasses.replace(partitioner, ici_mesh_shape=ici, num_partitions=1)
    k *= 2
    if batch_size % wider.data_parallel:
      continue
    try:
      wider.for_model(model).check_divisible(model.logical_axes(), shapes)
    except partitioning.PartitioningError:
      continue
    out.append(wider)
  return out


def more_microbatches(batch_size: int, data_parallel: int, num_microbatches: int
                      ) -> Sequence[int]:
  """Microbatch counts above `num_microbatches` to try, each splitting every device's rows."""
  per_device = batch_size // data_parallel
  return [m for m in (2, 4, 8, 16, 32, 64) if m > num_microbatches and per_device % m == 0]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """Settings of a train step the search tries: the model (its remat), the mesh, the
  global batch and how the gradients are computed."""

  model: Any
  partitioner: partitioning.Partitioner
  batch_size: int
  grad_strategy: str = 'full'
  num_microbatches: int = 1


def search(start: Candidate, plan: Callable[[Candidate], StepPlan], hbm_bytes: Optional[int],
           max_meshes: int = 2, chunked_strategy: str = 'grad_cache'
           ) -> tuple[Candidate, list[tuple[Candidate, StepPlan]]]:
  """Plans `start`, then, while the step does not fit `hbm_bytes`, the next candidate.

  Cheapest first, keeping the batch (every in-batch negative) as long as possible:
  'full' remat; then meshes with 2x, 4x, ... the model-parallel size on the same
  devices (up to `max_meshes`; a mesh whose step fails to compile for another reason
  than memory is left again, the search going on from the mesh before); then more
  microbatches with `chunked_strategy` ('grad_cache' for contrastive models,
  'accumulate' otherwise: the same gradient,
  fewer activations alive); then halved batches, with as many microbatches as each
  still splits into. Stops at the first that fits (or whose fit is unknown).

  Args:
    plan: plans a candidate (plan_train_step, or fake memory figures in tests);
      a compile that fails is a StepPlan with an error, not an exception.
  Returns:
    (where the search ended: the last candidate tried, or the mesh before one that did
    not compile; every (candidate, plan) tried, in order).
  """
  tried = []

  def one(candidate):
    tried.append((candidate, plan(candidate)))
    return tried[-1][1]

  def fits_not(p):
    return fits(p, hbm_bytes) is False

  c = start
  p = one(c)
  if not fits_not(p):
    return c, tried
  if isinstance(c.model, model_api.T5Model) and c.model.t5_config.remat != 'full':
    c = dataclasses.replace(c, model=c.model.with_t5(remat='full'))
    p = one(c)
  for wider in wider_meshes(c.partitioner, c.model, c.batch_size, max_meshes):
    if not fits_not(p):
      break
    previous = c, p
    c = dataclasses.replace(c, partitioner=wider)
    p = one(c)
    if p.error and 'RESOURCE_EXHAUSTED' not in p.error:
      c, p = previous  # did not compile for another reason: go on from where it did
  for m in more_microbatches(c.batch_size, c.partitioner.data_parallel, c.num_microbatches):
    if not fits_not(p):
      break
    c = dataclasses.replace(c, grad_strategy=chunked_strategy, num_microbatches=m)
    p = one(c)
  for b in smaller_batches(c.batch_size, c.partitioner.data_parallel):
    if not fits_not(p):
      break
    per_device, m = b // c.partitioner.data_parallel, c.num_microbatches
    while m > 1 and per_device % m:
      m //= 2
    c = dataclasses.replace(c, batch_size=b, num_microbatches=m,
                            grad_strategy='full' if m == 1 else c.grad_strategy)
    p = one(c)
  return c, tried


def gib(n: Optional[float]) -> str:
  return '-' if n is None else f'{n / GiB:.2f}'
