"""`run`: the training job, as configured by gin files (see gin/ and configs/).

gin configures this function and the constructors it receives (models,
optimizer, schedule) through dynamic registration; nothing below it reads gin.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, Callable, Optional

import jax

from t5dual import checkpoints, models, optim, trainer
from t5dual.data import pipeline
from t5dual.vocab import Tokenizer

log = logging.getLogger(__name__)


def run(model_dir: str,
        model: models.DualEncoderModel,
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
        optimizer_fn: Callable[..., Any] = optim.adafactor) -> dict:
  """Trains `model` on a data source and writes everything to `model_dir`.

  Args:
    model_dir: output directory (checkpoints, model.json, metrics, config.gin).
    model: the dual encoder and its loss.
    mixture_or_task_name: 'beir:<folder>[:<split>]', 'jsonl:<path>', a path, or
      a registered seqio task (seqio extra).
    vocabulary_path: SentencePiece model file.
    batch_size: global batch size (pairs), split over all devices.
    task_feature_lengths: {'inputs': query length, 'targets': document length}.
    train_steps: total optimizer steps (the schedule decays to 0 at this step).
    learning_rate, warmup_steps, decay: see optim.learning_rate_schedule.
    num_negatives: hard negatives per query read from the data (JSONL 'negatives').
    initial_checkpoint_path: start from a T5X / Hugging Face / t5dual checkpoint.
    mixture_or_task_module: a Python module to import first; importing it
      registers the seqio tasks named by mixture_or_task_name (T5X convention).
    trainer_config: loop settings; its total_steps is replaced by train_steps.
    optimizer_fn: called with the schedule as learning_rate.
  Returns:
    The last logged metrics.
  """
  if mixture_or_task_module:
    importlib.import_module(mixture_or_task_module)
  lengths = dict(task_feature_lengths or pipeline.DEFAULT_FEATURE_LENGTHS)
  tokenizer = Tokenizer(vocabulary_path)
  vocab_rows = model.config.t5.vocab_size
  if tokenizer.vocab_size > vocab_rows:
    raise ValueError(f'vocabulary {vocabulary_path} has {tokenizer.vocab_size} pieces but '
                     f'the model embeds only {vocab_rows} (T5Config.vocab_size)')
  batcher = pipeline.make_batcher(mixture_or_task_name, tokenizer, batch_size, lengths,
                                  num_negatives, seed=trainer_config.seed)
  schedule = optim.learning_rate_schedule(learning_rate, train_steps, warmup_steps, decay)
  config = dataclasses.replace(trainer_config, total_steps=train_steps)
  initial = None
  if initial_checkpoint_path:
    from t5dual.interop import load_initial_params
    initial = load_initial_params(initial_checkpoint_path, model)
  description = checkpoints.model_description(model, vocabulary_path, lengths)
  log.info('training %s on %s: %d steps of %d pairs on %d devices', model.config.architecture,
           mixture_or_task_name, train_steps, batch_size, jax.device_count())
  return trainer.train(model, batcher, optimizer_fn(learning_rate=schedule), model_dir,
                       config, schedule, description, initial)
