"""seqio tasks for dual-encoder training (needs the `seqio` extra: TensorFlow, seqio, TFDS).

A task yields features 'inputs' (query) and 'targets' (document) tokenized with a
`SentencePieceVocabulary`, EOS appended after trimming to TASK_FEATURE_LENGTHS,
no packing, plus 'query_ids' / 'doc_ids' (hashes of the texts) for duplicate
masking. Register tasks from Python or gin, e.g.

  register_pair_task('medquad_train', 'beir:/data/medquad:train', VOCAB)
  register_pair_task('msmarco', 'tfds:beir/msmarco...', VOCAB, query_key=..., doc_key=...)

and train with MIXTURE_OR_TASK_NAME = 'medquad_train'. Token ids equal the
NumPy path's (`vocab.Tokenizer`) for the same vocabulary.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional

import numpy as np
import seqio
import tensorflow as tf

from t5dual import cli
from t5dual.data import sources
from t5dual.vocab import EOS_ID, Tokenizer


def vocabulary(path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """The task vocabulary; T5's public model takes extra_ids=100."""
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def _hash(text: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.strings.to_hash_bucket_fast(text, 2**31 - 1), tf.int32)


def _to_features(ex: dict, query_key: str, doc_key: str) -> dict:
  return {'inputs': ex[query_key], 'targets': ex[doc_key],
          'query_ids': _hash(ex[query_key]), 'doc_ids': _hash(ex[doc_key])}


def _local_source(source: str) -> seqio.DataSource:
  """A seqio source over a local BEIR folder / JSONL file (read once, in memory)."""
  examples = sources.load_examples(source)

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(
        {'query': examples.queries, 'positive': examples.positives})
  return seqio.FunctionDataSource(dataset_fn, splits=['train'],
                                  num_input_examples={'train': len(examples)})


def register_pair_task(name: str, source: str, vocabulary_path: str,
                       query_key: str = 'query', doc_key: str = 'positive',
                       extra_ids: int = 0) -> seqio.Task:
  """Registers (or replaces) a seqio Task of (query, positive document) pairs.

  Args:
    name: task name for MIXTURE_OR_TASK_NAME.
    source: 'beir:<folder>[:split]', 'jsonl:<path>', or 'tfds:<name>' (e.g.
      'tfds:beir/msmarco:1.0.0'; give query_key / doc_key of its features).
    vocabulary_path: SentencePiece model.
  """
  if source.startswith('tfds:'):
    data_source = seqio.TfdsDataSource(tfds_name=source[len('tfds:'):])
  else:
    data_source = _local_source(source)
  vocab = vocabulary(vocabulary_path, extra_ids)
  features = {k: seqio.Feature(vocab, add_eos=True, required=True)
              for k in ('inputs', 'targets')}
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=data_source, output_features=features,
      preprocessors=[
          functools.partial(_map, fn=functools.partial(
              _to_features, query_key=query_key, doc_key=doc_key)),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos_after_trim,
      ])


def _map(dataset, fn):
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# A resumed seqio run re-reads and skips every example before its step (seqio's pipeline
# has no random access: preprocessors may filter or split examples); past this many
# examples per host it is refused. A task module (mixture_or_task_module) may set it.
MAX_SKIPPED_EXAMPLES = 1_000_000


class SeqioBatcher:
  """`batch(step)` over a seqio task, with the PairBatcher's interface.

  The order is fixed by the seed; a resumed run skips the batches already
  seen, so it continues with the same data. Skipping costs reading and
  tokenizing them all again, so resuming past `max_skipped_examples` examples
  (per host) is a one-line ConfigError that says to prepare the task into the
  store (scripts/prepare_data.py), which is read by row.
  """

  def __init__(self, task_name: str, batch_size: int, feature_lengths: dict,
               seed: int = 0, shuffle: bool = True,
               max_skipped_examples: Optional[int] = None):
    self.task = seqio.get_mixture_or_task(task_name)
    self.batch_size, self.lengths = batch_size, dict(feature_lengths)
    self.seed, self.shuffle = seed, shuffle
    self.max_skipped_examples = (MAX_SKIPPED_EXAMPLES if max_skipped_examples is None
                                 else max_skipped_examples)
    self._iter, self._next = None, None

  def _dataset(self, start: int, shard_index: int, num_shards: int):
    per_host = self.batch_size // num_shards
    skipped = start * per_host
    if skipped > self.max_skipped_examples:
      raise cli.ConfigError(
          f'seqio task {self.task.name!r}: resuming at step {start} would re-read and skip '
          f'{skipped:,} examples (limit seqio_tasks.MAX_SKIPPED_EXAMPLES = '
          f'{self.max_skipped_examples:,}); prepare the task into a store '
          f'(scripts/prepare_data.py --source=seqio:{self.task.name} --module=<the module '
          "that registers it>) and train from 'store:<its directory>', which resumes "
          'without re-reading')
    ds = self.task.get_dataset(
        self.lengths, split='train', shuffle=self.shuffle, seed=self.seed, num_epochs=None,
        shard_info=seqio.ShardInfo(shard_index, num_shards), use_cached=False)
    shapes = {'inputs': [self.lengths['inputs']], 'targets': [self.lengths['targets']],
              'query_ids': [], 'doc_ids': []}
    ds = ds.map(lambda ex: {k: ex[k] for k in shapes})
    ds = ds.padded_batch(per_host, padded_shapes=shapes, drop_remainder=True)
    return ds.skip(start).prefetch(2).as_numpy_iterator()

  def batch_spec(self) -> dict:
    """The global batch its `batch` slices make up: pairs without hard negatives."""
    from t5dual.data import pipeline
    return pipeline.pair_batch_spec(self.batch_size, self.lengths)

  def batch(self, step: int, shard_index: int = 0, num_shards: int = 1) -> dict:
    if self._iter is None or step != self._next:
      self._iter = self._dataset(step, shard_index, num_shards)
    self._next = step + 1
    return {k: np.asarray(v, np.int32) for k, v in next(self._iter).items()}


def pair_records(task_name: str, split: str, tokenizer) -> tuple[dict, Iterator[tuple[int, dict]]]:
  """(what identifies the task's split, its (example number, {'query': ids, 'positive':
  ids}) records) for the prepared store (scripts/prepare_data.py --source=seqio:<task>).

  The records are the task's own output, in order (no shuffle, one epoch, no cache):
  every preprocessor runs, 'inputs' is the query's token ids and 'targets' the
  document's, without the EOS that `append_eos_after_trim` adds (the store appends it at
  read time). A store prepared from the task is read by row, so a run trained from it
  resumes at any step without re-reading what came before (`SeqioBatcher` re-reads).
  The task's vocabulary must be `tokenizer`'s (the store records that checksum).
  """
  from t5dual.data import store
  try:
    task = seqio.get_mixture_or_task(task_name)
  except ValueError as e:
    raise sources.UnknownSourceError(
        f'seqio:{task_name}: {(str(e).splitlines() or ["not registered"])[0]} (registered '
        'in the module given with --module?)') from None
  if split not in task.splits:
    raise sources.UnknownSourceError(f'seqio:{task_name} has no split {split!r} (splits: '
                                     f'{", ".join(sorted(task.splits))})')
  features = task.output_features
  missing = [k for k in ('inputs', 'targets') if k not in features]
  if missing:
    raise sources.UnknownSourceError(
        f'seqio:{task_name}: no output feature {missing[0]!r}; a pair task gives the query as '
        "'inputs' and the document as 'targets' (register_pair_task)")
  checked = set()  # both features usually name one file: load it once
  for key in ('inputs', 'targets'):
    path = getattr(features[key].vocabulary, 'sentencepiece_model_file', None)
    if path in checked:
      continue
    if path is None or Tokenizer(path).sha256() != tokenizer.sha256():
      raise store.StoreError(f'seqio:{task_name}: its {key!r} vocabulary ({path}) is not '
                             f'{tokenizer.path} (their checksums differ); prepare with the '
                             "task's vocabulary")
    checked.add(path)
  try:
    examples = task.num_input_examples(split)
  except (ValueError, NotImplementedError, KeyError):
    examples = None
  identity = {'task': task_name, 'split': split, 'input_examples': examples}

  def ids(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.int64)
    return value[:-1] if value.size and value[-1] == EOS_ID else value

  def records():
    ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1, use_cached=False,
                          try_in_mem_cache=False)
    for number, example in enumerate(ds.as_numpy_iterator(), 1):
      yield number, {'query': ids(example['inputs']), 'positive': ids(example['targets'])}
  return identity, records()
