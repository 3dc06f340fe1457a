"""The training job: a validated `setup`, then `train(setup)`; `run` is both, for gin.

gin configures `run` and the constructors it receives (model, task, optimizer,
schedule) through dynamic registration; nothing below it reads gin. `setup`
checks every setting and the model against its task (data/tasks.py) and
reads or writes nothing; `train` then locks the model directory, reads the
data and trains. scripts/plan.py plans a setup instead of training it, and a
multi-stage chain (multistage.py) builds each stage's setup, gives it its
teacher, then trains it: both build the setup `run` is configured with
(`configured_setup`). The model is known only through `model_api.Model`, so
any registered kind trains here.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import optax

from t5dual import checkpoints, cli, model_api, optim, partitioning, trainer
from t5dual.data import pipeline, sources, tasks
from t5dual.cli import ParameterError, check_int
from t5dual.vocab import Tokenizer

log = logging.getLogger(__name__)


class TrainSetup(NamedTuple):
  """Everything a training run is, checked; nothing of it read or written yet.

  Attributes:
    model_dir: output directory (checkpoints, model.json, metrics, config.gin).
    model: the model and its loss (a `model_api.Model`).
    task: its data settings (data/tasks.py), whose batches the model takes.
    source: the data source spec (train_lib.run's mixture_or_task_name).
    source_module: a module to import before reading `source` (or None).
    vocabulary_path: SentencePiece model file.
    batch_size: global batch size, split over all devices.
    feature_lengths: {feature: tokens}, the model's feature_names.
    optimizer, schedule: the optax transformation and its learning-rate schedule.
    partitioner: the mesh and logical-axis rules.
    trainer_config: loop settings, total_steps = the run's train_steps.
    initial_checkpoint_path: a checkpoint to start from (or None).
    run_config: returns this start's configuration text (or None).
    teacher_to_come: the task's teacher is attached after setup (a chain's stage
      taught by the previous one); `train` refuses to start without it.
  """

  model_dir: str
  model: model_api.Model
  task: tasks.Task
  source: str
  source_module: Optional[str]
  vocabulary_path: str
  batch_size: int
  feature_lengths: dict
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  partitioner: partitioning.Partitioner
  trainer_config: trainer.TrainerConfig
  initial_checkpoint_path: Optional[str]
  run_config: Optional[Callable[[], str]]
  teacher_to_come: bool = False

  @property
  def batch_spec(self) -> dict:
    """The global batch the task makes, as jax.ShapeDtypeStructs: what the step compiles for."""
    return self.task.batch_spec(self.batch_size, self.feature_lengths)


def run(model_dir: str,
        model: model_api.Model,
        mixture_or_task_name: str,
        vocabulary_path: str,
        task: Optional[tasks.Task] = None,
        batch_size: int = 512,
        task_feature_lengths: Optional[dict] = None,
        train_steps: int = 10_000,
        learning_rate: float = 1e-3,
        warmup_steps: int = 0,
        decay: str = 'linear',
        initial_checkpoint_path: Optional[str] = None,
        mixture_or_task_module: Optional[str] = None,
        trainer_config: trainer.TrainerConfig = trainer.TrainerConfig(),
        optimizer_fn: Callable[..., Any] = optim.adafactor,
        run_config: Optional[Callable[[], str]] = None,
        partitioner: Optional[partitioning.Partitioner] = None) -> dict:
  """Trains `model` on `task`'s batches of a data source, writing everything to `model_dir`.

  `train(setup(...))`: every setting is checked before anything is read or
  written; then the directory is locked for this run
  (checkpoints.exclusive_writer) before the data is loaded.

  Args:
    model_dir: output directory (checkpoints, model.json, metrics, config.gin).
    model: the model and its loss (a `model_api.Model`).
    mixture_or_task_name: 'beir:<folder>[:<split>]', 'jsonl:<path>', a path, or
      a registered seqio task (seqio extra).
    vocabulary_path: SentencePiece model file.
    task: the data settings (data/tasks.PairTask for a dual encoder, ListTask for
      a reranker; gin/models/*.gin bind it).
    batch_size: global batch size (pairs or lists), split over all devices.
    task_feature_lengths: {'inputs': query length, 'targets': document length}
      ({'inputs': input length} for a reranker).
    train_steps: total optimizer steps (the schedule decays to 0 at this step).
    learning_rate, warmup_steps, decay: see optim.learning_rate_schedule.
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
  Returns:
    The last logged metrics.
  Raises:
    cli.UserError (ConfigError, ...): a setting, the data or the directory is
      unusable; the message names the parameter, file or line.
  """
  return train(setup(
      model_dir, model, mixture_or_task_name, vocabulary_path, task=task,
      batch_size=batch_size, task_feature_lengths=task_feature_lengths,
      train_steps=train_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
      decay=decay, initial_checkpoint_path=initial_checkpoint_path,
      mixture_or_task_module=mixture_or_task_module, trainer_config=trainer_config,
      optimizer_fn=optimizer_fn, run_config=run_config, partitioner=partitioner))


def setup(model_dir: str, model: model_api.Model, mixture_or_task_name: str,
          vocabulary_path: str, *, task: Optional[tasks.Task], batch_size: int,
          task_feature_lengths: Optional[dict], train_steps: int, learning_rate: float,
          warmup_steps: int, decay: str, initial_checkpoint_path: Optional[str],
          mixture_or_task_module: Optional[str], trainer_config: trainer.TrainerConfig,
          optimizer_fn: Callable[..., Any], run_config: Optional[Callable[[], str]],
          partitioner: Optional[partitioning.Partitioner],
          teacher_to_come: bool = False) -> TrainSetup:
  """The checked setup of a run; the arguments are `run`'s (which gives the defaults).

  Checks every setting, the task's files and the model against the task (the loss
  and the teacher, the task's batch spec against the model's input_features);
  reads no data and writes nothing. `teacher_to_come`: the task's teacher is
  attached later (multistage.py), so a distillation loss without one passes here.

  Raises:
    trainer.ParameterError (a cli.UserError) naming the parameter; model_api.BatchSpecError.
  """
  lengths = dict(task_feature_lengths or pipeline.DEFAULT_FEATURE_LENGTHS)
  partitioner = partitioner or partitioning.Partitioner()
  if not isinstance(task, tasks.Task):
    raise ParameterError(run, 'task', f'must be a data task (data/tasks.PairTask or ListTask; '
                         f'gin/models/*.gin bind one), got {task!r}')
  _check_settings(model, batch_size, lengths, train_steps, learning_rate, warmup_steps,
                  partitioner, trainer_config)
  _check_model_and_task(model, task, batch_size, lengths, teacher_to_come)
  task.check_paths()
  schedule = optim.learning_rate_schedule(learning_rate, train_steps, warmup_steps, decay)
  return TrainSetup(
      model_dir=model_dir, model=model, task=task, source=mixture_or_task_name,
      source_module=mixture_or_task_module, vocabulary_path=vocabulary_path,
      batch_size=batch_size, feature_lengths=lengths,
      optimizer=optimizer_fn(learning_rate=schedule), schedule=schedule,
      partitioner=partitioner,
      trainer_config=dataclasses.replace(trainer_config, total_steps=train_steps),
      initial_checkpoint_path=initial_checkpoint_path, run_config=run_config,
      teacher_to_come=teacher_to_come)


def configured_setup(entry_point: Callable = run, teacher_to_come: bool = False,
                     **overrides) -> TrainSetup:
  """`setup` with the arguments gin configures for `entry_point` (`run`) in the current
  gin scope, `overrides` over them: the setup scripts/plan.py plans and each stage of
  a chain trains (multistage.py), without a second copy of run's settings.

  A chain's gin file binds `entry_point = @train_lib.run`, so that its stage-scoped
  bindings of train_lib.run count as used (gin_utils.check_bindings_used).
  """
  from t5dual import gin_utils
  return setup(**gin_utils.configured_arguments(entry_point, **overrides),
               teacher_to_come=teacher_to_come)


def train(s: TrainSetup) -> dict:
  """Runs a setup: reads the initial checkpoint, locks model_dir, loads the data, trains.

  Returns the last logged metrics (with 'step').
  """
  # The task may have changed since setup (a chain's stage gets its teacher so).
  _check_model_and_task(s.model, s.task, s.batch_size, s.feature_lengths, False)
  initial = None
  if s.initial_checkpoint_path:  # a checkpoint that does not fit fails before anything is written
    initial = _load_initial_checkpoint(s.initial_checkpoint_path, s.model, s.optimizer,
                                       s.partitioner)
  with checkpoints.exclusive_writer(s.model_dir):
    if s.source_module:
      importlib.import_module(s.source_module)
    tokenizer = Tokenizer(s.vocabulary_path)
    if tokenizer.vocab_size > s.model.vocab_size:
      raise cli.ConfigError(
          f'vocabulary {s.vocabulary_path} has {tokenizer.vocab_size} pieces but the model '
          f'embeds only {s.model.vocab_size} (VOCAB_SIZE, T5Config.vocab_size)')
    batcher = _make_batcher(s, tokenizer)
    description = {**checkpoints.model_description(s.model, s.vocabulary_path,
                                                   s.feature_lengths),
                   'task': s.task.describe()}
    log.info('training %s on %s: %d steps of %d examples on %d devices, in %s', s.model.name,
             s.source, s.trainer_config.total_steps, s.batch_size, jax.device_count(),
             s.model_dir)
    return trainer.train(s.model, batcher, s.optimizer, s.model_dir, s.trainer_config,
                         s.schedule, description, initial, s.run_config, s.partitioner,
                         batch_spec=s.batch_spec)


def _check_model_and_task(model, task, batch_size, lengths, teacher_to_come) -> None:
  """The model takes the task's batches: a distillation loss has a teacher and a teacher
  has a distillation loss (ParameterError naming the task's teacher), and the task's
  batch spec has the entries, ranks and dtypes of the model's input_features."""
  distils = bool(getattr(model, 'distils', False))
  teacher = getattr(task, 'teacher', None)
  name = model.describe().get('loss')
  if distils and teacher is None and not teacher_to_come:
    raise ParameterError(type(task), 'teacher', f'the loss {name} distils from teacher '
                         'scores, and none are given: set TEACHER to a TREC run or JSONL of '
                         'scores (t5dual/data/lists.py), or choose a loss without a teacher')
  if teacher is not None and not distils:
    raise ParameterError(type(task), 'teacher', f'is {teacher!r}, but the loss {name} does '
                         'not use teacher scores: choose a distillation loss '
                         '(kl_distillation_loss, teacher_rank_pairwise_loss, '
                         'margin_mse_loss) or leave TEACHER unset')
  if distils and teacher is None and teacher_to_come:  # the spec once the teacher is given
    task = dataclasses.replace(task, teacher='(the previous stage)')
  model_api.check_batch_spec(model, task.batch_spec(batch_size, lengths),
                             f'the task {type(task).__name__}')


def _check_settings(model, batch_size, lengths, train_steps, learning_rate, warmup_steps,
                    partitioner, trainer_config) -> None:
  """ParameterErrors for settings that cannot work, before anything runs."""
  if set(lengths) != set(model.feature_names):
    raise ParameterError(run, 'task_feature_lengths',
                         f'a {model.name} needs the features {sorted(model.feature_names)}, '
                         f'got {sorted(lengths)}')
  check_int(run, 'batch_size', batch_size, minimum=1)
  check_int(run, 'train_steps', train_steps, minimum=1)
  if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
      math.isfinite(learning_rate) and learning_rate > 0):
    raise ParameterError(run, 'learning_rate',
                         f'must be a positive finite number, got {learning_rate!r}')
  check_int(run, 'warmup_steps', warmup_steps, minimum=0)
  for feature, length in lengths.items():
    if not cli.is_int(length) or length < 2:
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


def _make_batcher(s: TrainSetup, tokenizer):
  """The task's batcher (a Scorer's input template with it), with problems in the data
  reported as user errors."""
  template = s.model.template if isinstance(s.model, model_api.Scorer) else None
  try:
    return s.task.make_batcher(s.source, tokenizer, s.batch_size, s.feature_lengths,
                               seed=s.trainer_config.seed, template=template)
  except cli.USER_ERRORS:
    raise
  except sources.DataError as e:  # names the file and line already
    raise cli.UserError(str(e)) from e
  except (ValueError, LookupError) as e:  # e.g. too few pairs, an unknown source
    raise cli.UserError(f'training data {s.source}: {e}') from e
