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

  examples: sources.PairExamples  # or any sequence of pairs with `rows` (RandomAccessPairs)
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
    self._order = EpochOrder(self.seed, len(self.examples))

  def example_indices(self, step: int, shard_index: int = 0,
                      num_shards: int = 1) -> np.ndarray:
    """Indices of the examples of global batch `step`, slice `shard_index` of `num_shards`
    (partitioning.DataLayout: the rows one data shard of the mesh loads)."""
    return self._order.rows(stream_positions(self.batch_size, step, shard_index, num_shards))

  def _negative_picks(self, step: int, shard_index: int, num_shards: int) -> list:
    """Which negatives each row of the slice takes: drawn for the whole global batch from
    one generator keyed by (seed, step), then sliced, so that a row's negatives are the
    same whatever the number of shards (one process or a pod)."""
    counts = [len(self.examples.negatives[i]) for i in self.example_indices(step)]
    return negative_choices(self.seed, step, counts, self.num_negatives, shard_index, num_shards)

  def batch_spec(self) -> dict:
    """The global batch its `batch` slices make up (`pair_batch_spec`)."""
    return pair_batch_spec(self.batch_size, self.feature_lengths, self.num_negatives)

  def batch(self, step: int, shard_index: int = 0, num_shards: int = 1) -> dict:
    idx = self.example_indices(step, shard_index, num_shards)
    # Only this slice's rows are read: with examples read by row (a TFDS data source)
    # a resumed run reads one batch, not every batch before it.
    ex = self.examples.rows(idx)
    lq, ld = self.feature_lengths['inputs'], self.feature_lengths['targets']
    out = {
        'inputs': self.tokenizer.encode(ex.queries, lq),
        'targets': self.tokenizer.encode(ex.positives, ld),
        'query_ids': np.asarray(ex.query_ids, np.int32),
        'doc_ids': np.asarray(ex.doc_ids, np.int32),
    }
    if self.num_negatives:
      picks = self._negative_picks(step, shard_index, num_shards)
      texts = [negs[k] for negs, ks in zip(ex.negatives, picks) for k in ks]
      out['negative_targets'] = self.tokenizer.encode(texts, ld).reshape(
          len(idx), self.num_negatives, ld)
      out['negative_ids'] = np.asarray(
          [[ids[k] for k in ks] for ids, ks in zip(ex.negative_ids, picks)], np.int32)
    return out


def _rows_per_shard(batch_size: int, num_shards: int) -> int:
  if batch_size % num_shards:
    raise cli.ConfigError(f'batch size {batch_size} is not divisible by the {num_shards} data '
                          'shards of the mesh')
  return batch_size // num_shards


def stream_positions(batch_size: int, step: int, shard_index: int = 0,
                     num_shards: int = 1) -> np.ndarray:
  """Stream positions of global batch `step`, slice `shard_index` of `num_shards`:
  step * B + [k * B / n, (k + 1) * B / n)."""
  per_shard = _rows_per_shard(batch_size, num_shards)
  start = step * batch_size + shard_index * per_shard
  return np.arange(start, start + per_shard)


class EpochOrder:
  """The endless stream over n examples in which epoch e visits them in
  `permutation(seed, e)`: `rows(positions)` are the examples at those stream positions.

  Shared by the in-memory batchers and the store batchers (data/store_batchers.py),
  so both draw the same examples. Holds the permutations of the last few epochs
  (n int64 each: the one O(collection) array a batcher keeps).
  """

  def __init__(self, seed: int, n: int):
    self.seed, self.n = seed, n
    self._perms: dict[int, np.ndarray] = {}

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    return self._perms[epoch]

  def rows(self, positions: np.ndarray) -> np.ndarray:
    epochs = positions // self.n
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):  # a batch spans one epoch, or two at a boundary
      rows = epochs == epoch
      out[rows] = self.permutation(int(epoch))[positions[rows] % self.n]
    return out


def negative_choices(seed: int, step: int, counts, num_negatives: int, shard_index: int = 0,
                     num_shards: int = 1) -> list:
  """Which of its `counts[i]` hard negatives each row of global batch `step` takes
  (indices into the row's negatives), for slice `shard_index` of `num_shards`.

  Drawn for the whole global batch from one generator keyed by (seed, step), then
  sliced, so that a row's negatives are the same whatever the number of shards.
  """
  rng = np.random.default_rng([seed, step, 0, 1])
  picks = [rng.choice(c, num_negatives, replace=c < num_negatives) for c in counts]
  per_shard = len(picks) // num_shards
  return picks[shard_index * per_shard:(shard_index + 1) * per_shard]


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
  """Batcher for a local source, a prepared store ('store:<dir>'), a TFDS dataset
  ('tfds:...', read by row), or a seqio task when `source` names one."""
  lengths = dict(feature_lengths or DEFAULT_FEATURE_LENGTHS)
  if source.startswith('tfds:'):
    from t5dual.data import tfds_source
    return PairBatcher(tfds_source.tfds_pairs(source, num_negatives), tokenizer, batch_size,
                       lengths, num_negatives, seed)
  if source.startswith('store:'):  # a prepared store (data/store.py)
    from t5dual.data import store_batchers
    return store_batchers.pair_batcher(source, tokenizer, batch_size, lengths, num_negatives,
                                       seed)
  try:
    examples = sources.load_examples(source)
  except sources.UnknownSourceError as local_error:
    try:
      from t5dual.data import seqio_tasks
    except ImportError:
      raise local_error from None
    return seqio_tasks.SeqioBatcher(source, batch_size, lengths, seed=seed)
  return PairBatcher(examples, tokenizer, batch_size, lengths, num_negatives, seed)
