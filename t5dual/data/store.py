"""A prepared store: training data tokenized once, read by index from memory-mapped files.

`prepare(...)` turns a BEIR folder (its training pairs and, with a first-stage run,
reranker training lists, optionally with teacher scores), a JSONL pair file (with
hard negatives), a TFDS dataset of such pairs (`tfds_records`) or a seqio pair task's
output (`seqio_tasks.pair_records`: its token ids, every preprocessor run) into a
directory that any number of hosts read without loading it whole; `Store(path)` opens
it. The batchers over it are in data/store_batchers.py and produce exactly the batches
of pipeline.PairBatcher / lists.ListBatcher.

Why raw arrays and not ArrayRecord (+ Grain): on 1M rows of ~80 ids (BENCHMARKS.md,
"Training data: prepared store vs in memory"), they write 30x faster, are 27% smaller
and read a random batch 7x faster, and a batch here is a pure function of (seed, step,
shard): the index sampler and iterator state Grain provides are the batchers' already.

Layout (every array a raw little-endian file; dtype and length in the manifest):

  plan.json                      what is prepared from (inputs' size/mtime/sha256, the
                                 tokenizer's sha256, max_length, shard_size, list window)
  corpus/tokens-0000k.bin        token ids of rows k*shard_size.., cut at max_length, no EOS
  corpus/offsets-0000k.bin       int64 [rows + 1] into that shard's tokens
  corpus/ids-0000k.txt           the rows' ids, one per line
  corpus/shard-0000k.json        written last: the shard is complete (sizes, sha256)
  queries/...                    the same for queries
  pairs/*.bin                    per training pair: query_row, doc_row, query_id, doc_id
                                 (the in-memory batcher's duplicate-masking ids),
                                 neg_offsets [pairs + 1] into neg_rows / neg_ids
  lists/*.bin                    per training list: query_row, pos_offsets into pos_rows,
                                 pos_labels (, pos_teacher); neg_start, neg_count into
                                 neg_rows, neg_scores (first-stage scores, rank order)
                                 (, neg_teacher): the run's window, judged documents and
                                 documents without a teacher score left out
  lists/<array>-0000k.bin        while preparing: shard k of the pass over the run
                                 (removed once the lists are complete)
  lists/teacher-*.bin            while preparing, with a teacher: its scores, per query
                                 by document row (teacher.json written last; removed
                                 once the lists are complete)
  <part>/done.json               the part (pairs, lists) is complete
  manifest.json                  written last: plan, counts, every file's bytes and sha256

Token ids are uint16 where the vocabulary fits, else int32. A row is cut at read time to
`length - 1` ids and EOS appended, which is `Tokenizer.encode` for any length up to
max_length + 1. Every file is written under a temporary name and renamed, and shard
records come after their files, so an interrupted prepare continues from the last
complete shard (of the corpus, the queries, the run) and ends with the same store.
Opening checks every file's size (and with verify=True its sha256), the tokenizer, and
the inputs where they are still present: a damaged or stale store is one line naming the
file.

What prepare holds in memory (figures for MS MARCO: 8.8M passages, 503k training
queries, a depth-1000 run of 503M lines): one shard of texts and their token ids as
Python lists (2^18 rows: most of the 1.1 GiB peak measured at 1/10 scale, BENCHMARKS.md),
the documents' ids as an arrow array with a hash index (data/store_runs.py, ~30 bytes an
id: 0.3 GB, 0.7 GB peak while 8.8M are indexed), the queries' id -> row dict and the qrels
(~0.1 GB), per pair a few integers (JSONL: a 12-byte digest per distinct text), one block
of the run (~1M lines, ~0.1 GB) and the negatives of one shard of it (8 bytes an entry
kept: <= 16M entries), and with a teacher 12 bytes a query (20 while it is read: 10 MB)
and one block of it (TREC: ~1M lines; JSONL: store_runs.TEACHER_CHUNK scores, ~30 MB):
its scores go to lists/teacher-*.bin in one pass (8 bytes a score on disk, 4 GB for a
depth-1000 teacher; removed with the run's shards) and are looked up there. Never texts
beyond one shard, never more of the run or the teacher than one shard or block. The run
is parsed in vectorised blocks (store_runs.run_groups: 0.5 us a line at 1/10 scale, the
Python pass it replaced 2.3); each query's lines must be together (in the run and in a
TREC teacher), as TREC runs are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import string
import time
from typing import Callable, Iterator, Optional

import numpy as np

from t5dual import cli, fileio
from t5dual.data import sources, store_runs
from t5dual.vocab import EOS_ID

log = logging.getLogger(__name__)

FORMAT = 't5dual.store/1'
PLAN = 'plan.json'
MANIFEST = 'manifest.json'
DEFAULT_SHARD_SIZE = 1 << 18
DEFAULT_MAX_LENGTH = 512
TABLES = ('corpus', 'queries')


class StoreError(sources.DataError):
  """A store that is incomplete, damaged, stale, or prepared for something else."""


# --------------------------------------------------------------------------- files

_sha256_file = fileio.sha256_file


def _write_json(path: str, obj: dict) -> None:
  fileio.write_json(path, obj, indent=1, sort_keys=True)


def _read_json(path: str) -> dict:
  return fileio.read_json(path, StoreError)


def _write_atomic(path: str, data: bytes) -> None:
  with fileio.atomic_write(path, 'wb') as f:
    f.write(data)


def _file_record(path: str, dtype: Optional[str] = None) -> dict:
  record = {'bytes': os.path.getsize(path), 'sha256': _sha256_file(path)}
  if dtype is not None:
    record['dtype'] = dtype
  return record


class _Arrays:
  """Raw array files of one part, appended to in chunks and renamed when complete."""

  def __init__(self, folder: str, dtypes: dict):
    self.folder, self.dtypes = folder, dtypes
    os.makedirs(folder, exist_ok=True)
    self._files = {name: open(os.path.join(folder, name + '.bin.tmp'), 'wb') for name in dtypes}

  def append(self, name: str, values) -> None:
    self._files[name].write(np.asarray(values, self.dtypes[name]).tobytes())

  def append_file(self, name: str, path: str) -> None:
    with open(path, 'rb') as f:
      shutil.copyfileobj(f, self._files[name], 1 << 24)

  def close(self) -> dict:
    records = {}
    for name, f in self._files.items():
      f.flush()
      os.fsync(f.fileno())
      f.close()
      path = os.path.join(self.folder, name + '.bin')
      os.replace(path + '.tmp', path)
      records[name + '.bin'] = _file_record(path, self.dtypes[name])
    return records


def fingerprint(path: str) -> dict:
  """What the store remembers of an input file: where, size, mtime and sha256."""
  stat = os.stat(path)
  return {'path': os.path.abspath(path), 'bytes': stat.st_size,
          'mtime_ns': stat.st_mtime_ns, 'sha256': _sha256_file(path)}


# --------------------------------------------------------------------------- token tables

def token_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 1 << 16 else 'int32'


def _shard_tag(k: int) -> str:
  return f'{k:05d}'


class _TableWriter:
  """Rows (id, text) of a table, tokenized and written shard by shard.

  A shard whose record exists is not tokenized again: its rows are only counted, so a
  resumed prepare reads its input from the start but does the work only once.
  """

  def __init__(self, folder: str, tokenizer, max_length: int, shard_size: int,
               progress: Optional[Callable[[str], None]] = None):
    self.folder, self.tokenizer = folder, tokenizer
    self.max_length, self.shard_size = max_length, shard_size
    self.dtype = token_dtype(tokenizer.vocab_size)
    self.progress = progress
    self.rows = 0
    self.shards: list[dict] = []
    self._ids: list[str] = []
    self._texts: list[str] = []
    os.makedirs(folder, exist_ok=True)

  def add(self, row_id: str, text) -> int:
    """Appends a row (a text, or its token ids without EOS); returns its row number."""
    self._ids.append(row_id)
    self._texts.append(text)
    self.rows += 1
    if len(self._ids) == self.shard_size:
      self._flush()
    return self.rows - 1

  def _flush(self) -> None:
    k = len(self.shards)
    tag = _shard_tag(k)
    record_path = os.path.join(self.folder, f'shard-{tag}.json')
    record = _complete_record(record_path)  # None: absent, or a file went missing
    if record is not None:
      if record.get('rows') != len(self._ids):
        raise StoreError(f'{record_path}: {record.get("rows")} rows, but the input now gives '
                         f'{len(self._ids)} for this shard; prepare into a new directory')
    else:
      encoded = iter(self.tokenizer.encode_ids(
          [t for t in self._texts if isinstance(t, str)], self.max_length))
      ids = [next(encoded) if isinstance(t, str) else t[:self.max_length]
             for t in self._texts]
      lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
      offsets = np.zeros(len(ids) + 1, np.int64)
      np.cumsum(lengths, out=offsets[1:])
      tokens = np.fromiter((t for x in ids for t in x), self.dtype, int(offsets[-1]))
      files = {f'tokens-{tag}.bin': tokens.tobytes(), f'offsets-{tag}.bin': offsets.tobytes(),
               f'ids-{tag}.txt': ''.join(i + '\n' for i in self._ids).encode('utf-8')}
      record = {'rows': len(self._ids), 'tokens': int(offsets[-1]), 'files': {}}
      for name, data in files.items():
        path = os.path.join(self.folder, name)
        _write_atomic(path, data)
        record['files'][name] = {'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
      _write_json(record_path, record)
      if self.progress:
        self.progress(f'{os.path.basename(self.folder)}: shard {k} ({self.rows} rows)')
    self.shards.append(record)
    self._ids, self._texts = [], []

  def close(self) -> dict:
    if self._ids or not self.shards:
      self._flush()
    return {'rows': self.rows, 'dtype': self.dtype, 'num_shards': len(self.shards),
            'tokens': sum(s['tokens'] for s in self.shards)}


class TokenTable:
  """Memory-mapped token rows of a table: `gather(rows, length)` -> [n, length] int32."""

  def __init__(self, folder: str, meta: dict, shard_size: int):
    self.rows, self.shard_size = meta['rows'], shard_size
    dtype = np.dtype(meta['dtype'])
    self._tokens, self._offsets = [], []
    for k in range(meta['num_shards']):
      tag = _shard_tag(k)
      self._tokens.append(_memmap(os.path.join(folder, f'tokens-{tag}.bin'), dtype))
      self._offsets.append(_memmap(os.path.join(folder, f'offsets-{tag}.bin'), np.int64))

  def __len__(self) -> int:
    return self.rows

  def pieces(self, rows) -> list[np.ndarray]:
    """The stored ids of each row (at most max_length, no EOS)."""
    out = []
    for row in np.asarray(rows, np.int64).tolist():
      k, local = divmod(row, self.shard_size)
      off = self._offsets[k]
      out.append(np.asarray(self._tokens[k][off[local]:off[local + 1]]))
    return out

  def gather(self, rows, length: int) -> np.ndarray:
    """[len(rows), length] int32: each row's ids cut at length - 1, EOS, 0-padded
    (`Tokenizer.encode` of its text, for length <= max_length + 1)."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    out = np.zeros((len(rows), length), np.int32)
    shard, local = np.divmod(rows, self.shard_size)
    cols = np.arange(length - 1)
    for k in np.unique(shard).tolist():
      sel = np.nonzero(shard == k)[0]
      off = self._offsets[k]
      start, end = off[local[sel]], off[local[sel] + 1]
      count = np.minimum(end - start, length - 1)
      keep = cols[None, :] < count[:, None]
      if self._tokens[k].size:
        index = np.where(keep, start[:, None] + cols[None, :], 0)
        out[sel, :length - 1] = np.where(keep, self._tokens[k][index], 0)
      out[sel, count] = EOS_ID
    return out


def _memmap(path: str, dtype) -> np.ndarray:
  if not os.path.getsize(path):
    return np.zeros(0, dtype)
  return np.memmap(path, dtype=dtype, mode='r')


# --------------------------------------------------------------------------- templates

def template_pieces(template: str) -> tuple[list[str], list[str]]:
  """(literals, fields) of a reranker template: literal[0] field[0] literal[1] ... literal[-1].

  The store assembles a reranker input from the separately tokenized literals and the
  stored query and document ids. That equals tokenizing the filled template because
  SentencePiece (split_by_whitespace, as T5's model and the test models have) never
  makes a piece across whitespace and collapses repeated whitespace: so each field must
  be set off by whitespace or the template's ends. ValueError otherwise.
  """
  literals, fields = [''], []
  for literal, field, spec, conv in string.Formatter().parse(template):
    literals[-1] += literal
    if field is not None:
      if field not in ('query', 'document') or spec or conv:
        raise ValueError(f'template {template!r}: only {{query}} and {{document}} fields')
      fields.append(field)
      literals.append('')
  for i, field in enumerate(fields):
    before, after = literals[i], literals[i + 1]
    if (before and not before[-1].isspace()) or (after and not after[0].isspace()):
      raise ValueError(f'template {template!r}: a prepared store needs whitespace (or the '
                       f'template\'s start or end) on both sides of {{{field}}}, since it '
                       'joins separately tokenized pieces; add spaces, or train from beir:')
  return literals, fields


# --------------------------------------------------------------------------- prepare

@dataclasses.dataclass(frozen=True)
class ListOptions:
  """The reranker training lists a store holds (data/lists.py: the same selection)."""

  run: str
  min_rank: int = 1
  max_rank: int = 100
  min_relevance: int = 1
  teacher: Optional[str] = None

  def __post_init__(self):
    if not 1 <= self.min_rank <= self.max_rank:
      raise cli.ConfigError(f'rank window must satisfy 1 <= min_rank <= max_rank, got '
                            f'[{self.min_rank}, {self.max_rank}]')
    if self.min_relevance < 1:
      raise cli.ConfigError(f'min_relevance must be >= 1, got {self.min_relevance}')


def parse_source(source: str) -> tuple[str, str, str]:
  """(source_kind, path, split) of 'beir:<folder>[:<split>]', 'jsonl:<path>',
  'tfds:<name>[:<version>][:<split>]', 'seqio:<task>[:<split>]' or a bare path."""
  source_kind, _, rest = source.partition(':')
  if source_kind == 'beir':
    folder, _, split = rest.partition(':')
    return 'beir', folder, split or 'train'
  if source_kind == 'jsonl':
    return 'jsonl', rest, ''
  if source_kind == 'tfds':
    name, split = tfds_spec(source)
    return 'tfds', name, split
  if source_kind == 'seqio':
    name, _, split = rest.partition(':')
    if not name:
      raise sources.UnknownSourceError(f'{source!r}: give a task name, '
                                       'seqio:<task>[:<split>]')
    return 'seqio', name, split or 'train'
  if os.path.isdir(source):
    return 'beir', source, 'train'
  if os.path.isfile(source):
    return 'jsonl', source, ''
  raise sources.UnknownSourceError(f'{source!r}: prepare reads beir:<folder>[:<split>], '
                                   'jsonl:<path>, tfds:<name>[:<version>][:<split>] or '
                                   'seqio:<task>[:<split>]')


_TFDS_VERSION = re.compile(r'^(\d+(\.\d+)*|\*)$')


def tfds_spec(source: str) -> tuple[str, str]:
  """('name[:version]', split) of 'tfds:<name>[:<version>][:<split>]' (split: train),
  as the tfds: training source reads it."""
  parts = source[len('tfds:'):].split(':')
  if not parts[0]:
    raise sources.UnknownSourceError(f'{source!r}: give a dataset name, '
                                     'tfds:<name>[:<version>][:<split>]')
  if len(parts) > 1 and not _TFDS_VERSION.match(parts[-1]):
    return ':'.join(parts[:-1]), parts[-1]
  return ':'.join(parts), 'train'


def tfds_records(name: str, split: str) -> tuple[dict, Iterator[tuple[int, dict]]]:
  """(what identifies the split, its (example number, {"query", "positive",
  "negatives"?}) records) of a prepared TFDS dataset in $TFDS_DATA_DIR, for prepare's
  pairs: text features named as the tfds: training source names them ('query',
  'positive'), and 'negatives' (a sequence of texts) for hard negatives. Read in order,
  one example at a time: by row where prepared as array_record (no TensorFlow),
  else through tf.data."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import file_adapters
  data_dir = os.environ.get('TFDS_DATA_DIR')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, ValueError, ... by cause
    first = (str(e).splitlines() or [type(e).__name__])[0]
    raise sources.UnknownSourceError(f'tfds:{name} (data_dir {data_dir or "TFDS default"}): '
                                     f'{first}') from None
  if not builder.is_prepared():
    raise sources.UnknownSourceError(f'tfds:{name} is not prepared in {builder.data_dir}; '
                                     'prepare it first (tfds build)')
  if split not in builder.info.splits:
    raise sources.UnknownSourceError(f'tfds:{name} has no split {split!r} (splits: '
                                     f'{", ".join(sorted(builder.info.splits))})')
  identity = {'name': builder.info.full_name, 'split': split,
              'examples': builder.info.splits[split].num_examples}
  formats = builder.info.available_file_formats() or {builder.info.file_format}
  if set(formats) & set(file_adapters.FileFormat.with_random_access()):
    examples = builder.as_data_source(split=split)
  else:
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))

  def text(value):
    return value.decode('utf-8') if isinstance(value, bytes) else value

  def records():
    for number, example in enumerate(examples, 1):
      record = {k: text(example[k]) for k in ('query', 'positive') if k in example}
      if 'negatives' in example:
        record['negatives'] = [text(v) for v in list(example['negatives'])]
      yield number, record
  return identity, records()


def _inputs(source_kind: str, path: str, split: str, lists: Optional[ListOptions]) -> list[str]:
  if source_kind in ('tfds', 'seqio'):  # the plan names the dataset or task instead
    files = []
  elif source_kind == 'jsonl':
    files = [path]
  else:
    files = [os.path.join(path, 'corpus.jsonl'), os.path.join(path, 'queries.jsonl'),
             sources.qrels_path(path, split)]
  if lists is not None:
    files += [lists.run] + ([lists.teacher] if lists.teacher else [])
  for f in files:
    if not os.path.isfile(f):
      raise StoreError(f'{f}: file not found')
  return files


def make_plan(source: str, tokenizer, max_length: int = DEFAULT_MAX_LENGTH,
              shard_size: int = DEFAULT_SHARD_SIZE, lists: Optional[ListOptions] = None) -> dict:
  source_kind, path, split = parse_source(source)
  if source_kind != 'beir' and lists is not None:
    raise cli.ConfigError('training lists come from a BEIR folder (its qrels) and a run, '
                          f'not from a {source_kind} pair source')
  if max_length < 1 or shard_size < 1:
    raise cli.ConfigError(f'max_length and shard_size must be positive, got {max_length}, '
                          f'{shard_size}')
  plan = {'format': FORMAT, 'kind': source_kind, 'split': split,
          'inputs': [fingerprint(f) for f in _inputs(source_kind, path, split, lists)],
          'tokenizer': {'path': tokenizer.path, 'sha256': tokenizer.sha256(),
                        'vocab_size': tokenizer.vocab_size},
          'max_length': max_length, 'shard_size': shard_size,
          'lists': None if lists is None else dict(
              dataclasses.asdict(lists), run=os.path.abspath(lists.run),
              teacher=lists.teacher and os.path.abspath(lists.teacher))}
  if source_kind == 'tfds':
    plan['tfds'] = tfds_records(path, split)[0]
  if source_kind == 'seqio':
    plan['seqio'] = _seqio_records(path, split, tokenizer)[0]
  return plan


def _seqio_records(task_name: str, split: str, tokenizer):
  try:
    from t5dual.data import seqio_tasks
  except ImportError as e:
    raise cli.ConfigError(f'seqio:{task_name} needs the seqio extra (pip install -e '
                          f'.[seqio]): {e}') from None
  return seqio_tasks.pair_records(task_name, split, tokenizer)


def _check_plan(out_dir: str, plan: dict) -> None:
  diff = fileio.write_or_compare_json(os.path.join(out_dir, PLAN), plan, error=StoreError)
  if diff:
    raise StoreError(f'{out_dir} holds a store prepared from something else (differs in: '
                     f'{", ".join(diff)}); use a new directory or delete it')


def prepare(source: str, out_dir: str, tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH,
            shard_size: int = DEFAULT_SHARD_SIZE, lists: Optional[ListOptions] = None,
            progress: Optional[Callable[[str], None]] = None,
            _after_shard: Optional[Callable[[], None]] = None) -> dict:
  """Prepares (or finishes preparing) the store of `source` in `out_dir`; returns the manifest.

  source: 'beir:<folder>[:<split>]' (pairs of the split's qrels; with `lists`, reranker
  lists from a first-stage run) or 'jsonl:<path>' (pairs with hard negatives).
  """
  plan = make_plan(source, tokenizer, max_length, shard_size, lists)
  _check_plan(out_dir, plan)
  if os.path.exists(os.path.join(out_dir, MANIFEST)):
    log.info('%s: already prepared', out_dir)
    return Store(out_dir, tokenizer).manifest
  say = progress or (lambda msg: log.info('%s', msg))
  started = time.time()

  def table(name):
    writer = _TableWriter(os.path.join(out_dir, name), tokenizer, max_length, shard_size, say)
    if _after_shard is not None:
      flush = writer._flush

      def flush_then_hook():
        flush()
        _after_shard()
      writer._flush = flush_then_hook
    return writer

  source_kind, path, split = parse_source(source)
  corpus, queries = table('corpus'), table('queries')
  if source_kind in ('jsonl', 'tfds', 'seqio'):
    if source_kind == 'jsonl':
      name, records = path, sources.iter_jsonl(path)
    elif source_kind == 'tfds':
      name, records = f'tfds:{path}:{split} example', tfds_records(path, split)[1]
    else:
      name, records = f'seqio:{path}:{split} example', _seqio_records(path, split, tokenizer)[1]
    pairs = _prepare_pairs(name, records, out_dir, corpus, queries,
                           tokenized=source_kind == 'seqio')
    meta = {'corpus': corpus.close(), 'queries': queries.close()}
  else:
    # Document ids as arrow arrays, then a hash index (~30 bytes an id, not a dict's
    # ~120); duplicates are found there, and named by a second, checking read.
    doc_ids = store_runs.IdCollector()
    for doc_id, text in sources.iter_beir_corpus(path, check_unique=False):
      corpus.add(doc_id, text)
      doc_ids.add(doc_id)
    try:
      doc_rows = doc_ids.index()
    except store_runs.DuplicateIdError:
      for _ in sources.iter_beir_corpus(path):  # raises the DataError naming both lines
        pass
      raise
    query_rows, query_texts = {}, {}
    for qid, text in sources.iter_beir_queries(path):
      query_rows[qid] = queries.add(qid, text)
      query_texts[qid] = hashlib.blake2b(text.encode(), digest_size=8).digest()
    meta = {'corpus': corpus.close(), 'queries': queries.close()}
    pairs = _prepare_beir_pairs(path, split, out_dir, doc_rows, query_rows, query_texts)
    if lists is not None:
      meta['lists'] = _prepare_lists(path, split, out_dir, doc_rows, query_rows, lists,
                                     shard_size, say, _after_shard)
  meta['pairs'] = pairs
  files = {}
  for name in TABLES:
    for k in range(meta[name]['num_shards']):
      record = _read_json(os.path.join(out_dir, name, f'shard-{_shard_tag(k)}.json'))
      dtypes = {'tokens': meta[name]['dtype'], 'offsets': 'int64'}
      for fname, rec in record['files'].items():
        dtype = dtypes.get(fname.split('-')[0])
        files[f'{name}/{fname}'] = dict(rec, **({'dtype': dtype} if dtype else {}))
  for part in ('pairs', 'lists'):
    done = os.path.join(out_dir, part, 'done.json')
    if os.path.exists(done):
      for fname, rec in _read_json(done)['files'].items():
        files[f'{part}/{fname}'] = rec
  manifest = dict(plan, counts=meta, files=files)
  _write_json(os.path.join(out_dir, MANIFEST), manifest)
  say(f'{out_dir}: prepared in {time.time() - started:.0f} s, '
      f'{sum(f["bytes"] for f in files.values()) / 2**20:.1f} MiB')
  return manifest


def _part_done(out_dir: str, part: str) -> Optional[dict]:
  path = os.path.join(out_dir, part, 'done.json')
  return _read_json(path)['meta'] if os.path.exists(path) else None


def _finish_part(out_dir: str, part: str, arrays: _Arrays, meta: dict) -> dict:
  _write_json(os.path.join(out_dir, part, 'done.json'), {'files': arrays.close(), 'meta': meta})
  return meta


_PAIR_DTYPES = {'query_row': 'int32', 'doc_row': 'int32', 'query_id': 'int32',
                'doc_id': 'int32', 'neg_offsets': 'int64', 'neg_rows': 'int32',
                'neg_ids': 'int32'}


def _prepare_beir_pairs(folder, split, out_dir, doc_rows, query_rows, query_texts) -> dict:
  """The positive pairs of sources.beir_pairs, in its order and with its ids."""
  done = _part_done(out_dir, 'pairs')
  if done is not None:
    return done
  path = sources.qrels_path(folder, split)
  arrays = _Arrays(os.path.join(out_dir, 'pairs'), _PAIR_DTYPES)
  q_intern, d_intern = sources._Interner(), sources._Interner()
  cols = {k: [] for k in ('query_row', 'doc_row', 'query_id', 'doc_id')}
  missing = {}
  skipped = 0
  for lineno, qid, did, score in sources._qrels_rows(path):
    if qid not in query_rows:
      raise sources.DataError(f'{path}:{lineno}: query id {qid!r} is not in queries.jsonl')
    if score < 1:
      continue
    if did not in doc_rows:
      missing.setdefault(did, lineno)
      skipped += 1
      continue
    cols['query_row'].append(query_rows[qid])
    cols['doc_row'].append(doc_rows[did])
    cols['query_id'].append(q_intern(query_texts[qid]))  # by text, as beir_pairs
    cols['doc_id'].append(d_intern(did))
  sources.warn_missing_documents(path, [f'{d!r} on line {n}' for d, n in missing.items()],
                                 skipped, 'those pairs are skipped')
  if not cols['query_row']:
    raise sources.DataError(f'{path}: no positive pairs (score >= 1) with a document in '
                            'corpus.jsonl')
  for k, v in cols.items():
    arrays.append(k, v)
  n = len(cols['query_row'])
  arrays.append('neg_offsets', np.zeros(n + 1, np.int64))
  return _finish_part(out_dir, 'pairs', arrays, {'rows': n, 'without_negatives': n,
                                                 'first_without_negatives': 0})


def _prepare_pairs(path: str, records: Iterator[tuple[int, dict]], out_dir: str,
                   corpus: _TableWriter, queries: _TableWriter, tokenized: bool = False
                   ) -> dict:
  """Pairs of sources.jsonl_pairs from (line, {"query", "positive", "negatives"?}) records
  (a JSONL file's, or any source's turned into such records, e.g. TFDS): the corpus is the
  distinct document texts (positives and negatives, ids by text as jsonl_pairs gives
  them), the queries the distinct query texts. `path` names the source in errors.
  tokenized: the records hold token ids (arrays, no EOS) instead of texts (a seqio
  task's output); rows are then the distinct id sequences."""
  done = _part_done(out_dir, 'pairs')
  arrays = None if done is not None else _Arrays(os.path.join(out_dir, 'pairs'), _PAIR_DTYPES)
  q_rows, d_rows = {}, {}
  cols = {k: [] for k in ('query_row', 'doc_row', 'neg_rows')}
  neg_offsets = [0]
  without, first_without = 0, -1

  def row(rows, writer, text):
    key = hashlib.blake2b(text.tobytes() if tokenized else text.encode(),
                          digest_size=12).digest()
    if key not in rows:
      rows[key] = writer.add(str(len(rows)), text)
    return rows[key]

  for lineno, rec in records:
    if tokenized:
      query, positive = rec['query'], rec['positive']
    else:
      query = sources._field(rec, 'query', path, lineno, allow_empty=True).strip()
      positive = sources._field(rec, 'positive', path, lineno, allow_empty=True).strip()
    negatives = rec.get('negatives', [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
      raise sources.DataError(f'{path}:{lineno}: "negatives" must be a list of strings')
    if not negatives:
      without += 1
      if first_without < 0:
        first_without = len(cols['query_row'])
    cols['query_row'].append(row(q_rows, queries, query))
    cols['doc_row'].append(row(d_rows, corpus, positive))
    cols['neg_rows'].extend(row(d_rows, corpus, n.strip()) for n in negatives)
    neg_offsets.append(len(cols['neg_rows']))
  if not cols['query_row']:
    raise sources.DataError(f'{path}: no examples')
  if done is not None:
    return done
  for k, v in cols.items():
    arrays.append(k, v)
  arrays.append('query_id', cols['query_row'])  # rows are the ids by text
  arrays.append('doc_id', cols['doc_row'])
  arrays.append('neg_ids', cols['neg_rows'])
  arrays.append('neg_offsets', neg_offsets)
  return _finish_part(out_dir, 'pairs', arrays,
                      {'rows': len(cols['query_row']), 'without_negatives': without,
                       'first_without_negatives': first_without})


_LIST_DTYPES = {'query_row': 'int32', 'pos_offsets': 'int64', 'pos_rows': 'int32',
                'pos_labels': 'float32', 'pos_teacher': 'float32', 'neg_start': 'int64',
                'neg_count': 'int32', 'neg_rows': 'int32', 'neg_scores': 'float32',
                'neg_teacher': 'float32'}


def _prepare_lists(folder, split, out_dir, doc_rows, query_rows, options: ListOptions,
                   shard_size, say, after_shard) -> dict:
  """The lists of lists.load_lists: same queries, order, positives, negatives, teacher."""
  from t5dual.data import lists as lists_lib
  done = _part_done(out_dir, 'lists')
  if done is not None:
    _remove_run_shards(out_dir)  # stopped after done.json, before removing them
    return done
  qrels_file = sources.qrels_path(folder, split)
  qrels = {q: {doc_rows[d]: rel for d, rel in judged.items()}
           for q, judged in lists_lib.read_qrels(qrels_file, query_rows, doc_rows).items()}
  teacher = None
  if options.teacher:
    teacher = _teacher_scores(out_dir, options.teacher, query_rows, doc_rows, say)
  dtypes = dict(_LIST_DTYPES)
  if teacher is None:
    del dtypes['pos_teacher'], dtypes['neg_teacher']
  shards = _run_shards(out_dir, options, query_rows, doc_rows, qrels, teacher, shard_size,
                       say, after_shard)
  folder = os.path.join(out_dir, 'lists')
  arrays = _Arrays(folder, dtypes)
  def read(name):  # an int32 array of the run's shards, whole: a few per query of the run
    return np.concatenate([np.fromfile(os.path.join(folder, f'{name}-{_shard_tag(k)}.bin'),
                                       np.int32) for k in range(len(shards))])
  run_rows, counts = read('queries'), read('counts').astype(np.int64)
  starts = np.cumsum(counts) - counts
  # query row -> (start, count) in neg_rows: the run's queries with a judgement.
  negatives = {r: (s, c) for r, s, c in zip(run_rows.tolist(), starts.tolist(),
                                            counts.tolist()) if c}
  for name in dtypes:
    if name.startswith('neg_') and name not in ('neg_start', 'neg_count'):
      for k in range(len(shards)):
        arrays.append_file(name, os.path.join(folder, f'{name}-{_shard_tag(k)}.bin'))
  total = int(counts.sum())
  judged_rows = {query_rows[q] for q in qrels}
  skipped = {'no positive': len(set(run_rows.tolist()) - judged_rows),  # run-only queries
             'no negative in the rank window': 0, 'no teacher score for a positive': 0}
  pos_offsets, count = [0], 0
  def positives_of(qid):
    return [(r, float(rel)) for r, rel in qrels[qid].items() if rel >= options.min_relevance]
  if teacher is not None:  # every positive's teacher score in one lookup, in the loop's order
    wanted = np.asarray([(query_rows[qid], r) for qid in qrels for r, _ in positives_of(qid)],
                        np.int64).reshape(-1, 2)
    found, values = teacher.lookup(wanted[:, 0], wanted[:, 1])
    visited = 0
  for qid in qrels:
    positives = positives_of(qid)
    if not positives:
      skipped['no positive'] += 1
      continue
    known = None
    if teacher is not None:  # positives -> their teacher scores
      seen = slice(visited, visited + len(positives))
      visited += len(positives)
      known = {r: float(v) for (r, _), f, v in zip(positives, found[seen].tolist(),
                                                   values[seen].tolist()) if f}
      positives = [(r, rel) for r, rel in positives if r in known]
      if not positives:
        skipped['no teacher score for a positive'] += 1
        continue
    start, n_neg = negatives.get(query_rows[qid], (0, 0))
    if not n_neg:
      skipped['no negative in the rank window'] += 1
      continue
    arrays.append('query_row', [query_rows[qid]])
    arrays.append('pos_rows', [r for r, _ in positives])
    arrays.append('pos_labels', [y for _, y in positives])
    if known is not None:
      arrays.append('pos_teacher', [known[r] for r, _ in positives])
    pos_offsets.append(pos_offsets[-1] + len(positives))
    arrays.append('neg_start', [start])
    arrays.append('neg_count', [n_neg])
    count += 1
  arrays.append('pos_offsets', pos_offsets)
  skipped = {k: v for k, v in skipped.items() if v}
  source = f'{options.run} + {qrels_file}'
  if skipped:
    log.warning('%s: skipped %d queries (%s); %d lists remain', source, sum(skipped.values()),
                ', '.join(f'{v} with {k}' for k, v in skipped.items()), count)
  if not count:
    shutil.rmtree(os.path.join(out_dir, 'lists'))
    raise sources.DataError(f'{source}: no query has both a positive and a negative in '
                            f'ranks [{options.min_rank}, {options.max_rank}] ({skipped})')
  meta = _finish_part(out_dir, 'lists', arrays, {'rows': count, 'negatives': total,
                                                  'teacher': teacher is not None,
                                                  'skipped': skipped})
  _remove_run_shards(out_dir)
  return meta


_RUN_SHARD_FILES = ('queries', 'counts', 'neg_rows', 'neg_scores', 'neg_teacher', 'shard')
_TEACHER_RECORD = 'teacher.json'


def _remove_run_shards(out_dir: str) -> None:
  """The run's shards and the teacher's files, once the lists are complete (done.json)."""
  folder = os.path.join(out_dir, 'lists')
  for name in os.listdir(folder):
    if ((name.split('-')[0] in _RUN_SHARD_FILES and name.split('-')[-1][:5].isdigit())
        or name.split('.')[0] in store_runs.TEACHER_FILES
        or name.startswith(_TEACHER_RECORD)):
      os.remove(os.path.join(folder, name))


def _teacher_scores(out_dir, path, query_rows, doc_rows, say) -> store_runs.TeacherScores:
  """The teacher's scores on disk in lists/teacher-*.bin (store_runs.write_teacher),
  kept until the lists are complete. A resumed prepare reuses them where their record
  lists/teacher.json (written last) says they are complete, else reads the teacher
  again: that pass is one read of its file, short beside the run's."""
  folder = os.path.join(out_dir, 'lists')
  os.makedirs(folder, exist_ok=True)
  record_path = os.path.join(folder, _TEACHER_RECORD)
  if _complete_record(record_path) is None:
    files = store_runs.write_teacher(path, folder, query_rows, doc_rows)
    _write_json(record_path, {'files': files})
    say(f'lists: teacher {path} ({files["teacher-docs.bin"]["bytes"] // 4} scores)')
  return store_runs.TeacherScores(folder)


def _run_shards(out_dir, options, query_rows, doc_rows, qrels, teacher, shard_size, say,
                after_shard) -> list[dict]:
  """One pass over the run, cut every max(1, shard_size // 16) queries (a depth-1000 run:
  16M entries a shard at the default) into lists/<array>-0000k.bin: per run query its
  row ('queries') and how many negatives it keeps ('counts'), and those negatives'
  rows, first-stage scores and teacher scores. Shards whose record exists are kept, and
  the run is read on from the line after them.

  The run is read in vectorised blocks (data/store_runs.py); what a query keeps is
  decided for a block's queries at once: the rank window, not judged relevant
  (qrels > 0) for a query with judgements, and, with a teacher, scored by it."""
  folder = os.path.join(out_dir, 'lists')
  os.makedirs(folder, exist_ok=True)
  names = {'neg_rows': np.int32, 'neg_scores': np.float32}
  if teacher is not None:
    names['neg_teacher'] = np.float32
  shards = []
  while True:
    record = _complete_record(os.path.join(folder, f'shard-{_shard_tag(len(shards))}.json'))
    if record is None:
      break
    shards.append(record)
  seen = np.concatenate([np.zeros(0, np.int32)] + [np.fromfile(
      os.path.join(folder, f'queries-{_shard_tag(k)}.bin'), np.int32)
      for k in range(len(shards))])
  num_docs, num_queries = max(1, len(doc_rows)), len(query_rows)
  judged = np.zeros(num_queries, bool)
  judged[[query_rows[q] for q in qrels]] = True
  relevant = [(query_rows[q], r) for q, docs in qrels.items() for r, rel in docs.items()
              if rel > 0]
  relevant, _ = store_runs.sorted_keys([q for q, _ in relevant], [r for _, r in relevant],
                                       np.zeros(len(relevant)), num_docs)
  per_shard = max(1, shard_size // 16)
  # Queries read but not yet in a shard: per query its row, kept count and last line,
  # and the kept negatives' arrays, as lists of per-block arrays.
  pending = {'queries': [], 'counts': [], 'last_lines': [], **{name: [] for name in names}}

  def take(queries: int) -> dict:
    """The first `queries` pending queries and their negatives, removed from pending."""
    whole = {k: np.concatenate(v) for k, v in pending.items()}
    entries = int(whole['counts'][:queries].sum())
    for k, v in whole.items():
      cut = queries if k in ('queries', 'counts', 'last_lines') else entries
      pending[k] = [v[cut:]]
      whole[k] = v[:cut]
    return whole

  def flush(shard: dict):
    tag = _shard_tag(len(shards))
    last_line = int(shard['last_lines'][-1])
    data = {f'queries-{tag}.bin': shard['queries'].astype(np.int32).tobytes(),
            f'counts-{tag}.bin': shard['counts'].astype(np.int32).tobytes()}
    for name, dtype in names.items():
      data[f'{name}-{tag}.bin'] = shard[name].astype(dtype).tobytes()
    record = {'queries': len(shard['queries']), 'last_line': last_line, 'files': {}}
    for name, content in data.items():
      _write_atomic(os.path.join(folder, name), content)
      record['files'][name] = {'bytes': len(content),
                               'sha256': hashlib.sha256(content).hexdigest()}
    _write_json(os.path.join(folder, f'shard-{tag}.json'), record)
    shards.append(record)
    say(f'lists: run shard {len(shards) - 1} (up to line {last_line})')
    if after_shard is not None:
      after_shard()

  skip_to = shards[-1]['last_line'] if shards else 0
  count = 0
  for groups in store_runs.run_groups(options.run, query_rows, doc_rows, num_queries,
                                      skip_to, seen.tolist()):
    sizes = np.diff(groups.offsets)
    query = np.repeat(groups.query_rows, sizes)
    rank = np.arange(len(query)) - np.repeat(groups.offsets[:-1], sizes)
    keys = query * num_docs + groups.doc_rows
    keep = ((rank >= options.min_rank - 1) & (rank < options.max_rank) & judged[query]
            & (store_runs.lookup(relevant, keys) < 0))
    if teacher is not None:
      found, values = teacher.lookup(query, groups.doc_rows)
      keep &= found
      pending['neg_teacher'].append(values[keep])
    group = np.repeat(np.arange(len(sizes)), sizes)
    pending['queries'].append(groups.query_rows)
    pending['counts'].append(np.bincount(group[keep], minlength=len(sizes)))
    pending['last_lines'].append(groups.last_lines)
    # In the shard's dtypes already: a shard's 16M entries at 8 bytes, not 16.
    pending['neg_rows'].append(groups.doc_rows[keep].astype(np.int32))
    pending['neg_scores'].append(groups.scores[keep].astype(np.float32))
    count += len(sizes)
    while count >= per_shard:
      flush(take(per_shard))
      count -= per_shard
  if count:
    flush(take(count))
  return shards


def _complete_record(record_path: str) -> Optional[dict]:
  """A shard's record if it and every file it lists (right size) exist, else None."""
  if not os.path.exists(record_path):
    return None
  record = _read_json(record_path)
  folder = os.path.dirname(record_path)
  for name, r in record['files'].items():
    path = os.path.join(folder, name)
    if not os.path.exists(path) or os.path.getsize(path) != r['bytes']:
      return None
  return record


# --------------------------------------------------------------------------- reading

class Store:
  """A prepared store, opened for reading: token tables and memory-mapped arrays.

  Opening reads the manifest and checks every file's size (verify=True: its sha256),
  the tokenizer (when given) and the inputs still present where they were; StoreError
  names the file otherwise. Nothing is loaded whole.
  """

  def __init__(self, path: str, tokenizer=None, verify: bool = False):
    self.path = path
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
      raise StoreError(f'{path}: no such store directory (prepare it with '
                       'scripts/prepare_data.py)')
    if not os.path.exists(manifest_path):
      raise StoreError(f'{manifest_path}: missing; the store is incomplete (run '
                       'scripts/prepare_data.py again to finish it)')
    self.manifest = m = _read_json(manifest_path)
    if m.get('format') != FORMAT:
      raise StoreError(f'{manifest_path}: format {m.get("format")!r}, expected {FORMAT!r}')
    for name, record in m['files'].items():
      file = os.path.join(path, name)
      if not os.path.exists(file):
        raise StoreError(f'{file}: missing; the store is damaged, prepare it again')
      if os.path.getsize(file) != record['bytes']:
        raise StoreError(f'{file}: {os.path.getsize(file)} bytes, the manifest says '
                         f'{record["bytes"]}; the store is damaged, prepare it again')
      if verify and _sha256_file(file) != record['sha256']:
        raise StoreError(f'{file}: checksum differs from the manifest; the store is damaged, '
                         'prepare it again')
    for source in m['inputs']:
      self._check_input(source)
    if tokenizer is not None and tokenizer.sha256() != m['tokenizer']['sha256']:
      raise StoreError(f'{manifest_path}: prepared with the vocabulary {m["tokenizer"]["path"]}, '
                       f'not {tokenizer.path} (their checksums differ); prepare the store '
                       'with this vocabulary')
    self.max_length = m['max_length']
    counts = m['counts']
    self.corpus = TokenTable(os.path.join(path, 'corpus'), counts['corpus'], m['shard_size'])
    self.queries = TokenTable(os.path.join(path, 'queries'), counts['queries'],
                              m['shard_size'])
    self.pairs = counts['pairs']
    self.lists = counts.get('lists')

  def _check_input(self, source: dict) -> None:
    path = source['path']
    if not os.path.exists(path):  # a store copied to another host: it stands alone
      return
    stat = os.stat(path)
    changed = stat.st_size != source['bytes'] or (
        stat.st_mtime_ns != source['mtime_ns'] and _sha256_file(path) != source['sha256'])
    if changed:
      raise StoreError(f'{path}: changed since the store {self.path} was prepared from it; '
                       'prepare the store again')

  def array(self, part: str, name: str) -> np.ndarray:
    """A memory-mapped array of a part ('pairs', 'lists')."""
    record = self.manifest['files'].get(f'{part}/{name}.bin')
    if record is None:
      raise StoreError(f'{self.path}: holds no {part}/{name} (prepared without it)')
    return _memmap(os.path.join(self.path, part, name + '.bin'), np.dtype(record['dtype']))

  def check_length(self, length: int, what: str) -> None:
    if length - 1 > self.max_length:
      raise cli.ConfigError(f'{what} is {length}, but the store {self.path} holds at most '
                            f'{self.max_length} ids per text (max_length); prepare it with '
                            f'--max_length {length - 1} or more')


def size_bytes(path: str) -> int:
  """Bytes of the store's files."""
  return sum(r['bytes'] for r in _read_json(os.path.join(path, MANIFEST))['files'].values())

