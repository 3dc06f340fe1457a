"""Vectorised reading of TREC runs and id lookups for `store.prepare` at MS MARCO scale.

A depth-1000 run over MS MARCO's training queries is 503M lines: one Python pass
(lists.parse_run_line, ~10 us a line) takes ~1.5 h. Here the run is read in blocks of
whole lines that pyarrow's CSV parser turns into columns, ids become rows through a
hash index of numpy arrays (8.8M documents: ~100 MB, against ~1 GB for a dict), and a
query's lines are grouped, ordered and checked with numpy. Whatever the fast path
does not accept (a malformed line, tabs or repeated spaces between fields, an unknown
id, a query's lines apart) sends that block alone through the line-by-line checks of
the Python reader, so every error is the one-line DataError it gives, naming the file
and line, and a run that parses differently (tabs) gives the same arrays.

A teacher's scores (a TREC run read the same way, or JSONL) go to files on disk in one
pass, per query its documents' rows ascending, and are looked up there by a vectorised
binary search: memory holds 12 bytes a query, never a byte a score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.csv as pa_csv

from t5dual import fileio
from t5dual.data import sources

BLOCK_BYTES = 1 << 25  # ~1M run lines: ~100 MB of columns while a block is read
_COLUMNS = ('query', 'q0', 'doc', 'rank', 'score', 'tag')
_FNV_OFFSET, _FNV_PRIME = 0xcbf29ce484222325, 0x100000001b3
_MASK = (1 << 64) - 1


# --------------------------------------------------------------------------- ids -> rows

def _utf8_columns(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """(int64 offsets [n + 1], uint8 bytes) of a string array, without copying ids out."""
  values = values.cast(pa.large_string())
  if isinstance(values, pa.ChunkedArray):
    values = values.combine_chunks()
  _, offsets, data = values.buffers()
  offsets = np.frombuffer(offsets, np.int64)[values.offset:values.offset + len(values) + 1]
  data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
  return offsets, data


def _hash(values: pa.Array, seed: int) -> np.ndarray:
  """uint64 FNV-1a of each string's bytes, then its length (`_hash_one` per string)."""
  offsets, data = _utf8_columns(values)
  starts, lengths = offsets[:-1], np.diff(offsets)
  h = np.full(len(lengths), (_FNV_OFFSET + seed) & _MASK, np.uint64)
  prime = np.uint64(_FNV_PRIME)
  for j in range(int(lengths.max(initial=0))):
    active = lengths > j
    byte = data[np.where(active, starts + j, 0)].astype(np.uint64) if data.size else 0
    h = np.where(active, (h ^ byte) * prime, h)
  return (h ^ lengths.astype(np.uint64)) * prime


def _hash_one(value: str, seed: int) -> int:
  h = (_FNV_OFFSET + seed) & _MASK
  encoded = value.encode('utf-8')
  for byte in encoded:
    h = ((h ^ byte) * _FNV_PRIME) & _MASK
  return ((h ^ len(encoded)) * _FNV_PRIME) & _MASK


class DuplicateIdError(ValueError):
  """An IdIndex of ids that are not distinct."""


class IdIndex:
  """The rows of distinct string ids: `rows(array)` vectorised, `index[id]` / `id in index`.

  Holds the ids as one arrow string array and, sorted, their 64-bit hashes with the rows
  they belong to (16 bytes an id on top of the ids' bytes); a looked-up id is compared with
  the id of its hash's row, so a hash collision can never map an id to another's row.
  """

  def __init__(self, ids: pa.Array):
    self.ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    for seed in range(8):  # two distinct ids of the same hash (~1e-6 at 8.8M): rehash
      hashes = _hash(self.ids, seed)
      order = np.argsort(hashes, kind='stable')
      sorted_hashes = hashes[order]
      same = np.nonzero(sorted_hashes[1:] == sorted_hashes[:-1])[0]
      if not same.size:
        break
      first, second = order[same], order[same + 1]
      equal = pa.compute.equal(self.ids.take(pa.array(first)), self.ids.take(pa.array(second)))
      if np.any(equal.to_numpy(zero_copy_only=False)):
        raise DuplicateIdError('the same id on two rows')
    else:
      raise RuntimeError('eight hash seeds collide on these ids')  # distinct ids: never
    self.seed, self._hashes, self._rows = seed, sorted_hashes, order.astype(np.int64)

  def __len__(self) -> int:
    return len(self.ids)

  def rows(self, values) -> np.ndarray:
    """int64 row of each id in `values` (an arrow string array or a list), -1 if absent."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
      values = pa.array(values, pa.string())
    if not len(values) or not len(self):
      return np.full(len(values), -1, np.int64)
    hashes = _hash(values, self.seed)
    # Sorted needles: each binary search starts from the last one's place (12x faster on
    # 1M ids into 8.8M than in their own, random order).
    order = np.argsort(hashes)
    at = np.empty(len(hashes), np.int64)
    at[order] = np.minimum(np.searchsorted(self._hashes, hashes[order]), len(self._hashes) - 1)
    rows = np.where(self._hashes[at] == hashes, self._rows[at], -1)
    found = np.nonzero(rows >= 0)[0]
    if found.size:  # the same hash: the same id, unless a collision with an absent id
      same = pa.compute.equal(values.take(pa.array(found)), self.ids.take(pa.array(rows[found])))
      rows[found[~same.to_numpy(zero_copy_only=False)]] = -1
    return rows

  def get(self, value: str, default=None):
    h = _hash_one(value, self.seed)
    at = int(np.searchsorted(self._hashes, np.uint64(h)))
    if at < len(self._hashes) and int(self._hashes[at]) == h:
      row = int(self._rows[at])
      if self.ids[row].as_py() == value:
        return row
    return default

  def __contains__(self, value) -> bool:
    return isinstance(value, str) and self.get(value) is not None

  def __getitem__(self, value: str) -> int:
    row = self.get(value)
    if row is None:
      raise KeyError(value)
    return row


class IdCollector:
  """Ids added one at a time, kept as arrow arrays of 64k (not Python strings)."""

  def __init__(self):
    self._chunks: list[pa.Array] = []
    self._pending: list[str] = []

  def add(self, value: str) -> None:
    self._pending.append(value)
    if len(self._pending) == 1 << 16:
      self._chunks.append(pa.array(self._pending, pa.string()))
      self._pending = []

  def index(self) -> IdIndex:
    chunks = self._chunks + [pa.array(self._pending, pa.string())]
    return IdIndex(pa.chunked_array(chunks, pa.string()).combine_chunks())


# --------------------------------------------------------------------------- run blocks

@dataclasses.dataclass
class Block:
  """Whole lines of a run: their entries' query and document ids, scores and line
  numbers, in file order."""
  queries: pa.Array
  docs: pa.Array
  scores: np.ndarray
  lines: np.ndarray


def _text_blocks(path: str, start_byte: int, start_line: int, block_bytes: int
                 ) -> Iterator[tuple[bytes, int, int]]:
  """(text of whole lines, its first line, the line after it)."""
  with open(path, 'rb') as f:
    f.seek(start_byte)
    rest, line = b'', start_line
    while True:
      chunk = f.read(block_bytes)
      text = rest + chunk
      if chunk:
        cut = text.rfind(b'\n') + 1
        if not cut:
          rest = text
          continue
        text, rest = text[:cut], text[cut:]
      elif not text:
        return
      lines = text.count(b'\n') + (not text.endswith(b'\n'))
      yield text, line + 1, line + lines + 1
      line += lines
      if not chunk:
        return


def _fast_columns(text: bytes) -> Optional[tuple[pa.Array, pa.Array, np.ndarray]]:
  """pyarrow's parse of single-space-separated lines, None where it does not apply."""
  try:
    table = pa_csv.read_csv(
        pa.py_buffer(text),
        read_options=pa_csv.ReadOptions(column_names=list(_COLUMNS), use_threads=False),
        parse_options=pa_csv.ParseOptions(delimiter=' ', quote_char=False,
                                          escape_char=False, ignore_empty_lines=True),
        convert_options=pa_csv.ConvertOptions(
            column_types={'query': pa.string(), 'doc': pa.string(), 'score': pa.float64()},
            include_columns=['query', 'doc', 'score'], null_values=[],
            strings_can_be_null=False, quoted_strings_can_be_null=False))
  except (pa.ArrowInvalid, pa.ArrowTypeError):
    return None
  scores = table.column('score').to_numpy()
  if table.column('score').null_count or not np.all(np.isfinite(scores)):
    return None
  return (table.column('query').combine_chunks(), table.column('doc').combine_chunks(),
          scores)


def _slow_columns(text: bytes, path: str, first_line: int):
  """The block line by line (lists.parse_run_line): its entries, and the DataError of a
  malformed line, raised only after the lines before it are checked (file order)."""
  from t5dual.data import lists as lists_lib
  queries, docs, scores, lines = [], [], [], []
  error = None
  for lineno, line in enumerate(text.decode('utf-8').split('\n'), first_line):
    try:
      entry = lists_lib.parse_run_line(line, path, lineno)
    except sources.DataError as e:
      error = e
      break
    if entry is not None:
      queries.append(entry[0])
      docs.append(entry[1])
      scores.append(entry[2])
      lines.append(lineno)
  return (pa.array(queries, pa.string()), pa.array(docs, pa.string()),
          np.asarray(scores, np.float64), np.asarray(lines, np.int64), error)


def read_blocks(path: str, start_byte: int = 0, start_line: int = 0,
                block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[Block, Optional[Exception]]]:
  """The run's entries, a block at a time, from byte `start_byte` (line `start_line` + 1).

  With each block the DataError of its first malformed line (None: none); the entries
  are those before it.
  """
  for text, first, end in _text_blocks(path, start_byte, start_line, block_bytes):
    fast = _fast_columns(text)
    if fast is not None and len(fast[0]) == end - first:  # no blank lines: row i is line i
      yield Block(*fast, np.arange(first, end, dtype=np.int64)), None
      continue
    queries, docs, scores, lines, error = _slow_columns(text, path, first)
    yield Block(queries, docs, scores, lines), error


# --------------------------------------------------------------------------- query groups

@dataclasses.dataclass
class Groups:
  """Complete queries of the run in file order: query_rows [g], offsets [g + 1] into
  doc_rows / scores (each query's by descending score, ties in file order), last_lines
  [g] (each query's last line)."""
  query_rows: np.ndarray
  offsets: np.ndarray
  doc_rows: np.ndarray
  scores: np.ndarray
  last_lines: np.ndarray


def _first_error_slowly(path, qrows, drows, qids, dids, lines, first_line, skip_to):
  """Raises the DataError of lists.read_run's order of checks at the first bad entry of
  a block the vectorised checks refused (the entries from the block's first query on)."""
  qid, first = None, {}
  qids, dids = qids.to_pylist(), dids.to_pylist()
  for i in range(len(qids)):
    q, doc_id, lineno = qids[i], dids[i], int(lines[i])
    where = f'{path}:{lineno}'
    if q != qid:
      row = qrows[i]
      if row >= 0 and first_line[row]:
        seen = int(first_line[row])
        raise sources.DataError(f'{where}: query {q!r} again after other queries (first '
                                f'on line {seen if seen > 0 else "<= " + str(skip_to)}); a '
                                'prepared store reads a run one query at a time: sort '
                                'the run by query')
      if row < 0:
        raise sources.DataError(f'{where}: query id {q!r} is not in queries.jsonl')
      qid, first = q, {}
      first_line[row] = lineno  # the caller's copy: only for this scan
    if drows[i] < 0:
      raise sources.DataError(f'{where}: document id {doc_id!r} is not in corpus.jsonl')
    if drows[i] in first:
      raise sources.DataError(f'{where}: document {doc_id!r} listed twice for query '
                              f'{q!r} (first on line {first[drows[i]]})')
    first[drows[i]] = lineno


def _byte_of_line(path: str, line: int) -> int:
  """Where line `line` + 1 starts (a resumed prepare reads on from there)."""
  if not line:
    return 0
  with open(path, 'rb') as f:
    byte, left = 0, line
    while True:
      chunk = f.read(1 << 24)
      if not chunk:
        return byte
      count = chunk.count(b'\n')
      if count < left:
        byte, left = byte + len(chunk), left - count
        continue
      at = -1
      for _ in range(left):
        at = chunk.index(b'\n', at + 1)
      return byte + at + 1


def run_groups(path: str, query_rows: dict, doc_index: IdIndex, num_queries: int,
               skip_to: int = 0, seen_rows=(), block_bytes: int = BLOCK_BYTES
               ) -> Iterator[Groups]:
  """Complete queries of a TREC run, a block at a time, checked as lists.read_run checks
  it; a query's lines must be together. Reading starts at line `skip_to` + 1;
  `seen_rows` are the queries read before it."""
  start_byte = _byte_of_line(path, skip_to)
  # Per query row: the line it started on (-1: before `skip_to`; 0: not seen yet).
  first_line = np.zeros(num_queries, np.int64)
  first_line[np.asarray(list(seen_rows), np.int64)] = -1
  carry = None  # the last query of the previous block: (qrows, drows, scores, lines, qids, dids)
  read_any = False
  for block, error in read_blocks(path, start_byte, skip_to, block_bytes):
    qids, dids = block.queries, block.docs
    # A block holds few queries: their ids through the dict, once each.
    encoded = qids.dictionary_encode()
    unique_rows = np.asarray([query_rows.get(q, -1) for q in encoded.dictionary.to_pylist()],
                             np.int64)
    qrows = unique_rows[encoded.indices.to_numpy(zero_copy_only=False)] if len(qids) else \
        np.zeros(0, np.int64)
    drows = doc_index.rows(dids)
    scores, lines = block.scores, block.lines
    if carry is not None:
      qrows = np.concatenate([carry[0], qrows])
      drows = np.concatenate([carry[1], drows])
      scores = np.concatenate([carry[2], scores])
      lines = np.concatenate([carry[3], lines])
      qids = pa.concat_arrays([carry[4], qids])
      dids = pa.concat_arrays([carry[5], dids])
    n = len(qrows)
    if not n:
      if error is not None:
        raise error
      continue
    read_any = True
    starts = np.concatenate([[0], np.nonzero(qrows[1:] != qrows[:-1])[0] + 1])
    group_rows = qrows[starts]
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))
    pairs = np.sort(group * (len(doc_index) + 1) + drows)  # (query, document) once each
    ok = (np.all(group_rows >= 0) and np.all(drows >= 0)
          and len(np.unique(group_rows)) == len(group_rows)
          and not np.any(first_line[group_rows] != 0)
          and not np.any(pairs[1:] == pairs[:-1]))
    if not ok:
      _first_error_slowly(path, qrows, drows, qids, dids, lines, first_line.copy(), skip_to)
      raise RuntimeError(f'{path}: lines {lines[0]}..{lines[-1]} refused by the vectorised '
                         'checks but not line by line')  # an internal inconsistency
    if error is not None:
      raise error
    # The last query may go on in the next block: hold it back.
    cut = int(starts[-1])
    complete = len(starts) - 1
    carry = (qrows[cut:], drows[cut:], scores[cut:], lines[cut:], qids.slice(cut),
             dids.slice(cut))
    if complete:
      yield _groups(qrows[:cut], drows[:cut], scores[:cut], lines[:cut], starts[:complete],
                    group[:cut], first_line)
  if carry is not None:
    qrows, drows, scores, lines = carry[:4]
    yield _groups(qrows, drows, scores, lines, np.zeros(1, np.int64),
                  np.zeros(len(qrows), np.int64), first_line)
  elif not read_any and not skip_to:
    raise sources.DataError(f'{path}: empty run file')


def _groups(qrows, drows, scores, lines, starts, group, first_line) -> Groups:
  ranked = (scores[1:] <= scores[:-1]) | (group[1:] != group[:-1])
  if np.all(ranked):  # as runs are written, best first: the stable sort's order
    order = np.arange(len(scores))
  else:
    order = np.lexsort((-scores, group))  # stable: ties in file order
  offsets = np.append(starts, len(qrows)).astype(np.int64)
  first_line[qrows[starts]] = lines[starts]
  return Groups(query_rows=qrows[starts], offsets=offsets, doc_rows=drows[order],
                scores=scores[order], last_lines=lines[offsets[1:] - 1])


# --------------------------------------------------------------------------- sorted keys

def sorted_keys(query_rows: np.ndarray, doc_rows: np.ndarray, values: np.ndarray,
                num_docs: int) -> tuple[np.ndarray, np.ndarray]:
  """(sorted int64 keys query_row * num_docs + doc_row, float64 values in their order):
  16 bytes a pair, looked up with `lookup`."""
  keys = np.asarray(query_rows, np.int64) * num_docs + np.asarray(doc_rows, np.int64)
  order = np.argsort(keys, kind='stable')
  return keys[order], np.asarray(values, np.float64)[order]


def lookup(keys: np.ndarray, wanted) -> np.ndarray:
  """Position of each wanted key in sorted `keys`, -1 where absent."""
  wanted = np.asarray(wanted, np.int64)
  if not keys.size:
    return np.full(wanted.shape, -1, np.int64)
  at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
  return np.where(keys[at] == wanted, at, -1)


# --------------------------------------------------------------------------- teacher

# A teacher's scores in the store being prepared, while its lists are made: per query row
# its documents' rows ascending and their scores, and (start, count) into them.
TEACHER_FILES = {'teacher-docs': np.int32, 'teacher-scores': np.float32,
                 'teacher-starts': np.int64, 'teacher-counts': np.int32}
TEACHER_CHUNK = 1 << 18  # JSONL teacher scores checked and written at a time (~30 MB of ids)


def write_teacher(path: str, folder: str, query_rows: dict, doc_index: IdIndex) -> dict:
  """One pass over a teacher (a TREC run, or JSONL: data/lists.py) into TEACHER_FILES in
  `folder`, each written atomically; returns their records {file: {bytes, sha256}}.

  Checked as lists.read_teacher checks it, with its one-line errors naming the file and
  line, except that a TREC teacher's query must have its lines together (run_groups, as
  the run). Memory: one block (TREC, ~1M lines) or TEACHER_CHUNK scores (JSONL) and 20
  bytes a query, never the teacher's scores. Scores are stored as float32, the dtype of
  the store's teacher arrays: the same one rounding of the float64 read.
  """
  from t5dual.data import lists as lists_lib
  num_queries = len(query_rows)
  starts = np.zeros(num_queries, np.int64)
  counts = np.zeros(num_queries, np.int32)
  names = {name: os.path.join(folder, name + '.bin') for name in TEACHER_FILES}
  digests = {name: hashlib.sha256() for name in TEACHER_FILES}
  written = 0
  with fileio.atomic_write(names['teacher-docs'], 'wb') as docs_file, \
       fileio.atomic_write(names['teacher-scores'], 'wb') as scores_file:

    def append(query, sizes, doc_rows, scores):
      """Queries `query` [g] with `sizes` [g] scores each: doc_rows, scores in that order."""
      nonlocal written
      group = np.repeat(np.arange(len(sizes)), sizes)
      order = np.lexsort((doc_rows, group))  # each query's documents ascending
      for name, f, values in (('teacher-docs', docs_file, doc_rows),
                              ('teacher-scores', scores_file, scores)):
        data = np.asarray(values[order], TEACHER_FILES[name]).tobytes()
        f.write(data)
        digests[name].update(data)
      starts[query] = written + np.cumsum(sizes) - sizes
      counts[query] = sizes
      written += len(order)

    if not path.endswith('.jsonl'):
      for groups in run_groups(path, query_rows, doc_index, num_queries):
        append(groups.query_rows, np.diff(groups.offsets), groups.doc_rows, groups.scores)
    else:
      _jsonl_teacher(path, query_rows, doc_index, append, lists_lib.teacher_record)
  for name, values in (('teacher-starts', starts), ('teacher-counts', counts)):
    data = values.tobytes()
    with fileio.atomic_write(names[name], 'wb') as f:
      f.write(data)
    digests[name].update(data)
  return {name + '.bin': {'bytes': os.path.getsize(names[name]),
                          'sha256': digests[name].hexdigest()} for name in TEACHER_FILES}


def _jsonl_teacher(path, query_rows, doc_index, append, teacher_record) -> None:
  """A JSONL teacher's records into `append`, TEACHER_CHUNK scores at a time: each record
  checked by lists.teacher_record, a chunk's document ids looked up at once. An error
  found in a record comes after any unknown document of the records before it, as
  read_teacher reads them one by one."""
  seen = np.zeros(len(query_rows), np.int64)  # per query row: its line, 0 if not yet
  chunk: list[tuple[int, int, list, list]] = []  # (query row, line, doc ids, scores)
  size, records = 0, 0

  def flush():
    if not chunk:
      return
    ids = pa.array([d for _, _, docs, _ in chunk for d in docs], pa.string())
    doc_rows = doc_index.rows(ids)
    sizes = np.asarray([len(docs) for _, _, docs, _ in chunk], np.int64)
    unknown = np.nonzero(doc_rows < 0)[0]
    if unknown.size:
      line = chunk[int(np.searchsorted(np.cumsum(sizes), unknown[0], side='right'))][1]
      raise sources.DataError(f'{path}:{line}: document id {ids[int(unknown[0])].as_py()!r} '
                              'is not in corpus.jsonl')
    scores = np.fromiter((s for _, _, _, values in chunk for s in values), np.float64,
                         len(doc_rows))
    append(np.asarray([row for row, _, _, _ in chunk], np.int64), sizes, doc_rows, scores)
    chunk.clear()

  try:
    for lineno, record in sources.iter_jsonl(path):
      qid, scores = teacher_record(record, f'{path}:{lineno}', query_rows,
                                   lambda q: int(seen[query_rows[q]]) or None)
      row = query_rows[qid]
      seen[row] = lineno
      chunk.append((row, lineno, list(scores), list(scores.values())))
      size, records = size + len(scores), records + 1
      if size >= TEACHER_CHUNK:
        flush()
        size = 0
  except sources.DataError:
    flush()  # an unknown document on an earlier line is the first error
    raise
  flush()
  if not records:
    raise sources.DataError(f'{path}: no teacher scores')


class TeacherScores:
  """The scores write_teacher wrote, looked up by (query row, document row).

  In memory: each query's (start, count), 12 bytes a query. The documents' rows and
  scores stay on disk, mapped for one lookup at a time, so that the pages a lookup
  touches leave the process with it (a mapping kept open would count every page ever
  read in its resident memory).
  """

  def __init__(self, folder: str):
    self.folder = folder
    self.starts = np.fromfile(os.path.join(folder, 'teacher-starts.bin'), np.int64)
    self.counts = np.fromfile(os.path.join(folder, 'teacher-counts.bin'), np.int32)
    self.size = os.path.getsize(os.path.join(folder, 'teacher-docs.bin')) // 4

  def lookup(self, query_rows, doc_rows) -> tuple[np.ndarray, np.ndarray]:
    """(bool found [n], float32 scores [n], 0 where absent) of n (query row, document
    row) pairs: a binary search in each query's segment of ascending document rows, all
    pairs at once (~11 gathers for a depth-1000 teacher)."""
    query_rows = np.asarray(query_rows, np.int64)
    doc_rows = np.asarray(doc_rows, np.int64)
    if not self.size or not len(query_rows):
      return np.zeros(len(query_rows), bool), np.zeros(len(query_rows), np.float32)
    docs = np.memmap(os.path.join(self.folder, 'teacher-docs.bin'), np.int32, 'r')
    lo = self.starts[query_rows]
    end = lo + self.counts[query_rows]
    hi = end.copy()
    last = self.size - 1
    while True:
      active = np.nonzero(lo < hi)[0]
      if not active.size:
        break
      mid = (lo[active] + hi[active]) >> 1
      less = np.asarray(docs[mid]) < doc_rows[active]
      lo[active] = np.where(less, mid + 1, lo[active])
      hi[active] = np.where(less, hi[active], mid)
    at = np.minimum(lo, last)
    found = (lo < end) & (np.asarray(docs[at]) == doc_rows)
    del docs
    scores = np.zeros(len(query_rows), np.float32)
    where = np.nonzero(found)[0]
    if where.size:
      mapped = np.memmap(os.path.join(self.folder, 'teacher-scores.bin'), np.float32, 'r')
      scores[where] = np.asarray(mapped[at[where]])
      del mapped
    return found, scores
