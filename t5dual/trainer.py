"""The training loop, shared by every model that implements `model_api.Model`
(dual encoders and rerankers).

One `jax.jit`-compiled step over the partitioner's ('data', 'model') mesh
(`build_train_step`): parameters and optimizer state are placed by their
logical axis names, the batch is split over 'data'. The train state is laid
out from abstract shapes first, then created (or restored) straight into its
shardings. Checkpoints are
saved with orbax every `save_every` steps and at the last step, and the run
resumes from the latest one; since batches are a pure function of the step
(data/pipeline.py), a resumed run continues with exactly the same data.

One process writes a model directory at a time (checkpoints.exclusive_writer),
and no checkpoint is saved from a step whose loss, gradients or parameters are
not finite (see `guarded_train_step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5dual import checkpoints, cli, fileio, gradients, model_api, partitioning, preemption, prefetch

log = logging.getLogger(__name__)


# ParameterError lives in cli beside the other user errors; this name stays for
# the modules that import it from here.
ParameterError = cli.ParameterError


def check_positive_int(owner: Callable, param: str, value: Any) -> None:
  cli.check_int(owner, param, value, minimum=1)


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """Loop settings, and how each step gets its gradients.

  Attributes:
    grad_strategy: 'full' (the whole batch at once), 'grad_cache' (contrastive
      models: exactly the full-batch gradient with one chunk's activations in
      memory) or 'accumulate' (rerankers: the mean over microbatches); see
      t5dual/gradients.py.
    num_microbatches: chunks per batch for 'grad_cache' and 'accumulate' (T5X's
      name); the global batch must be a multiple of num_microbatches x the
      data-parallel size. 1 with 'full'.
    prefetch: batches made and copied to the devices ahead of the step, on a
      background thread (t5dual/prefetch.py); 0 makes each when it is needed.
  """
  total_steps: int = 1000
  log_every: int = 50
  save_every: int = 1000
  keep_checkpoints: int = 3
  seed: int = 0
  progress_bar: bool = True
  tensorboard: bool = True
  grad_strategy: str = 'full'
  num_microbatches: int = 1
  prefetch: int = 2

  def __post_init__(self):
    for name in ('total_steps', 'log_every', 'save_every', 'keep_checkpoints',
                 'num_microbatches'):
      check_positive_int(TrainerConfig, name, getattr(self, name))
    cli.check_int(TrainerConfig, 'prefetch', self.prefetch, minimum=0)
    if self.grad_strategy not in gradients.STRATEGIES:
      raise ParameterError(TrainerConfig, 'grad_strategy',
                           f'must be one of {gradients.STRATEGIES}, got {self.grad_strategy!r}')


def check_grad_strategy(model: model_api.Model, grad_strategy: str, num_microbatches: int,
                        batch_size: Optional[int] = None, data_parallel: int = 1) -> None:
  """Raises ParameterError (naming TrainerConfig.grad_strategy) when the strategy cannot
  train `model` on a global batch of `batch_size` over `data_parallel` devices."""
  problem = gradients.incompatibility(model, grad_strategy, num_microbatches, batch_size,
                                      data_parallel)
  if problem:
    param = 'num_microbatches' if 'microbatches on each' in problem else 'grad_strategy'
    raise ParameterError(TrainerConfig, param, problem)


class NonFiniteLossError(cli.UserError, FloatingPointError):
  """A step produced a non-finite loss, gradient or parameter; nothing of it was saved."""


def train_step(model, optimizer, seed, params, opt_state, batch, step, loss_and_grad=None):
  """One optimizer step; dropout is keyed by (seed, step). Returns (params, opt_state, metrics).

  `loss_and_grad` is a gradients.py strategy (default: the full batch at once).
  """
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  loss_and_grad = loss_and_grad or gradients.full_batch(model)
  (_, metrics), grads = loss_and_grad(params, batch, dropout_rng)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics['grad_norm'] = optax.tree.norm(grads)
  return params, opt_state, metrics


def guarded_train_step(model, optimizer, seed, params, opt_state, bad_step, batch, step,
                       loss_and_grad=None):
  """`train_step` that never lets a non-finite value into the parameters.

  Why on device: checking the loss on the host every step would block
  asynchronous dispatch (a device-to-host sync per step). Instead the step
  itself checks that the loss, the gradients (through their norm, which is
  non-finite if any gradient is) and the updated parameters are finite; if not,
  it keeps the previous params and optimizer state and records the step in the
  sticky flag `bad_step` (0 while all is well), after which every later step
  also keeps them. The host reads that one scalar only where it syncs anyway:
  at log steps and before each save, so no checkpoint ever holds a step that
  failed the check, and the error names the first bad step. The price is one
  elementwise select and one reduction over the parameters per step, small
  next to the forward and backward passes.

  Args:
    bad_step: int32 scalar, 0 or the first (1-based) step that failed the check.
    step: int32 scalar, the 0-based index of this step.
  Returns:
    (params, opt_state, bad_step, metrics).
  """
  new_params, new_opt_state, metrics = train_step(model, optimizer, seed, params, opt_state,
                                                  batch, step, loss_and_grad)
  reported = set(metrics) - {'grad_norm'}
  if reported != set(model.metric_names) or not set(model.progress_metrics) <= reported:
    # Checked once, when the step is traced.
    raise TypeError(f'{type(model).__name__}.loss_fn reports metrics {sorted(reported)} '
                    f'but declares metric_names {sorted(model.metric_names)} and '
                    f'progress_metrics {sorted(model.progress_metrics)}')
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  for leaf in jax.tree.leaves(new_params):
    finite &= jnp.all(jnp.isfinite(leaf))
  ok = finite & (bad_step == 0)
  keep = lambda new, old: jnp.where(ok, new, old)
  params = jax.tree.map(keep, new_params, params)
  opt_state = jax.tree.map(keep, new_opt_state, opt_state)
  bad_step = jnp.where(ok | (bad_step > 0), bad_step, step + 1).astype(jnp.int32)
  return params, opt_state, bad_step, metrics


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """The train state's abstract shapes and shardings, known before anything is allocated.

  Attributes:
    params, opt_state: pytrees of jax.ShapeDtypeStruct carrying their sharding
      (what checkpoints.restore reads into).
    param_shardings, opt_shardings: the NamedShardings alone.
  """
  params: Any
  opt_state: Any
  param_shardings: Any
  opt_shardings: Any


def state_layout(model: model_api.Model, optimizer: optax.GradientTransformation,
                 partitioner: partitioning.Partitioner) -> StateLayout:
  """Shardings of params (from their logical axes) and of the optimizer state (derived
  from them, see Partitioner.optimizer_state_shardings), from `jax.eval_shape` only.

  Raises:
    partitioning.PartitioningError: a parameter does not split over the mesh.
  """
  partitioner = partitioner.for_model(model)
  logical = model.logical_axes()
  params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  param_sh = partitioner.param_shardings(logical, params)
  opt_state = jax.eval_shape(optimizer.init, params)
  opt_sh = partitioner.optimizer_state_shardings(opt_state, params, logical)
  placed = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return StateLayout(jax.tree.map(placed, params, param_sh),
                     jax.tree.map(placed, opt_state, opt_sh), param_sh, opt_sh)


def init_train_state(model: model_api.Model, optimizer: optax.GradientTransformation,
                     partitioner: partitioning.Partitioner, layout: StateLayout, seed: int,
                     initial_params: Optional[Any] = None) -> tuple[Any, Any]:
  """(params, opt_state) created on device already in `layout`'s shardings.

  A random init runs as one jitted function whose outputs are sharded, so no
  device ever holds more than its shard; `initial_params` (host or device
  arrays) are placed onto their shardings and the optimizer state is built
  from them the same way.
  """
  if initial_params is None:
    def init(rng):
      params = model.init_params(rng)
      return params, optimizer.init(params)
    return partitioner.partition(init, out_shardings=(layout.param_shardings,
                                                      layout.opt_shardings))(
        jax.random.PRNGKey(seed))
  params = jax.tree.map(partitioning.place, initial_params, layout.param_shardings)
  opt_state = partitioner.partition(optimizer.init, in_shardings=(layout.param_shardings,),
                                    out_shardings=layout.opt_shardings)(params)
  return params, opt_state


def build_train_step(model: model_api.Model, optimizer: optax.GradientTransformation,
                     partitioner: partitioning.Partitioner, batch_spec: Any, seed: int = 0,
                     layout: Optional[StateLayout] = None, grad_strategy: str = 'full',
                     num_microbatches: int = 1) -> tuple[Callable, StateLayout]:
  """The jitted `guarded_train_step` with explicit in/out shardings and donation.

  Args:
    batch_spec: the global batch, a pytree of arrays or jax.ShapeDtypeStructs
      (leading dimension: the global batch size, split over 'data').
    seed: dropout seed.
    layout: the state layout, computed here when not given.
    grad_strategy, num_microbatches: how the gradients are computed (see
      TrainerConfig and gradients.py).
  Returns:
    (step, layout): step(params, opt_state, bad_step, batch, step_index) ->
    (params, opt_state, bad_step, metrics); params and opt_state are donated.
  Raises:
    partitioning.PartitioningError: a parameter or the batch does not split
      over the mesh.
    ParameterError: grad_strategy cannot train the model on this batch.
  """
  layout = layout or state_layout(model, optimizer, partitioner)
  for leaf in jax.tree.leaves(batch_spec):
    if leaf.shape[0] % partitioner.data_parallel:
      raise partitioning.PartitioningError(
          f'global batch size {leaf.shape[0]} is not divisible by the data-parallel size '
          f'{partitioner.data_parallel}')
  batch_size = jax.tree.leaves(batch_spec)[0].shape[0]
  check_grad_strategy(model, grad_strategy, num_microbatches, batch_size,
                      partitioner.data_parallel)
  loss_and_grad = gradients.loss_and_grad_fn(model, grad_strategy, num_microbatches)
  batch_sh = partitioner.batch_shardings(batch_spec)
  repl = partitioner.replicated
  step = partitioner.partition(
      functools.partial(guarded_train_step, model, optimizer, seed,
                        loss_and_grad=loss_and_grad),
      in_shardings=(layout.param_shardings, layout.opt_shardings, repl, batch_sh, repl),
      out_shardings=(layout.param_shardings, layout.opt_shardings, repl, repl),
      donate_argnums=(0, 1))
  return step, layout


class _MetricsWriter:
  """metrics.jsonl (+ TensorBoard) on process 0."""

  def __init__(self, model_dir: str, tensorboard: bool):
    self.active = jax.process_index() == 0
    self.path = os.path.join(model_dir, 'metrics.jsonl')
    self.tb = None
    if self.active and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(model_dir, 'tensorboard'))
      except ImportError:
        log.warning('tensorboardX is not installed: no TensorBoard summaries')

  def drop_after(self, step: int) -> None:
    """Removes the lines past `step`, the checkpoint a run resumes from.

    A run that stopped after its last checkpoint logged steps that the resumed
    run logs again; without this they would appear twice. A line cut short by
    a kill is dropped too. The file is replaced atomically.
    """
    if not self.active or not os.path.exists(self.path):
      return
    kept, dropped = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          keep = json.loads(line)['step'] <= step
        except (ValueError, KeyError, TypeError):
          keep = False
        if keep:
          kept.append(line)
        else:
          dropped += 1
    if dropped:
      with fileio.atomic_write(self.path) as f:
        f.writelines(kept)
      log.info('dropped %d lines past step %d from %s', dropped, step, self.path)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    if self.tb:
      for k, v in metrics.items():
        self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self):
    if self.tb:
      self.tb.close()


def train(model: model_api.Model, batcher: model_api.Batcher,
          optimizer: optax.GradientTransformation, model_dir: str,
          config: TrainerConfig = TrainerConfig(),
          schedule: Optional[optax.Schedule] = None,
          model_description: Optional[dict] = None,
          initial_params: Optional[Any] = None,
          run_config: Optional[Callable[[], str]] = None,
          partitioner: Optional[partitioning.Partitioner] = None, *,
          batch_spec: dict) -> dict:
  """Trains `model` on `batcher.batch(step)` until `config.total_steps`.

  The step is compiled for `batch_spec` before the loop (the state is restored or
  initialised first, so a step that does not compile fails before any data is
  read); each batch must then equal the spec (`check_batch`).

  Args:
    model: a `model_api.Model`.
    batcher: its batches, a pure function of the step.
    optimizer: an optax transformation (its schedule counts steps itself).
    model_dir: where checkpoints, metrics and model.json go.
    config: loop settings.
    schedule: the learning-rate schedule, only for logging.
    model_description: written to model_dir/model.json (see checkpoints.py).
    initial_params: start from these instead of a random init (ignored when
      the model directory already has a checkpoint to resume from).
    run_config: returns the text of this start's configuration, kept as
      config.gin (see checkpoints.keep_run_config) once the run has started.
    partitioner: the mesh and the logical-axis rules (default: data-parallel
      over all devices).
    batch_spec: the global batch, {entry: jax.ShapeDtypeStruct} (the task's
      batch_spec, data/tasks.py).
  Returns:
    The last logged metrics, with 'step'.
  Raises:
    checkpoints.ModelDirBusyError: another process is writing model_dir.
    checkpoints.DamagedCheckpointError: the checkpoint to resume from is unreadable.
    partitioning.PartitioningError: a parameter does not split over the mesh
      (raised before anything is allocated or written).
    NonFiniteLossError: a step failed the finiteness check (nothing of it saved).
    preemption.PreemptedError: SIGTERM arrived; the step every process reached was saved.
    BatchMismatchError: a batch differs from batch_spec.
  """
  with checkpoints.exclusive_writer(model_dir):
    return _train(model, batcher, optimizer, model_dir, config, schedule, model_description,
                  initial_params, run_config, partitioner or partitioning.Partitioner(),
                  batch_spec)


class BatchMismatchError(ValueError):
  """A batch is not what the step was compiled for: an internal failure of the batcher."""


def check_batch(batch: dict, spec: dict, rows: Optional[int] = None) -> None:
  """Raises BatchMismatchError naming the first entry of `batch` (numpy arrays) whose name,
  shape or dtype differs from `spec`; `rows`: the rows a slice of the global batch holds
  (the spec's leading dimension, divided over the data shards)."""
  if set(batch) != set(spec):
    extra, missing = sorted(set(batch) - set(spec)), sorted(set(spec) - set(batch))
    name = (extra or missing)[0]
    if extra:
      raise BatchMismatchError(f'batch entry {name!r} is not in the batch spec the step was '
                               f'compiled for ({sorted(spec)})')
    raise BatchMismatchError(f'batch entry {name!r} of the batch spec the step was compiled '
                             f'for is missing from the batch ({sorted(batch)})')
  for name, want in spec.items():
    shape = tuple(want.shape)
    if rows is not None:
      shape = (rows,) + shape[1:]
    got = np.asarray(batch[name])
    if got.shape != shape or got.dtype != np.dtype(want.dtype):
      raise BatchMismatchError(f'batch entry {name!r} is {got.dtype}{list(got.shape)}, but the '
                               f'step was compiled for {np.dtype(want.dtype)}{list(shape)}')


def _train(model, batcher, optimizer, model_dir, config, schedule, model_description,
           initial_params, run_config, partitioner, batch_spec) -> dict:
  primary = jax.process_index() == 0
  layout = state_layout(model, optimizer, partitioner)  # checks divisibility first
  if model_description is not None and primary:
    checkpoints.write_model_json(model_dir, model_description)
  repl = partitioner.replicated

  manager = checkpoints.checkpoint_manager(model_dir, config.save_every,
                                           config.keep_checkpoints)
  writer, bar = None, None
  stack = contextlib.ExitStack()
  try:
    start = manager.latest_step() or 0
    with jax.set_mesh(partitioner.mesh):
      if start:
        log.info('resuming from %s at step %d', model_dir, start)
        restored = checkpoints.restore(manager, start, layout.params, layout.opt_state)
        params, opt_state = restored['params'], restored['opt_state']
      else:
        params, opt_state = init_train_state(model, optimizer, partitioner, layout,
                                             config.seed, initial_params)
      bad_step = jax.device_put(jnp.int32(0), repl)
      # Compiled for the spec before the loop, as T5X compiles from the dataset's
      # element_spec: every batch is then held to it.
      step_fn, _ = build_train_step(model, optimizer, partitioner, batch_spec, config.seed,
                                    layout, config.grad_strategy, config.num_microbatches)
      with partitioner.context():
        step_fn = step_fn.lower(params, opt_state, bad_step, batch_spec,
                                jax.ShapeDtypeStruct((), jnp.int32)).compile()

      writer = _MetricsWriter(model_dir, config.tensorboard)
      writer.drop_after(start)
      if run_config is not None and primary:
        log.info('configuration of this start: %s',
                 checkpoints.keep_run_config(model_dir, run_config()))
      if config.progress_bar and primary:
        from tqdm import tqdm
        bar = tqdm(total=config.total_steps, initial=start, desc='train', unit='step',
                   dynamic_ncols=True, mininterval=1.0)
      pending, last, window_start, examples = [], {'step': start}, time.time(), 0
      data = partitioner.data_layout  # the rows of each batch this process loads
      rows = jax.tree.leaves(batch_spec)[0].shape[0] // data.num_shards
      def device_batch(step):
        local = batcher.batch(step, data.shard_index, data.num_shards)
        check_batch(local, batch_spec, rows)
        return rows, partitioner.shard_batch(local)

      watcher = stack.enter_context(preemption.Watcher())
      for step, (local_size, batch) in prefetch.prefetch(
          device_batch, range(start, config.total_steps), config.prefetch):
        examples += local_size * data.num_shards
        params, opt_state, bad_step, metrics = step_fn(params, opt_state, bad_step, batch,
                                                       jnp.int32(step))
        pending.append(metrics)
        done = step + 1
        is_last = done == config.total_steps
        preempted = watcher.reached(done) and not is_last  # the same step on every process
        save_now = is_last or preempted or manager.should_save(done)
        if done % config.log_every == 0 or save_now:
          pending, bad = jax.device_get((pending, bad_step))
          if bad:
            manager.wait_until_finished()
            raise _non_finite_error(int(bad), pending[int(bad) - 1 - (done - len(pending))],
                                    manager.latest_step(), model_dir)
          summary = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
          pending = []
          now = time.time()
          summary['examples_per_second'] = examples / max(now - window_start, 1e-9)
          if schedule is not None:
            summary['learning_rate'] = float(schedule(step))
          window_start, examples = now, 0
          writer.write(done, summary)
          last = {'step': done, **summary}
          if bar is not None:
            bar.set_postfix({k: f'{summary[k]:.4f}' for k in model.progress_metrics},
                            refresh=False)
        if save_now:
          checkpoints.save(manager, done, params, opt_state, force=True)
        if bar is not None:
          bar.update(1)
        if preempted:
          manager.wait_until_finished()
          raise preemption.PreemptedError(
              f'SIGTERM: saved step {done} of {config.total_steps} in {model_dir}; run the '
              'same command again to resume from it')
  finally:
    stack.close()
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
    if bar is not None:
      bar.close()
  return last


def _non_finite_error(bad_step: int, metrics: dict, last_good: Optional[int],
                      model_dir: str) -> NonFiniteLossError:
  shown = ', '.join(f'{k} {float(metrics[k]):.4g}' for k in ('loss', 'grad_norm'))
  where = (f'the last good checkpoint is step {last_good} in {model_dir}'
           if last_good is not None else f'{model_dir} has no checkpoint')
  return NonFiniteLossError(
      f'non-finite loss, gradients or parameters at step {bad_step} ({shown}); stopped '
      f'without saving it; {where}. Lower the learning rate or check the data.')
