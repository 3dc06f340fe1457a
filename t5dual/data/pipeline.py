"""Deterministic, resumable batches of tokenized training pairs (NumPy + SentencePiece).

The batch of step s is a pure function of (seed, s): example positions
s*B .. s*B+B-1 of an endless stream in which epoch e visits the examples in
the order `permutation(seed, e)`. A run resumed at step s therefore sees
exactly the batches the uninterrupted run would have seen, without any
iterator state in the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from t5dual import cli
from t5dual.data import sources
from t5dual.vocab import Tokenizer

DEFAULT_FEATURE_LENGTHS = {'inputs': 64, 'targets': 256}


@dataclasses.dataclass
class PairBatcher:
  """Tokenizes pairs into fixed-shape batches.

  Batch keys: 'inputs' [B, Lq] int32, 'targets' [B, Ld] int32, 'query_ids' [B],
  'doc_ids' [B] int32, and with num_negatives > 0 'negative_targets'
  [B, N, Ld] and 'negative_ids' [B, N].
  """

  examples: sources.PairExamples
  tokenizer: Tokenizer
  batch_size: int
  feature_lengths: dict = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_FEATURE_LENGTHS))
  num_negatives: int = 0
  seed: int = 0

  def __post_init__(self):
    n = len(self.examples)
    if n < 2:
      raise sources.DataError(f'{n} training pair(s): in-batch negatives need at least 2')
    if self.num_negatives:
      missing = [i for i, negs in enumerate(self.examples.negatives) if not negs]
      if missing:
        raise cli.ConfigError(f'num_negatives={self.num_negatives} but {len(missing)} examples '
                              f'have no negatives (first: example {missing[0]})')
    self._perms: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      rng = np.random.default_rng([self.seed, epoch])
      self._perms[epoch] = rng.permutation(len(self.examples))
    return self._perms[epoch]

  def example_indices(self, step: int, shard_index: int = 0,
                      num_shards: int = 1) -> np.ndarray:
    """Indices of the examples of global batch `step`, slice `shard_index` of `num_shards`
    (partitioning.DataLayout: the rows one data shard of the mesh loads)."""
    per_shard = _rows_per_shard(self.batch_size, num_shards)
    n = len(self.examples)
    start = step * self.batch_size + shard_index * per_shard
    positions = np.arange(start, start + per_shard)
    epochs = positions // n
    out = np.empty(per_shard, np.int64)
    for epoch in np.unique(epochs):  # a batch spans one epoch, or two at a boundary
      rows = epochs == epoch
      out[rows] = self._permutation(int(epoch))[positions[rows] % n]
    return out

  def _negative_picks(self, step: int, shard_index: int, num_shards: int) -> list:
    """Which negatives each row of the slice takes: drawn for the whole global batch from
    one generator keyed by (seed, step), then sliced, so that a row's negatives are the
    same whatever the number of shards (one process or a pod)."""
    ex = self.examples
    rng = np.random.default_rng([self.seed, step, 0, 1])
    picks = [rng.choice(len(ex.negatives[i]), self.num_negatives,
                        replace=len(ex.negatives[i]) < self.num_negatives)
             for i in self.example_indices(step)]
    per_shard = self.batch_size // num_shards
    return picks[shard_index * per_shard:(shard_index + 1) * per_shard]

  def batch_spec(self) -> dict:
    """The global batch its `batch` slices make up (`pair_batch_spec`)."""
    return pair_batch_spec(self.batch_size, self.feature_lengths, self.num_negatives)

  def batch(self, step: int, shard_index: int = 0, num_shards: int = 1) -> dict:
    idx = self.example_indices(step, shard_index, num_shards)
    ex = self.examples
    lq, ld = self.feature_lengths['inputs'], self.feature_lengths['targets']
    out = {
        'inputs': self.tokenizer.encode([ex.queries[i] for i in idx], lq),
        'targets': self.tokenizer.encode([ex.positives[i] for i in idx], ld),
        'query_ids': np.asarray([ex.query_ids[i] for i in idx], np.int32),
        'doc_ids': np.asarray([ex.doc_ids[i] for i in idx], np.int32),
    }
    if self.num_negatives:
      picks = self._negative_picks(step, shard_index, num_shards)
      texts = [ex.negatives[i][k] for i, ks in zip(idx, picks) for k in ks]
      out['negative_targets'] = self.tokenizer.encode(texts, ld).reshape(
          len(idx), self.num_negatives, ld)
      out['negative_ids'] = np.asarray(
          [[ex.negative_ids[i][k] for k in ks] for i, ks in zip(idx, picks)], np.int32)
    return out


def _rows_per_shard(batch_size: int, num_shards: int) -> int:
  if batch_size % num_shards:
    raise cli.ConfigError(f'batch size {batch_size} is not divisible by the {num_shards} data '
                          'shards of the mesh')
  return batch_size // num_shards


def pair_batch_spec(batch_size: int, feature_lengths: dict, num_negatives: int = 0) -> dict:
  """Shapes and dtypes (jax.ShapeDtypeStruct) of `batch_size` rows of PairBatcher batches.

  The one description of a pair batch that the planner and the benchmarks compile
  for; tests hold PairBatcher.batch to it.
  """
  import jax
  s = jax.ShapeDtypeStruct
  b, lq, ld = batch_size, feature_lengths['inputs'], feature_lengths['targets']
  spec = {'inputs': s((b, lq), np.int32), 'targets': s((b, ld), np.int32),
          'query_ids': s((b,), np.int32), 'doc_ids': s((b,), np.int32)}
  if num_negatives:
    spec['negative_targets'] = s((b, num_negatives, ld), np.int32)
    spec['negative_ids'] = s((b, num_negatives), np.int32)
  return spec


def make_batcher(source: str, tokenizer: Tokenizer, batch_size: int,
                 feature_lengths: Optional[dict] = None, num_negatives: int = 0,
                 seed: int = 0):
  """Batcher for a local source, or a seqio task when `source` names one."""
  lengths = dict(feature_lengths or DEFAULT_FEATURE_LENGTHS)
  try:
    examples = sources.load_examples(source)
  except sources.UnknownSourceError as local_error:
    try:
      from t5dual.data import seqio_tasks
    except ImportError:
      raise local_error from None
    return seqio_tasks.SeqioBatcher(source, batch_size, lengths, seed=seed)
  return PairBatcher(examples, tokenizer, batch_size, lengths, num_negatives, seed)
