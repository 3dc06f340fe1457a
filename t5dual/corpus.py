"""Texts to encode, with their ids: readers for JSONL files and tf.data datasets, and the
checks every encoder runs before it starts.

A corpus is a pair (ids, texts) of equal-length lists in input order. An id is a
non-empty string without whitespace (TREC run files are whitespace-separated);
a text joins the record's chosen text fields (e.g. title and text) with a
space. A text may be empty: it is encoded as a lone EOS and still gets its
vector, and `validate_corpus` warns once with the count (see
`t5dual.data.sources` for BEIR folders, which follow the same rules).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from t5dual.data import sources
from t5dual.data.sources import DataError


def validate_corpus(ids: Sequence[str], texts: Sequence[str], what: str = 'corpus') -> None:
  """Raises DataError on duplicate or malformed ids; warns once about empty texts."""
  if len(ids) != len(texts):
    raise DataError(f'{what}: {len(ids)} ids but {len(texts)} texts')
  if not ids:
    raise DataError(f'{what}: nothing to encode (0 ids)')
  seen: dict[str, int] = {}
  for pos, doc_id in enumerate(ids):
    if not isinstance(doc_id, str) or not doc_id or any(c.isspace() for c in doc_id):
      raise DataError(f'{what}: id {doc_id!r} at position {pos} must be a non-empty string '
                      'without whitespace (TREC run files are whitespace-separated)')
    if doc_id in seen:
      raise DataError(f'{what}: duplicate id {doc_id!r} at positions {seen[doc_id]} and {pos}')
    seen[doc_id] = pos
  for pos, text in enumerate(texts):
    if not isinstance(text, str):
      raise DataError(f'{what}: text of id {ids[pos]!r} (position {pos}) is '
                      f'{type(text).__name__}, not str')
  sources.warn_empty_texts(what, [repr(ids[p]) for p, t in enumerate(texts) if not t.strip()],
                           len(texts))


def _join_fields(record: dict, text_fields: Sequence[str], where: str) -> str:
  parts = []
  for field in text_fields:
    value = record.get(field)
    if isinstance(value, bytes):
      value = _decode(value, where, field)
    if value is None:
      continue
    if not isinstance(value, str):
      raise DataError(f'{where}: field {field!r} is {type(value).__name__}, not text')
    parts.append(value)
  if not any(f in record for f in text_fields):
    raise DataError(f'{where}: none of the text fields {list(text_fields)} is present')
  return sources.join_text(parts)


def _decode(value: bytes, where: str, field: str) -> str:
  try:
    return value.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{where}: field {field!r} is not valid UTF-8 (byte 0x{value[e.start]:02x} '
                    f'at position {e.start})') from None


def _id_of(record: dict, id_field: Optional[str], default: str, where: str) -> str:
  if not id_field:
    return default
  value = record.get(id_field)
  if isinstance(value, bytes):
    value = _decode(value, where, id_field)
  if isinstance(value, (int, np.integer)):
    value = str(value)
  if not isinstance(value, str):
    raise DataError(f'{where}: missing or non-string id field {id_field!r}')
  return value


def read_jsonl_corpus(path: str, id_field: str = '_id',
                      text_fields: Sequence[str] = ('title', 'text')
                      ) -> tuple[list[str], list[str]]:
  """(ids, texts) of a JSONL file; texts join the non-empty `text_fields` with a space.

  A field may be missing or empty as long as one of `text_fields` is present.
  Duplicate ids are reported with both line numbers; empty texts are kept.
  """
  ids, texts, seen = [], [], {}
  for lineno, record in sources.iter_jsonl(path):
    where = f'{path}:{lineno}'
    doc_id = _id_of(record, id_field, str(len(ids)), where)
    if doc_id in seen:
      raise DataError(f'{where}: duplicate id {doc_id!r} (first on line {seen[doc_id]})')
    seen[doc_id] = lineno
    ids.append(doc_id)
    texts.append(_join_fields(record, text_fields, where))
  return ids, texts


def read_tf_dataset(dataset, id_field: Optional[str], text_fields: Sequence[str],
                    name: str) -> tuple[list[str], list[str]]:
  """(ids, texts) of a tf.data dataset of dicts (TFDS split, seqio task source).

  Without `id_field` (or when the examples lack it) the ids are row numbers.
  """
  ids, texts, seen = [], [], {}
  for row, example in enumerate(dataset.as_numpy_iterator()):
    where = f'{name} example {row}'
    field = id_field if id_field and id_field in example else None
    doc_id = _id_of(example, field, str(row), where)
    if doc_id in seen:
      raise DataError(f'{where}: duplicate id {doc_id!r} (first in example {seen[doc_id]})')
    seen[doc_id] = row
    ids.append(doc_id)
    texts.append(_join_fields(example, text_fields, where))
  return ids, texts
