"""Readers for local retrieval data: BEIR folders and JSONL pair files.

Every error names the file and the 1-based line it comes from.

BEIR folder:  corpus.jsonl   {"_id", "title"?, "text"}
              queries.jsonl  {"_id", "text"}
              qrels/<split>.tsv  query-id <TAB> corpus-id <TAB> score (header line)
Pair JSONL:   {"query": str, "positive": str, "negatives"?: [str, ...]}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Optional


class DataError(ValueError):
  """Malformed input data; the message names the file and line."""


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


def iter_jsonl(path: str, error: type = DataError) -> Iterator[tuple[int, dict]]:
  """(1-based line, object) for each non-blank line; malformed lines raise `error`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: file not found')
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f'{path}:{lineno}: not valid JSON ({e.msg})') from None
      if not isinstance(record, dict):
        raise error(f'{path}:{lineno}: expected a JSON object')
      yield lineno, record


def _field(record: dict, key: str, path: str, lineno: int, allow_empty=False) -> str:
  value = record.get(key)
  if not isinstance(value, str) and key == '_id' and isinstance(value, int):
    value = str(value)
  if not isinstance(value, str):
    raise DataError(f'{path}:{lineno}: missing or non-string field {key!r}')
  if not allow_empty and not value.strip():
    raise DataError(f'{path}:{lineno}: empty field {key!r}')
  return value


def read_beir_corpus(folder: str) -> tuple[list[str], list[str]]:
  """(ids, texts) of corpus.jsonl; text is "title text" when a title exists."""
  path = os.path.join(folder, 'corpus.jsonl')
  ids, texts, seen = [], [], {}
  for lineno, rec in iter_jsonl(path):
    doc_id = _field(rec, '_id', path, lineno)
    if doc_id in seen:
      raise DataError(f'{path}:{lineno}: duplicate _id {doc_id!r} (first on line {seen[doc_id]})')
    seen[doc_id] = lineno
    title = rec.get('title') or ''
    text = _field(rec, 'text', path, lineno, allow_empty=bool(title.strip()))
    ids.append(doc_id)
    texts.append(f'{title} {text}'.strip() if title else text)
  return ids, texts


def read_beir_queries(folder: str) -> dict[str, str]:
  path = os.path.join(folder, 'queries.jsonl')
  queries = {}
  for lineno, rec in iter_jsonl(path):
    qid = _field(rec, '_id', path, lineno)
    if qid in queries:
      raise DataError(f'{path}:{lineno}: duplicate _id {qid!r}')
    queries[qid] = _field(rec, 'text', path, lineno)
  return queries


def _qrels_rows(path: str) -> Iterator[tuple[int, str, str, int]]:
  """(line, query id, corpus id, score) of a BEIR (3-column) or TREC (4-column) qrels file."""
  if not os.path.exists(path):
    raise DataError(f'{path}: qrels file not found')
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.rstrip('\n').split('\t' if '\t' in line else None)
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


def read_qrels(folder_or_file: str, split: Optional[str] = None) -> dict[str, dict[str, int]]:
  """Qrels as {query_id: {doc_id: relevance}}; with `split`, reads <folder>/qrels/<split>.tsv."""
  path = folder_or_file if split is None else qrels_path(folder_or_file, split)
  qrels: dict[str, dict[str, int]] = {}
  for _, qid, did, score in _qrels_rows(path):
    qrels.setdefault(qid, {})[did] = score
  return qrels


class _Interner:
  def __init__(self):
    self.ids: dict[str, int] = {}

  def __call__(self, key: str) -> int:
    return self.ids.setdefault(key, len(self.ids))


def beir_pairs(folder: str, split: str = 'train', min_score: int = 1) -> PairExamples:
  """Positive (query, document) pairs of a BEIR split; qrels must point to existing ids."""
  doc_ids, doc_texts = read_beir_corpus(folder)
  corpus = dict(zip(doc_ids, doc_texts))
  queries = read_beir_queries(folder)
  path = qrels_path(folder, split)
  out = PairExamples([], [], [], [], [], [])
  q_intern, d_intern = _Interner(), _Interner()
  for lineno, qid, did, score in _qrels_rows(path):
    if qid not in queries:
      raise DataError(f'{path}:{lineno}: query id {qid!r} is not in queries.jsonl')
    if did not in corpus:
      raise DataError(f'{path}:{lineno}: corpus id {did!r} is not in corpus.jsonl')
    if score < min_score:
      continue
    out.queries.append(queries[qid])
    out.positives.append(corpus[did])
    out.negatives.append([])
    out.query_ids.append(q_intern(queries[qid]))
    out.doc_ids.append(d_intern(did))
    out.negative_ids.append([])
  if not out.queries:
    raise DataError(f'{path}: no positive pairs (score >= {min_score})')
  return out


def jsonl_pairs(path: str) -> PairExamples:
  """Pairs from {"query", "positive", "negatives"?} lines; ids by identical text."""
  out = PairExamples([], [], [], [], [], [])
  q_intern, d_intern = _Interner(), _Interner()
  for lineno, rec in iter_jsonl(path):
    query = _field(rec, 'query', path, lineno)
    positive = _field(rec, 'positive', path, lineno)
    negatives = rec.get('negatives', [])
    if not isinstance(negatives, list) or not all(
        isinstance(n, str) and n.strip() for n in negatives):
      raise DataError(f'{path}:{lineno}: "negatives" must be a list of non-empty strings')
    out.queries.append(query)
    out.positives.append(positive)
    out.negatives.append(negatives)
    out.query_ids.append(q_intern(query))
    out.doc_ids.append(d_intern(positive))
    out.negative_ids.append([d_intern(n) for n in negatives])
  if not out.queries:
    raise DataError(f'{path}: no examples')
  return out
