"""Pair and list batches read from a prepared store (data/store.py).

The batches equal those of pipeline.PairBatcher and lists.ListBatcher over the same
data: the same stream order (pipeline.EpochOrder), the same negative and list choices
(pipeline.negative_choices, lists.list_choices), the same token ids (the store holds
each text's ids; cut at length - 1 with EOS at read time). A batch is a pure function
of (seed, step, shard_index, num_shards) and reads only the rows of its slice from
memory-mapped files, so the batch of step 10**6 costs what the first one does.

What a batcher holds in memory: the permutation of the current epoch (int64 per pair
or list, as the in-memory batchers), and nothing per document or run entry.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from t5dual import cli
from t5dual.data import lists as lists_lib
from t5dual.data import pipeline
from t5dual.data import store as store_lib
from t5dual.vocab import EOS_ID


class StorePairBatcher:
  """pipeline.PairBatcher's batches ('inputs', 'targets', 'query_ids', 'doc_ids', and with
  num_negatives 'negative_targets', 'negative_ids') from a store's pairs."""

  def __init__(self, store: store_lib.Store, batch_size: int, feature_lengths: dict,
               num_negatives: int = 0, seed: int = 0):
    self.store, self.batch_size, self.seed = store, batch_size, seed
    self.feature_lengths = dict(feature_lengths)
    self.num_negatives = num_negatives
    pairs = store.pairs
    n = pairs['rows']
    if n < 2:
      raise store_lib.StoreError(f'{store.path}: {n} training pair(s): in-batch negatives '
                                 'need at least 2')
    if num_negatives and pairs['without_negatives']:
      raise cli.ConfigError(f'num_negatives={num_negatives} but {pairs["without_negatives"]} '
                            f'examples of {store.path} have no negatives (first: example '
                            f'{pairs["first_without_negatives"]})')
    store.check_length(self.feature_lengths['inputs'], "TASK_FEATURE_LENGTHS['inputs']")
    store.check_length(self.feature_lengths['targets'], "TASK_FEATURE_LENGTHS['targets']")
    self._order = pipeline.EpochOrder(seed, n)
    a = lambda name: store.array('pairs', name)  # noqa: E731
    self._query_row, self._doc_row = a('query_row'), a('doc_row')
    self._query_id, self._doc_id = a('query_id'), a('doc_id')
    self._neg_offsets, self._neg_rows, self._neg_ids = a('neg_offsets'), a('neg_rows'), \
        a('neg_ids')

  def example_indices(self, step: int, shard_index: int = 0, num_shards: int = 1) -> np.ndarray:
    return self._order.rows(pipeline.stream_positions(self.batch_size, step, shard_index,
                                                      num_shards))

  def batch_spec(self) -> dict:
    """The global batch its `batch` slices make up (pipeline.pair_batch_spec)."""
    return pipeline.pair_batch_spec(self.batch_size, self.feature_lengths, self.num_negatives)

  def batch(self, step: int, shard_index: int = 0, num_shards: int = 1) -> dict:
    idx = self.example_indices(step, shard_index, num_shards)
    lq, ld = self.feature_lengths['inputs'], self.feature_lengths['targets']
    out = {
        'inputs': self.store.queries.gather(self._query_row[idx], lq),
        'targets': self.store.corpus.gather(self._doc_row[idx], ld),
        'query_ids': np.asarray(self._query_id[idx], np.int32),
        'doc_ids': np.asarray(self._doc_id[idx], np.int32),
    }
    if self.num_negatives:
      whole = self.example_indices(step)  # the choices are drawn for the global batch
      counts = (self._neg_offsets[whole + 1] - self._neg_offsets[whole]).tolist()
      picks = np.stack(pipeline.negative_choices(self.seed, step, counts, self.num_negatives,
                                                 shard_index, num_shards))
      entries = self._neg_offsets[idx][:, None] + picks
      ld = self.feature_lengths['targets']
      out['negative_targets'] = self.store.corpus.gather(
          self._neg_rows[entries.reshape(-1)], ld).reshape(len(idx), self.num_negatives, ld)
      out['negative_ids'] = np.asarray(self._neg_ids[entries], np.int32)
    return out

  def steps_per_epoch(self) -> int:
    return max(1, self.store.pairs['rows'] // self.batch_size)


class StoreListBatcher:
  """lists.ListBatcher's batches ('inputs' [B, list, L], 'labels', 'where', and with a
  teacher 'teacher_scores') from a store's lists.

  A list entry's input is the template filled with the query and the document,
  tokenized: assembled here from the template's literals (tokenized once) and the stored
  ids, which is the same sequence (store.template_pieces says why, the tests prove it).
  """

  def __init__(self, store: store_lib.Store, tokenizer, batch_size: int, list_size: int = 8,
               input_length: int = 512, num_positives: int = 1,
               template: str = lists_lib.DEFAULT_TEMPLATE, seed: int = 0):
    if store.lists is None:
      raise store_lib.StoreError(f'{store.path}: holds no training lists (prepare it with '
                                 '--run)')
    if not lists_lib.MIN_LIST_SIZE <= list_size <= lists_lib.MAX_LIST_SIZE:
      raise ValueError(f'list_size must be in [{lists_lib.MIN_LIST_SIZE}, '
                       f'{lists_lib.MAX_LIST_SIZE}], got {list_size}')
    if not 1 <= num_positives < list_size:
      raise ValueError(f'num_positives must be in [1, list_size), got {num_positives}')
    if input_length < 2:
      raise ValueError(f'input_length must be >= 2 (a token and EOS), got {input_length}')
    store.check_length(input_length, "INPUT_LENGTH (TASK_FEATURE_LENGTHS['inputs'])")
    self.store, self.batch_size, self.list_size = store, batch_size, list_size
    self.input_length, self.num_positives, self.seed = input_length, num_positives, seed
    literals, self._fields = store_lib.template_pieces(template)
    self._literals = [np.asarray(x, np.int32) for x in
                      tokenizer.encode_ids([t.strip() for t in literals], input_length)]
    self._order = pipeline.EpochOrder(seed, store.lists['rows'])
    a = lambda name: store.array('lists', name)  # noqa: E731
    self._query_row = a('query_row')
    self._pos_offsets, self._pos_rows, self._pos_labels = a('pos_offsets'), a('pos_rows'), \
        a('pos_labels')
    self._neg_start, self._neg_count, self._neg_rows = a('neg_start'), a('neg_count'), \
        a('neg_rows')
    self.teacher = bool(store.lists['teacher'])
    if self.teacher:
      self._pos_teacher, self._neg_teacher = a('pos_teacher'), a('neg_teacher')

  def __len__(self) -> int:
    return self.store.lists['rows']

  def positions(self, step: int, shard_index: int = 0, num_shards: int = 1) -> np.ndarray:
    return pipeline.stream_positions(self.batch_size, step, shard_index, num_shards)

  def list_indices(self, step: int, shard_index: int = 0, num_shards: int = 1) -> np.ndarray:
    return self._order.rows(self.positions(step, shard_index, num_shards))

  def sample(self, position: int, query: int
             ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(document rows, labels, teacher scores or None) of the list at `position`."""
    p0, p1 = int(self._pos_offsets[query]), int(self._pos_offsets[query + 1])
    n0, n_neg = int(self._neg_start[query]), int(self._neg_count[query])
    pos, neg, order = lists_lib.list_choices(self.seed, position, p1 - p0, n_neg,
                                             self.num_positives, self.list_size)
    rows = np.concatenate([self._pos_rows[p0 + pos], self._neg_rows[n0 + neg]])[order]
    labels = np.concatenate([self._pos_labels[p0 + pos], np.zeros(len(neg), np.float32)])
    teacher = None
    if self.teacher:
      teacher = np.concatenate([self._pos_teacher[p0 + pos],
                                self._neg_teacher[n0 + neg]])[order]
    return rows, labels[order], teacher

  def _input(self, query: np.ndarray, document: np.ndarray) -> np.ndarray:
    fields = {'query': query, 'document': document}
    parts = [self._literals[0]]
    for field, literal in zip(self._fields, self._literals[1:]):
      parts += [fields[field], literal]
    ids = np.concatenate(parts)[:self.input_length - 1]
    return np.append(ids, EOS_ID)

  def batch_spec(self) -> dict:
    """The global batch its `batch` slices make up (lists.list_batch_spec)."""
    return lists_lib.list_batch_spec(self.batch_size, self.list_size, self.input_length,
                                     teacher=self.teacher)

  def batch(self, step: int, shard_index: int = 0, num_shards: int = 1) -> dict:
    positions = self.positions(step, shard_index, num_shards)
    lists = self.list_indices(step, shard_index, num_shards)
    rows, size = len(positions), self.list_size
    inputs = np.zeros((rows, size, self.input_length), np.int32)
    labels = np.zeros((rows, size), np.float32)
    where = np.zeros((rows, size), bool)
    teacher = np.zeros((rows, size), np.float32) if self.teacher else None
    queries = self.store.queries.pieces(self._query_row[lists])
    for i, (position, query) in enumerate(zip(positions.tolist(), lists.tolist())):
      docs, grades, scores = self.sample(position, query)
      labels[i, :len(docs)] = grades
      where[i, :len(docs)] = True
      if teacher is not None:
        teacher[i, :len(docs)] = scores
      for j, document in enumerate(self.store.corpus.pieces(docs)):
        ids = self._input(queries[i], document)
        inputs[i, j, :len(ids)] = ids
    out = {'inputs': inputs, 'labels': labels, 'where': where}
    if teacher is not None:
      out['teacher_scores'] = teacher
    return out

  def steps_per_epoch(self) -> int:
    return max(1, len(self) // self.batch_size)


def open_store(spec: str, tokenizer) -> store_lib.Store:
  """The store of a 'store:<dir>' source spec."""
  return store_lib.Store(spec[len('store:'):] if spec.startswith('store:') else spec, tokenizer)


def pair_batcher(spec: str, tokenizer, batch_size: int, feature_lengths: dict,
                 num_negatives: int = 0, seed: int = 0) -> StorePairBatcher:
  return StorePairBatcher(open_store(spec, tokenizer), batch_size, feature_lengths,
                          num_negatives, seed)


def list_batcher(spec: str, tokenizer, batch_size: int, lists_config, input_length: int,
                 template: str, seed: int = 0) -> StoreListBatcher:
  """The reranker's lists from a store, which must hold the lists `lists_config`
  (data/tasks.ListTask) asks for: the same run, rank window and teacher."""
  store = open_store(spec, tokenizer)
  if store.lists is None:
    raise store_lib.StoreError(f'{store.path}: holds no training lists (prepare it with --run)')
  prepared = store.manifest['lists']
  wanted = {'min_rank': lists_config.min_rank, 'max_rank': lists_config.max_rank}
  for key, value in wanted.items():
    if prepared.get(key) != value:
      raise cli.ConfigError(f'{key.upper()} is {value}, but the store {store.path} holds lists '
                            f'with {key}={prepared.get(key)}; prepare a store for this window')
  for key, given in (('first_stage_run', lists_config.first_stage_run),
                     ('teacher', lists_config.teacher)):
    held = prepared.get('run' if key == 'first_stage_run' else key)
    if given is not None and (held is None or os.path.abspath(given) != held):
      raise cli.ConfigError(f'{key.upper()} is {given!r}, but the store {store.path} was '
                            f'prepared from {held!r}; leave it unset or prepare the store from it')
    if key == 'teacher' and given is None and held is not None:
      raise cli.ConfigError(f'the store {store.path} holds teacher scores from {held!r}: set '
                            'TEACHER to it (with a distillation loss) or prepare a store '
                            'without one')
  return StoreListBatcher(store, tokenizer, batch_size, lists_config.list_size, input_length,
                          lists_config.num_positives, template, seed)
