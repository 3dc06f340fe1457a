"""The training loop, shared by every model that offers `init_params`, `loss_fn`
and `logical_axes` (dual encoders now, rerankers later).

One `jax.jit`-compiled step over a ('data', 'model') mesh: parameters are placed
by their logical axis names, the batch is split over 'data'. Checkpoints are
saved with orbax every `save_every` steps and the run resumes from the latest
one; since batches are a pure function of the step (data/pipeline.py), a
resumed run continues with exactly the same data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5dual import checkpoints, partitioning

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  total_steps: int = 1000
  log_every: int = 50
  save_every: int = 1000
  keep_checkpoints: int = 3
  seed: int = 0
  model_parallel: int = 1
  progress_bar: bool = True
  tensorboard: bool = True


class NonFiniteLossError(FloatingPointError):
  pass


def train_step(model, optimizer, seed, params, opt_state, batch, step):
  """One optimizer step; dropout is keyed by (seed, step). Returns (params, opt_state, metrics)."""
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  (_, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      params, batch, dropout_rng)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics['grad_norm'] = optax.tree.norm(grads)
  return params, opt_state, metrics


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


def train(model: Any, batcher: Any, optimizer: optax.GradientTransformation,
          model_dir: str, config: TrainerConfig = TrainerConfig(),
          schedule: Optional[optax.Schedule] = None,
          model_description: Optional[dict] = None,
          initial_params: Optional[Any] = None) -> dict:
  """Trains `model` on `batcher.batch(step)` until `config.total_steps`.

  Args:
    model: object with init_params(rng), loss_fn(params, batch, rng), logical_axes().
    batcher: object with batch(step, process_index, process_count) -> dict of arrays.
    optimizer: an optax transformation (its schedule counts steps itself).
    model_dir: where checkpoints, metrics and model.json go.
    config: loop settings.
    schedule: the learning-rate schedule, only for logging.
    model_description: written to model_dir/model.json (see checkpoints.py).
    initial_params: start from these instead of a random init (ignored when
      the model directory already has a checkpoint to resume from).
  Returns:
    The last logged metrics, with 'step'.
  """
  os.makedirs(model_dir, exist_ok=True)
  if model_description is not None and jax.process_index() == 0:
    checkpoints.write_model_json(model_dir, model_description)
  mesh = partitioning.make_mesh(config.model_parallel)
  param_sh = partitioning.param_shardings(model.logical_axes(), mesh)
  repl = partitioning.replicated(mesh)

  manager = checkpoints.checkpoint_manager(model_dir, config.save_every,
                                           config.keep_checkpoints)
  start = manager.latest_step() or 0
  with jax.set_mesh(mesh):
    if initial_params is not None and not start:
      params = jax.device_put(initial_params, param_sh)
    else:
      params = jax.jit(model.init_params, out_shardings=param_sh)(
          jax.random.PRNGKey(config.seed))
    opt_state = partitioning.onto_mesh(jax.jit(optimizer.init)(params), mesh)
    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    if start:
      log.info('resuming from %s at step %d', model_dir, start)
      as_abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      restored = checkpoints.restore(manager, start, jax.tree.map(as_abstract, params),
                                     jax.tree.map(as_abstract, opt_state))
      params, opt_state = restored['params'], restored['opt_state']

    step_fn = jax.jit(
        lambda p, o, b, s: train_step(model, optimizer, config.seed, p, o, b, s),
        out_shardings=(param_sh, opt_sh, repl), donate_argnums=(0, 1))

    writer = _MetricsWriter(model_dir, config.tensorboard)
    bar = None
    if config.progress_bar and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=config.total_steps, initial=start, desc='train', unit='step',
                 dynamic_ncols=True, mininterval=1.0)
    pending, last, window_start, examples = [], {'step': start}, time.time(), 0
    try:
      for step in range(start, config.total_steps):
        local = batcher.batch(step, jax.process_index(), jax.process_count())
        examples += len(next(iter(local.values()))) * jax.process_count()
        batch = partitioning.shard_batch(local, mesh)
        params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(step))
        pending.append(metrics)
        done = step + 1
        is_last = done == config.total_steps
        if done % config.log_every == 0 or is_last or manager.should_save(done):
          summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)]))
                     for k in pending[0]}
          pending = []
          if not all(np.isfinite(v) for v in summary.values()):
            raise NonFiniteLossError(
                f'non-finite training metrics at step {done}: {summary}. Stopped without '
                f'saving; the last good checkpoint is step {manager.latest_step()} '
                f'in {model_dir}. Lower the learning rate or check the data.')
          now = time.time()
          summary['examples_per_second'] = examples / max(now - window_start, 1e-9)
          if schedule is not None:
            summary['learning_rate'] = float(schedule(step))
          window_start, examples = now, 0
          writer.write(done, summary)
          last = {'step': done, **summary}
          if bar is not None:
            bar.set_postfix(loss=f"{summary['loss']:.4f}", p1=f"{summary['p_at_1']:.3f}",
                            refresh=False)
        checkpoints.save(manager, done, params, opt_state, force=is_last)
        if bar is not None:
          bar.update(1)
    finally:
      manager.wait_until_finished()
      manager.close()
      writer.close()
      if bar is not None:
        bar.close()
  return last
