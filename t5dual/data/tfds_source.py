"""TFDS datasets read by row: training pairs and corpora to export (needs tensorflow-datasets).

A dataset prepared with file_format='array_record' opens as `tfds.data_source`,
a sequence with random access; training reads the rows of step s alone (the
batch is PairBatcher's pure function of (seed, step, shard)), so a run resumed
at step s reads one batch, not s of them, and an export reads one shard of
texts at a time. A dataset in another format (TFRecord) cannot be read by row:
training refuses it with a one-line error saying how to prepare it, and an
export reads it whole, as before.

Source spec (training, `MIXTURE_OR_TASK_NAME`): 'tfds:<name>[:<version>][:<split>]',
e.g. 'tfds:my_pairs:1.0.0:train' (split 'train' by default), whose examples
hold the text features 'query' and 'positive'. The data directory is
$TFDS_DATA_DIR (TFDS's default otherwise); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Optional, Sequence

from t5dual import cli, corpus
from t5dual.data import sources

QUERY_KEY, DOC_KEY = 'query', 'positive'
_VERSION = re.compile(r'^(\d+(\.\d+)*|\*)$')


class TfdsError(cli.UserError):
  """A TFDS dataset that is missing or cannot be read by row."""


def parse_spec(spec: str) -> tuple[str, str]:
  """('name[:version]', split) of 'tfds:<name>[:<version>][:<split>]'."""
  parts = spec[len('tfds:'):].split(':')
  if not parts[0]:
    raise TfdsError(f'{spec!r}: give a dataset name, tfds:<name>[:<version>][:<split>]')
  if len(parts) > 1 and not _VERSION.match(parts[-1]):
    return ':'.join(parts[:-1]), parts[-1]
  return ':'.join(parts), 'train'


def _find_builder(name: str):
  """tfds.builder in $TFDS_DATA_DIR (or TFDS's default); a one-line TfdsError if unknown."""
  import tensorflow_datasets as tfds
  data_dir = os.environ.get('TFDS_DATA_DIR')
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises DatasetNotFoundError, ValueError, ... by cause
    first = (str(e).splitlines() or [type(e).__name__])[0]
    raise TfdsError(f'tfds:{name} (data_dir {data_dir or "TFDS default"}): {first}') from None


def _builder(name: str):
  """The prepared dataset's builder."""
  builder = _find_builder(name)
  if not builder.is_prepared():
    raise TfdsError(f'tfds:{name} is not prepared in {builder.data_dir}; prepare it first '
                    "(tfds build --file_format=array_record)")
  return builder


def random_access(builder) -> bool:
  """Whether the prepared dataset can be opened as a `tfds.data_source`."""
  from tensorflow_datasets.core import file_adapters
  formats = builder.info.available_file_formats() or {builder.info.file_format}
  return bool(set(formats) & set(file_adapters.FileFormat.with_random_access()))


def open_split(name: str, split: str) -> Sequence[dict]:
  """The split as a random-access sequence of example dicts (text features as bytes)."""
  builder = _builder(name)
  if not random_access(builder):
    raise TfdsError(f'tfds:{name} is prepared as {builder.info.file_format.value}, which '
                    "cannot be read by row; prepare it again as array_record (tfds build "
                    "--file_format=array_record, or tfds.builder(name, file_format="
                    "'array_record').download_and_prepare())")
  if split not in builder.info.splits:
    raise TfdsError(f'tfds:{name} has no split {split!r} (splits: '
                    f'{", ".join(sorted(builder.info.splits))})')
  return builder.as_data_source(split=split)


def _text(value, where: str, key: str) -> str:
  if isinstance(value, bytes):
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError:
      raise sources.DataError(f'{where}: feature {key!r} is not valid UTF-8') from None
  if not isinstance(value, str):
    raise sources.DataError(f'{where}: feature {key!r} is {type(value).__name__}, not text')
  return value


def text_id(text: str) -> int:
  """An int32 id shared by identical texts (duplicate masking without a pass over the
  data): 31 bits of the text's BLAKE2b digest."""
  digest = hashlib.blake2b(text.encode('utf-8'), digest_size=4).digest()
  return int.from_bytes(digest, 'little') & 0x7FFFFFFF


class RandomAccessPairs:
  """(query, positive) pairs of a random-access sequence of examples, for PairBatcher.

  `rows(indices)` reads those examples alone; `reads` counts the examples read.
  Identical texts share their query / document id (`text_id`). No hard negatives.
  """

  negatives = None  # PairBatcher only reads them with num_negatives > 0, refused here

  def __init__(self, records: Sequence[dict], name: str, query_key: str = QUERY_KEY,
               doc_key: str = DOC_KEY):
    self.records, self.name, self.query_key, self.doc_key = records, name, query_key, doc_key
    self.reads = 0

  def __len__(self) -> int:
    return len(self.records)

  def rows(self, indices: Sequence[int]) -> sources.PairExamples:
    out = sources.PairExamples([], [], [], [], [], [])
    for i in indices:
      example = self.records[int(i)]
      self.reads += 1
      where = f'{self.name} example {int(i)}'
      for key in (self.query_key, self.doc_key):
        if key not in example:
          raise sources.DataError(f'{where}: no feature {key!r} (features: '
                                  f'{", ".join(sorted(example))})')
      query = _text(example[self.query_key], where, self.query_key).strip()
      positive = _text(example[self.doc_key], where, self.doc_key).strip()
      out.queries.append(query)
      out.positives.append(positive)
      out.negatives.append([])
      out.query_ids.append(text_id(query))
      out.doc_ids.append(text_id(positive))
      out.negative_ids.append([])
    return out


def tfds_pairs(spec: str, num_negatives: int = 0) -> RandomAccessPairs:
  """The pairs of a 'tfds:...' training source, read by row."""
  if num_negatives:
    raise cli.ConfigError(f'num_negatives={num_negatives}: the pairs of {spec} have no hard '
                          'negatives')
  name, split = parse_spec(spec)
  return RandomAccessPairs(open_split(name, split), f'tfds:{name}:{split}')


def tfds_corpus(name: str, split: str, id_field: Optional[str],
                text_fields: Sequence[str]) -> corpus.Corpus:
  """A TFDS split to export: read by row where prepared as array_record, else whole
  (through `tfds.load`, as before)."""
  import tensorflow_datasets as tfds
  label = f'{name}:{split}'
  builder = _find_builder(name)
  if builder.is_prepared() and random_access(builder):
    return corpus.RecordsCorpus(open_split(name, split), id_field, text_fields, label)
  dataset = tfds.load(name, split=split, shuffle_files=False,
                      data_dir=os.environ.get('TFDS_DATA_DIR'))
  return corpus.InMemoryCorpus(*corpus.read_tf_dataset(dataset, id_field, text_fields, label),
                               label)
