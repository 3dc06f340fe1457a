"""`run`: the training job, as configured by gin files (see gin/ and configs/).

gin configures this function and the constructors it receives (models,
optimizer, schedule) through dynamic registration; nothing below it reads gin.
`run` knows the model only through `model_api.Model`, so any registered kind
trains with it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from typing import Any, Callable, Optional

import jax

from t5dual import checkpoints, cli, model_api, optim, partitioning, trainer
from t5dual.data import pipeline, sources
from t5dual.trainer import ParameterError, check_positive_int
from t5dual.vocab import Tokenizer

log = logging.getLogger(__name__)


def run(model_dir: str,
        model: model_api.Model,
        mixture_or_task_name: str,
        vocabulary_path: str,
        batch_size: int = 512,
        task_feature_lengths: Optional[dict] = None,
        train_steps: int = 10_000,
        learning_rate: float = 1e-3,
        warmup_steps: int = 0,
        decay: str = 'linear',
        num_negatives: int = 0,
        initial_checkpoint_path: Optional[str] = None,
        mixture_or_task_module: Optional[str] = None,
        trainer_config: trainer.TrainerConfig = trainer.TrainerConfig(),
        optimizer_fn: Callable[..., Any] = optim.adafactor,
        run_config: Optional[Callable[[], str]] = None,
        partitioner: Optional[partitioning.Partitioner] = None,
        prepare_model: Optional[Callable[[model_api.Model, str], model_api.Model]] = None,
        check_only: bool = False,
        plan_fn: Optional[Callable[..., Any]] = None) -> Any:
  """Trains `model` on a data source and writes everything to `model_dir`.

  Every setting is checked before anything is read or written; then the
  directory is locked for this run (checkpoints.exclusive_writer) before the
  data is loaded.

  Args:
    model_dir: output directory (checkpoints, model.json, metrics, config.gin).
    model: the model and its loss (a `model_api.Model`).
    mixture_or_task_name: 'beir:<folder>[:<split>]', 'jsonl:<path>', a path, or
      a registered seqio task (seqio extra).
    vocabulary_path: SentencePiece model file.
    batch_size: global batch size (pairs), split over all devices.
    task_feature_lengths: {'inputs': query length, 'targets': document length}.
    train_steps: total optimizer steps (the schedule decays to 0 at this step).
    learning_rate, warmup_steps, decay: see optim.learning_rate_schedule.
    num_negatives: hard negatives per query read from the data (JSONL 'negatives').
    initial_checkpoint_path: start from a T5X / Hugging Face / t5dual checkpoint,
      read into the train state's layout before the data is loaded.
    mixture_or_task_module: a Python module to import first; importing it
      registers the seqio tasks named by mixture_or_task_name (T5X convention).
    trainer_config: loop settings; its total_steps is replaced by train_steps.
    optimizer_fn: called with the schedule as learning_rate.
    run_config: returns this start's configuration text, kept in model_dir
      (config.gin, then timestamped copies) once the run has started.
    partitioner: the mesh and logical-axis rules (default: data-parallel over
      all devices).
    prepare_model: called with the model and mixture_or_task_name (and the
      keywords batch_size, train_steps and seed: what the run will consume) once
      model_dir is locked, before the data is read; returns the model to train
      (a multistage chain gives a distillation stage its teacher scores so).
    check_only: only check the settings; nothing is read or written.
    plan_fn: instead of training, return plan_fn(model=, optimizer=,
      partitioner=, batch_size=, feature_lengths=, trainer_config=, num_negatives=)
      once the settings are checked (scripts/plan.py compiles the train step for
      a target so); nothing is read or written.
  Returns:
    The last logged metrics; with check_only, the model that would train;
    with plan_fn, what it returns.
  Raises:
    cli.UserError (ConfigError, ...): a setting, the data or the directory is
      unusable; the message names the parameter, file or line.
  """
  lengths = dict(task_feature_lengths or pipeline.DEFAULT_FEATURE_LENGTHS)
  partitioner = partitioner or partitioning.Partitioner()
  _check_settings(model, batch_size, lengths, train_steps, learning_rate, warmup_steps,
                  num_negatives, partitioner, trainer_config)
  if hasattr(model, 'check_training'):  # the model's own settings (a reranker's teacher)
    model.check_training(teacher_to_come=prepare_model is not None)
  if check_only:
    return model
  if plan_fn is not None:
    schedule = optim.learning_rate_schedule(learning_rate, train_steps, warmup_steps, decay)
    return plan_fn(model=model, optimizer=optimizer_fn(learning_rate=schedule),
                   partitioner=partitioner, batch_size=batch_size, feature_lengths=lengths,
                   trainer_config=trainer_config, num_negatives=num_negatives)
  config = dataclasses.replace(trainer_config, total_steps=train_steps)
  schedule = optim.learning_rate_schedule(learning_rate, train_steps, warmup_steps, decay)
  optimizer = optimizer_fn(learning_rate=schedule)
  initial = None
  if initial_checkpoint_path:  # a checkpoint that does not fit fails before anything is written
    initial = _load_initial_checkpoint(initial_checkpoint_path, model, optimizer, partitioner)
  with checkpoints.exclusive_writer(model_dir):
    if mixture_or_task_module:
      importlib.import_module(mixture_or_task_module)
    tokenizer = Tokenizer(vocabulary_path)
    if tokenizer.vocab_size > model.vocab_size:
      raise cli.ConfigError(
          f'vocabulary {vocabulary_path} has {tokenizer.vocab_size} pieces but the model '
          f'embeds only {model.vocab_size} (VOCAB_SIZE, T5Config.vocab_size)')
    if prepare_model is not None:
      model = prepare_model(model, mixture_or_task_name, batch_size=batch_size,
                            train_steps=train_steps, seed=config.seed)
    batcher = _make_batcher(model, mixture_or_task_name, tokenizer, batch_size, lengths,
                            config.seed, num_negatives)
    description = checkpoints.model_description(model, vocabulary_path, lengths)
    log.info('training %s on %s: %d steps of %d examples on %d devices, in %s', model.name,
             mixture_or_task_name, train_steps, batch_size, jax.device_count(), model_dir)
    return trainer.train(model, batcher, optimizer, model_dir,
                         config, schedule, description, initial, run_config, partitioner)


def _check_settings(model, batch_size, lengths, train_steps, learning_rate, warmup_steps,
                    num_negatives, partitioner, trainer_config) -> None:
  """ParameterErrors for settings that cannot work, before anything runs."""
  if set(lengths) != set(model.feature_names):
    raise ParameterError(run, 'task_feature_lengths',
                         f'a {model.name} needs the features {sorted(model.feature_names)}, '
                         f'got {sorted(lengths)}')
  check_positive_int(run, 'batch_size', batch_size)
  check_positive_int(run, 'train_steps', train_steps)
  if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
      math.isfinite(learning_rate) and learning_rate > 0):
    raise ParameterError(run, 'learning_rate',
                         f'must be a positive finite number, got {learning_rate!r}')
  for name, value in (('warmup_steps', warmup_steps), ('num_negatives', num_negatives)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ParameterError(run, name, f'must be an integer >= 0, got {value!r}')
  for feature, length in lengths.items():
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
      raise ParameterError(run, 'task_feature_lengths',
                           f'{feature!r} must be an integer >= 2 (room for one token and '
                           f'EOS), got {length!r}')
  data_parallel, model_parallel = partitioner.mesh_shape  # checks the mesh shape
  if batch_size % data_parallel:
    raise ParameterError(run, 'batch_size',
                         f'{batch_size} is not divisible by the data-parallel size '
                         f'{data_parallel} ({partitioner.num_devices} devices / model_parallel '
                         f'{model_parallel})')
  trainer.check_grad_strategy(model, trainer_config.grad_strategy,
                              trainer_config.num_microbatches, batch_size, data_parallel)
  # Before anything is allocated or written: every split parameter dimension divides.
  partitioner.for_model(model).check_divisible(model.logical_axes(),
                              jax.eval_shape(model.init_params, jax.random.PRNGKey(0)))
  if jax.process_count() > 1:  # each process holds whole, equal blocks of the mesh's data rows
    partitioner.data_layout


def _load_initial_checkpoint(path, model, optimizer, partitioner):
  """The initial params, read straight into the train state's layout (each host its
  slices); a checkpoint that does not fit the model is one ParameterError line."""
  from t5dual.interop import load_initial_params, mapping
  layout = trainer.state_layout(model, optimizer, partitioner)
  try:
    return load_initial_params(path, model, layout.param_shardings)
  except mapping.MappingError as e:
    more = f' (and {len(e.problems) - 1} more)' if len(e.problems) > 1 else ''
    raise ParameterError(run, 'initial_checkpoint_path', f'{path}: {e.problems[0]}{more}'
                         ) from None
  except cli.UserError:
    raise
  except (ValueError, KeyError, FileNotFoundError) as e:  # e.g. no checkpoint, no encoder
    first = (str(e.args[0] if e.args else e).splitlines() or [type(e).__name__])[0]
    raise ParameterError(run, 'initial_checkpoint_path',
                         first if path in first else f'{path}: {first}') from None


def _make_batcher(model, source, tokenizer, batch_size, lengths, seed, num_negatives):
  """model.make_batcher, with problems in the data reported as user errors."""
  try:
    return model.make_batcher(source, tokenizer, batch_size, lengths, seed=seed,
                              num_negatives=num_negatives)
  except cli.USER_ERRORS:
    raise
  except sources.DataError as e:  # names the file and line already
    raise cli.UserError(str(e)) from e
  except (ValueError, LookupError) as e:  # e.g. too few pairs, an unknown source
    raise cli.UserError(f'training data {source}: {e}') from e
