"""Readers for local retrieval data: BEIR folders, JSONL pair files, and training source specs.

Every error names the file and the 1-based line it comes from, non-UTF-8 bytes
included.

BEIR folder:  corpus.jsonl   {"_id", "title"?, "text"}
              queries.jsonl  {"_id", "text"}
              qrels/<split>.tsv  query-id <TAB> corpus-id <TAB> score (header line)
Pair JSONL:   {"query": str, "positive": str, "negatives"?: [str, ...]}

Real collections hold empty texts (Cranfield has documents with neither title
nor text, CACM hundreds with a title only). A document's text is its title and
text joined; an empty document or query is kept, and whoever encodes it
(training, evaluation, export) warns once with the count: T5 encodes it as a
lone EOS, so it still gets a vector. Training from BEIR skips the judgements
that cite a document missing from corpus.jsonl, with one warning (evaluation
warns the same way, see `warn_missing_documents`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterator, Optional, Sequence

from t5dual import cli

log = logging.getLogger(__name__)

# Relevance judgements {query id: {document id: relevance}} and a ranking
# {query id: {document id: score}}, each query's documents in rank order.
Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

# How many ids or lines a warning quotes before "...".
_SHOWN = 5


class DataError(cli.UserError, ValueError):
  """Malformed input data; the message names the file and line."""


class UnknownSourceError(cli.ConfigError, LookupError):
  """The source spec names neither a local path nor a known format."""


@dataclasses.dataclass
class PairExamples:
  """Training pairs, with integer ids for duplicate masking.

  query_ids[i] is shared by identical query texts; doc_ids[i] by the same
  positive document (BEIR corpus id, or identical text in JSONL).
  negatives[i] is a (possibly empty) list of hard-negative texts.
  """

  queries: list[str]
  positives: list[str]
  negatives: list[list[str]]
  query_ids: list[int]
  doc_ids: list[int]
  negative_ids: list[list[int]]

  def __len__(self) -> int:
    return len(self.queries)

  def rows(self, indices) -> 'PairExamples':
    """The examples at `indices`, in that order (what one batch reads)."""
    return PairExamples(*([getattr(self, f.name)[i] for i in indices]
                          for f in dataclasses.fields(self)))


# --------------------------------------------------------------------------- lines and JSONL

def iter_lines(path: str, error: type = DataError) -> Iterator[tuple[int, str]]:
  """(1-based line, text without its line break) for every line of a UTF-8 file.

  Lines are decoded one by one so that bad bytes are reported with their line
  (a UTF-8 byte-order mark at the start is accepted).
  """
  for lineno, _, line in iter_lines_at(path, error):
    yield lineno, line


def iter_lines_at(path: str, error: type = DataError, offset: int = 0, first_line: int = 1
                  ) -> Iterator[tuple[int, int, str]]:
  """(1-based line, byte offset, text) of the lines from byte `offset` on (which starts
  line `first_line`): `iter_lines` that can start in the middle of a file, so that a
  reader holding the offsets of its rows re-reads any range of them alone."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: file not found')
  with open(path, 'rb') as f:
    f.seek(offset)
    for lineno, raw in enumerate(f, first_line):
      try:
        line = raw.decode('utf-8-sig' if lineno == 1 else 'utf-8')
      except UnicodeDecodeError as e:
        raise error(f'{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column '
                    f'{e.start + 1}); convert the file to UTF-8') from None
      yield lineno, offset, line.rstrip('\r\n')
      offset += len(raw)


def iter_jsonl(path: str, error: type = DataError) -> Iterator[tuple[int, dict]]:
  """(1-based line, object) for each non-blank line; malformed lines raise `error`."""
  for lineno, _, record in iter_jsonl_at(path, error):
    yield lineno, record


def iter_jsonl_at(path: str, error: type = DataError, offset: int = 0, first_line: int = 1
                  ) -> Iterator[tuple[int, int, dict]]:
  """(1-based line, byte offset, object) for each non-blank line from byte `offset` on."""
  for lineno, at, line in iter_lines_at(path, error, offset, first_line):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise error(f'{path}:{lineno}: not valid JSON ({e.msg})') from None
    if not isinstance(record, dict):
      raise error(f'{path}:{lineno}: expected a JSON object')
    yield lineno, at, record


def _field(record: dict, key: str, path: str, lineno: int, allow_empty=False) -> str:
  value = record.get(key)
  if not isinstance(value, str) and key == '_id' and isinstance(value, int):
    value = str(value)
  if not isinstance(value, str):
    raise DataError(f'{path}:{lineno}: missing or non-string field {key!r}')
  if not allow_empty and not value.strip():
    raise DataError(f'{path}:{lineno}: empty field {key!r}')
  return value


def join_text(parts: Sequence[str]) -> str:
  """The non-empty parts (e.g. title and text), stripped and joined by a space."""
  return ' '.join(p.strip() for p in parts if p and p.strip())


def _shown(items: Sequence) -> str:
  more = ', ...' if len(items) > _SHOWN else ''
  return ', '.join(str(i) for i in items[:_SHOWN]) + more


def warn_empty_texts(what: str, empty: Sequence[str], total: int,
                     kind: str = 'texts are empty') -> None:
  """One warning for the empty texts (`empty` names them) among `total`; they are kept.

  E.g. "corpus.jsonl: 2 of 1400 texts are empty ('471', '995'); ...".
  """
  if empty:
    log.warning('%s: %d of %d %s (%s); each empty text is encoded as EOS only', what,
                len(empty), total, kind, _shown(empty))


def warn_missing_documents(what: str, missing: Sequence[str], judgements: int,
                           consequence: str) -> None:
  """One warning for the judged documents not in the corpus (cited `judgements` times)."""
  if missing:
    log.warning('%s: %d judgement(s) cite %d document(s) not in the corpus (%s); %s', what,
                judgements, len(missing), _shown(missing), consequence)


# --------------------------------------------------------------------------- BEIR

def read_beir_corpus(folder: str) -> tuple[list[str], list[str]]:
  """(ids, texts) of corpus.jsonl; a text is the title and the text joined.

  "text" must be present and a string but may be empty, as may "title"; a
  document with neither keeps its id and an empty text. (`t5dual.corpus.beir_corpus`
  reads the same file a chunk of rows at a time.)
  """
  ids, texts = [], []
  for doc_id, text in iter_beir_corpus(folder):
    ids.append(doc_id)
    texts.append(text)
  return ids, texts


def iter_beir_corpus(folder: str, check_unique: bool = True) -> Iterator[tuple[str, str]]:
  """(id, text) of each document of corpus.jsonl, one at a time (read_beir_corpus).

  check_unique=False leaves out the check that ids are distinct, and the dict of every
  id it needs (~1 GB at MS MARCO's 8.8M passages), for a caller that checks otherwise."""
  path = os.path.join(folder, 'corpus.jsonl')
  seen = {}
  for lineno, rec in iter_jsonl(path):
    doc_id, text = beir_document(rec, path, lineno)
    if check_unique:
      if doc_id in seen:
        raise DataError(f'{path}:{lineno}: duplicate _id {doc_id!r} (first on line '
                        f'{seen[doc_id]})')
      seen[doc_id] = lineno
    yield doc_id, text


def beir_document(rec: dict, path: str, lineno: int) -> tuple[str, str]:
  """(id, title and text joined) of one corpus.jsonl record."""
  doc_id = _field(rec, '_id', path, lineno)
  title = rec.get('title') or ''
  if not isinstance(title, str):
    raise DataError(f'{path}:{lineno}: field \'title\' is {type(title).__name__}, not text')
  return doc_id, join_text([title, _field(rec, 'text', path, lineno, allow_empty=True)])


def read_beir_queries(folder: str) -> dict[str, str]:
  """{query id: text} of queries.jsonl, in file order; a text may be empty."""
  return dict(iter_beir_queries(folder))


def iter_beir_queries(folder: str) -> Iterator[tuple[str, str]]:
  """(id, text) of each query of queries.jsonl, one at a time (read_beir_queries)."""
  path = os.path.join(folder, 'queries.jsonl')
  seen = set()
  for lineno, rec in iter_jsonl(path):
    qid = _field(rec, '_id', path, lineno)
    if qid in seen:
      raise DataError(f'{path}:{lineno}: duplicate _id {qid!r}')
    seen.add(qid)
    yield qid, _field(rec, 'text', path, lineno, allow_empty=True).strip()


def _qrels_rows(path: str) -> Iterator[tuple[int, str, str, int]]:
  """(line, query id, corpus id, score) of a BEIR (3-column) or TREC (4-column) qrels file."""
  if not os.path.exists(path):
    raise DataError(f'{path}: qrels file not found')
  for lineno, line in iter_lines(path):
    if not line.strip():
      continue
    parts = line.split('\t' if '\t' in line else None)
    if lineno == 1 and parts[0] in ('query-id', 'query_id', 'qid'):
      continue
    if len(parts) == 4:  # TREC qrels: qid iteration docid rel
      parts = [parts[0], parts[2], parts[3]]
    if len(parts) != 3:
      raise DataError(f'{path}:{lineno}: expected "query-id<TAB>corpus-id<TAB>score", '
                      f'got {line.strip()!r}')
    try:
      score = int(float(parts[2]))
    except ValueError:
      raise DataError(f'{path}:{lineno}: score {parts[2]!r} is not a number') from None
    yield lineno, parts[0], parts[1], score


def qrels_path(folder: str, split: str) -> str:
  return os.path.join(folder, 'qrels', f'{split}.tsv')


def read_qrels(folder_or_file: str, split: Optional[str] = None) -> Qrels:
  """Qrels as {query_id: {doc_id: relevance}}; with `split`, reads <folder>/qrels/<split>.tsv."""
  path = folder_or_file if split is None else qrels_path(folder_or_file, split)
  qrels: Qrels = {}
  for _, qid, did, score in _qrels_rows(path):
    qrels.setdefault(qid, {})[did] = score
  return qrels


class _Interner:
  def __init__(self):
    self.ids: dict[str, int] = {}

  def __call__(self, key: str) -> int:
    return self.ids.setdefault(key, len(self.ids))


def _has_empty_text(out: PairExamples, i: int) -> bool:
  return not (out.queries[i] and out.positives[i] and all(out.negatives[i]))


def beir_pairs(folder: str, split: str = 'train', min_score: int = 1) -> PairExamples:
  """Positive (query, document) pairs of a BEIR split.

  A judgement whose query is not in queries.jsonl is an error; one whose
  document is not in corpus.jsonl is skipped (one warning for all of them).
  Empty queries and documents are kept (one warning).
  """
  doc_ids, doc_texts = read_beir_corpus(folder)
  corpus = dict(zip(doc_ids, doc_texts))
  queries = read_beir_queries(folder)
  path = qrels_path(folder, split)
  out = PairExamples([], [], [], [], [], [])
  q_intern, d_intern = _Interner(), _Interner()
  missing: dict[str, int] = {}  # document id -> first line citing it
  skipped, empty = 0, []
  for lineno, qid, did, score in _qrels_rows(path):
    if qid not in queries:
      raise DataError(f'{path}:{lineno}: query id {qid!r} is not in queries.jsonl')
    if score < min_score:
      continue
    if did not in corpus:
      missing.setdefault(did, lineno)
      skipped += 1
      continue
    out.queries.append(queries[qid])
    out.positives.append(corpus[did])
    out.negatives.append([])
    out.query_ids.append(q_intern(queries[qid]))
    out.doc_ids.append(d_intern(did))
    out.negative_ids.append([])
    if _has_empty_text(out, len(out) - 1):
      empty.append(f'{qid}/{did} on line {lineno}')
  warn_missing_documents(path, [f'{d!r} on line {n}' for d, n in missing.items()], skipped,
                         'those pairs are skipped')
  if not out.queries:
    raise DataError(f'{path}: no positive pairs (score >= {min_score}) with a document in '
                    'corpus.jsonl')
  warn_empty_texts(path, empty, len(out), 'pairs hold an empty query or document')
  return out


# Past this estimate of host memory, an in-memory source is pointed at the prepared store
# (data/store.py), which reads by index from disk whatever the size.
LARGE_SOURCE_GIB = 4.0
# Host memory of JSONL pairs held in memory per byte of the file: ~1.2 (BENCHMARKS.md,
# "Training data": 6.7 GiB over JAX's own for 5.6 GB with 30 negatives a pair).
JSONL_MEMORY_PER_BYTE = 1.2


def warn_if_large(path: str, memory_per_byte: float, prepare_args: str) -> None:
  """One warning, with the command that prepares the same data into a store, for a file
  whose in-memory form would take more than LARGE_SOURCE_GIB on every host."""
  estimate = os.path.getsize(path) * memory_per_byte / 2**30
  if estimate > LARGE_SOURCE_GIB:
    log.warning('%s: reading this into memory takes ~%.0f GiB on every host; prepare it once '
                'into a store, which reads by index from disk: scripts/prepare_data.py %s '
                "--vocabulary=... --out_dir=<dir>, then MIXTURE_OR_TASK_NAME='store:<dir>'",
                path, estimate, prepare_args)


def jsonl_pairs(path: str) -> PairExamples:
  """Pairs from {"query", "positive", "negatives"?} lines; ids by identical text.

  Texts may be empty (one warning), as in BEIR training data.
  """
  warn_if_large(path, JSONL_MEMORY_PER_BYTE, f'--source=jsonl:{path}')
  out = PairExamples([], [], [], [], [], [])
  q_intern, d_intern = _Interner(), _Interner()
  empty = []
  for lineno, rec in iter_jsonl(path):
    query = _field(rec, 'query', path, lineno, allow_empty=True).strip()
    positive = _field(rec, 'positive', path, lineno, allow_empty=True).strip()
    negatives = rec.get('negatives', [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
      raise DataError(f'{path}:{lineno}: "negatives" must be a list of strings')
    negatives = [n.strip() for n in negatives]
    out.queries.append(query)
    out.positives.append(positive)
    out.negatives.append(negatives)
    out.query_ids.append(q_intern(query))
    out.doc_ids.append(d_intern(positive))
    out.negative_ids.append([d_intern(n) for n in negatives])
    if _has_empty_text(out, len(out) - 1):
      empty.append(f'line {lineno}')
  if not out.queries:
    raise DataError(f'{path}: no examples')
  warn_empty_texts(path, empty, len(out), 'pairs hold an empty query or document')
  return out


def load_examples(source: str) -> PairExamples:
  """Reads training pairs from a source spec.

  'beir:<folder>[:<split>]'  positive pairs of a BEIR split (default train)
  'jsonl:<path>'             {"query", "positive", "negatives"?} lines
  A bare path is a BEIR folder if it is a directory, else a JSONL file.
  """
  kind, _, rest = source.partition(':')
  if kind == 'beir':
    folder, _, split = rest.partition(':')
    return beir_pairs(folder, split or 'train')
  if kind == 'jsonl':
    return jsonl_pairs(rest)
  if os.path.isdir(source):
    return beir_pairs(source, 'train')
  if os.path.isfile(source):
    return jsonl_pairs(source)
  raise UnknownSourceError(f'unknown data source {source!r}: use beir:<folder>[:<split>], '
                           'jsonl:<path>, or a seqio task name with the seqio extra installed')
