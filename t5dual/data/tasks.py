"""Training tasks: what a model trains on, apart from the model.

A task owns the data settings of one kind of training and builds the two
things the trainer needs from them: the batcher (`make_batcher`, batches as a
pure function of the step) and the batch spec (`batch_spec`, the global batch
as jax.ShapeDtypeStructs, which the trainer compiles its step for before the
loop and which the planner and the benchmarks compile for). Every batch the
batcher makes equals the spec; tests hold them to it for every task.

  PairTask  (query, positive document) pairs and `num_negatives` hard negatives
            per query (data/pipeline.PairBatcher): dual encoders.
  ListTask  per query, a list of candidates drawn from a first-stage run's rank
            window, with an optional teacher's scores for distillation
            (data/lists.ListBatcher): rerankers.

The model states which batches it takes (model_api.Model.input_features) and
train_lib's setup checks the task's spec against it; a task never sees the
model, only what it needs from it (a reranker's input `template`). gin
configures the tasks (`train_lib.run.task` in gin/models/*.gin); their checks
run when gin builds them, before anything is read or written, and
`gin_utils.call_configured` names the macro that set a bad value.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Protocol, Union, runtime_checkable

from t5dual import model_api
from t5dual.cli import ParameterError, check_int
from t5dual.data import lists as lists_lib
from t5dual.data import pipeline, sources



@dataclasses.dataclass(frozen=True)
class PairTask:
  """Query-document pairs (BEIR folder, JSONL file or seqio task) for a dual encoder.

  Attributes:
    num_negatives: hard negatives per query read from the data (JSONL
      'negatives'); the batch then holds 'negative_targets' [B, N, Ld].
  """

  num_negatives: int = 0

  kind = 'pairs'

  def __post_init__(self):
    check_int(PairTask, 'num_negatives', self.num_negatives, minimum=0)

  def make_batcher(self, source: str, tokenizer: Any, batch_size: int, feature_lengths: dict,
                   seed: int = 0, template: Optional[str] = None) -> pipeline.PairBatcher:
    """Pairs (and hard negatives) of `source`; `template` is unused (each side of a pair
    is tokenized alone)."""
    return pipeline.make_batcher(source, tokenizer, batch_size, feature_lengths,
                                 self.num_negatives, seed=seed)

  def batch_spec(self, batch_size: int, feature_lengths: dict) -> dict:
    """The global batch of `batch_size` pairs as jax.ShapeDtypeStructs."""
    return pipeline.pair_batch_spec(batch_size, feature_lengths, self.num_negatives)

  def check_paths(self) -> None:
    """Nothing to check: the data source is read once the run has started."""

  def describe(self) -> dict:
    return {'kind': self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ListTask:
  """Training lists of a BEIR split for a reranker (see data/lists.py).

  Attributes:
    first_stage_run: a TREC run over the training split whose window supplies the
      negatives; None: BM25 (t5dual.bm25) over the training corpus, at start-up.
    list_size: candidates per query, 2..100.
    num_positives: judged positives per list, in [1, list_size).
    min_rank, max_rank: negatives are sampled from ranks [min_rank, max_rank].
    teacher: teacher scores for distillation losses, a TREC run or JSONL
      (data/lists.read_teacher); the batch then holds 'teacher_scores'. A chain's
      stage taught by the previous one gets it with dataclasses.replace
      (multistage.py).
  """

  first_stage_run: Optional[str] = None
  list_size: int = 8
  num_positives: int = 1
  min_rank: int = 1
  max_rank: int = 100
  teacher: Optional[str] = None

  kind = 'lists'

  def __post_init__(self):
    for key in ('list_size', 'num_positives', 'min_rank', 'max_rank'):
      check_int(ListTask, key, getattr(self, key))
    low, high = lists_lib.MIN_LIST_SIZE, lists_lib.MAX_LIST_SIZE
    if not low <= self.list_size <= high:
      raise ParameterError(ListTask, 'list_size', f'must be in [{low}, {high}] (a positive '
                           f'and at least one negative), got {self.list_size}')
    if not 1 <= self.num_positives < self.list_size:
      raise ParameterError(ListTask, 'num_positives', f'must be in [1, list_size '
                           f'{self.list_size}), got {self.num_positives}')
    if self.min_rank < 1:
      raise ParameterError(ListTask, 'min_rank', f'must be >= 1, got {self.min_rank}')
    if self.max_rank < self.min_rank:
      raise ParameterError(ListTask, 'max_rank', f'must be >= min_rank {self.min_rank} '
                           f'(negatives come from ranks [min_rank, max_rank]), got '
                           f'{self.max_rank}')

  def check_paths(self) -> None:
    """Refuses, before anything is read or written, first-stage or teacher files that
    do not exist (trainer.ParameterError naming the key)."""
    for key in ('first_stage_run', 'teacher'):
      path = getattr(self, key)
      if path is not None and '://' not in path and not os.path.isfile(path):
        raise ParameterError(ListTask, key, f'{path}: file not found')

  def first_stage(self, folder: str, split: str) -> Union[str, dict]:
    """The first-stage run the lists' negatives come from: the file, or BM25 of the split."""
    if self.first_stage_run is not None:
      return self.first_stage_run
    from t5dual import bm25
    return bm25.beir_run(folder, split, k=self.max_rank)

  def make_batcher(self, source: str, tokenizer: Any, batch_size: int, feature_lengths: dict,
                   seed: int = 0, template: Optional[str] = None) -> model_api.Batcher:
    """Training lists of a BEIR split ('beir:<folder>[:<split>]' or a folder) or of a
    prepared store ('store:<dir>', data/store.py), each candidate's text the reranker's
    `template` ('...{query}...{document}...'; default: RankT5's) filled in."""
    template = template or lists_lib.DEFAULT_TEMPLATE
    if source.startswith('store:'):  # tokenized at prepare time: assembled from its tokens
      from t5dual.data import store_batchers
      return store_batchers.list_batcher(source, tokenizer, batch_size, self,
                                         feature_lengths['inputs'], template, seed)
    folder, split = beir_source(source)
    examples = lists_lib.load_lists(folder, split, self.first_stage(folder, split),
                                    min_rank=self.min_rank, max_rank=self.max_rank,
                                    teacher_path=self.teacher)
    return lists_lib.ListBatcher(
        examples, tokenizer, batch_size, list_size=self.list_size,
        input_length=feature_lengths['inputs'], num_positives=self.num_positives,
        input_fn=lambda q, d: template.format(query=q, document=d), seed=seed)

  def batch_spec(self, batch_size: int, feature_lengths: dict) -> dict:
    """The global batch of `batch_size` lists as jax.ShapeDtypeStructs."""
    return lists_lib.list_batch_spec(batch_size, self.list_size, feature_lengths['inputs'],
                                     teacher=self.teacher is not None)

  def describe(self) -> dict:
    return {'kind': self.kind, **dataclasses.asdict(self)}


@runtime_checkable
class Task(Protocol):
  """What train_lib needs from a task (PairTask and ListTask are the built-in ones)."""

  def make_batcher(self, source: str, tokenizer: Any, batch_size: int, feature_lengths: dict,
                   seed: int = 0, template: Optional[str] = None) -> Any:
    """The batcher (model_api.Batcher) of `source`'s training data."""

  def batch_spec(self, batch_size: int, feature_lengths: dict) -> dict:
    """The global batch its batchers make up, as jax.ShapeDtypeStructs."""

  def check_paths(self) -> None:
    """Refuses files it names that do not exist (trainer.ParameterError)."""

  def describe(self) -> dict:
    """JSON-able settings, with 'kind', kept in model.json ('task')."""


TASKS = {PairTask.kind: PairTask, ListTask.kind: ListTask}


def from_description(desc: dict) -> Optional[Task]:
  """The task a model.json records: its 'task' entry, or the 'lists' entry that model
  directories written before tasks existed hold (a reranker's ListsConfig, whose fields
  are ListTask's); None if it records neither."""
  if desc.get('task') is not None:
    settings = dict(desc['task'])
    return TASKS[settings.pop('kind')](**settings)
  if desc.get('lists') is not None:
    return ListTask(**desc['lists'])
  return None


def beir_source(source: str) -> tuple[str, str]:
  """(folder, split) of a reranker's training data: 'beir:<folder>[:<split>]' or a folder.

  The split defaults to 'train'. Raises sources.DataError if the folder does not exist.
  """
  kind, _, rest = source.partition(':')
  folder, _, split = rest.partition(':') if kind == 'beir' else (source, '', '')
  if not os.path.isdir(folder):
    raise sources.DataError(f'reranker training data must be a BEIR folder '
                            f"('beir:<folder>[:<split>]'), got {source!r}")
  return folder, split or 'train'
