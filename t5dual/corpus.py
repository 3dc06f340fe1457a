"""Texts to encode, with their ids: readers for JSONL files and tf.data datasets, and the
checks every encoder runs before it starts.

A corpus is a pair (ids, texts) of equal-length lists in input order, or a
`Corpus`: the ids in memory and the texts read a range of rows at a time, so
that export, BM25 indexing and evaluation hold one chunk of texts, not the
whole collection (`JsonlCorpus` keeps the byte offset of every row of a JSONL
file, found in one pass; `RecordsCorpus` reads a random-access source such as
`tfds.data_source`). An id is a
non-empty string without whitespace (TREC run files are whitespace-separated);
a text joins the record's chosen text fields (e.g. title and text) with a
space. A text may be empty: it is encoded as a lone EOS and still gets its
vector, and `validate_corpus` warns once with the count (see
`t5dual.data.sources` for BEIR folders, which follow the same rules).
"""

from __future__ import annotations

import array
import hashlib
import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from t5dual.data import sources
from t5dual.data.sources import DataError


def validate_corpus(ids: Sequence[str], texts: Sequence[str], what: str = 'corpus') -> None:
  """Raises DataError on duplicate or malformed ids; warns once about empty texts."""
  if len(ids) != len(texts):
    raise DataError(f'{what}: {len(ids)} ids but {len(texts)} texts')
  validate_ids(ids, what)
  for pos, text in enumerate(texts):
    if not isinstance(text, str):
      raise DataError(f'{what}: text of id {ids[pos]!r} (position {pos}) is '
                      f'{type(text).__name__}, not str')
  warn_empty(what, ids, [p for p, t in enumerate(texts) if not t.strip()])


def validate_ids(ids: Sequence[str], what: str) -> None:
  """Raises DataError on no ids, duplicate ids, or ids that are not whitespace-free strings."""
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


def warn_empty(what: str, ids: Sequence[str], empty_rows: Sequence[int]) -> None:
  sources.warn_empty_texts(what, [repr(ids[p]) for p in empty_rows], len(ids))


class StringsDigest:
  """sha256 of a sequence of strings, each prefixed by its UTF-8 length (so that
  ['ab', 'c'] and ['a', 'bc'] differ), fed one string at a time."""

  def __init__(self):
    self._hash = hashlib.sha256()

  def update(self, text: str) -> None:
    b = text.encode('utf-8')
    self._hash.update(len(b).to_bytes(8, 'little'))
    self._hash.update(b)

  def hexdigest(self) -> str:
    return self._hash.hexdigest()


def sha256_strings(strings) -> str:
  digest = StringsDigest()
  for s in strings:
    digest.update(s)
  return digest.hexdigest()


class Corpus:
  """A corpus whose ids are in memory and whose texts are read by row range.

  Subclasses set `name` (where the texts come from, in messages), `ids`, and
  implement `texts(start, stop)` and `texts_sha256` (of all texts in order, as
  `sha256_strings`); `validate` runs the checks of `validate_corpus`.
  """

  name: str
  ids: list[str]

  def __len__(self) -> int:
    return len(self.ids)

  def texts(self, start: int, stop: int) -> list[str]:
    raise NotImplementedError

  @property
  def texts_sha256(self) -> str:
    raise NotImplementedError

  def validate(self) -> None:
    raise NotImplementedError

  def chunks(self, size: int) -> Iterator[tuple[int, list[str]]]:
    """(first row, texts) of consecutive ranges of at most `size` rows."""
    for start in range(0, len(self), size):
      yield start, self.texts(start, min(start + size, len(self)))


class InMemoryCorpus(Corpus):
  """(ids, texts) lists as a Corpus."""

  def __init__(self, ids: Sequence[str], texts: Sequence[str], name: str = 'corpus'):
    self.ids, self._texts, self.name = ids, texts, name

  def texts(self, start: int, stop: int) -> list[str]:
    return list(self._texts[start:stop])

  @property
  def texts_sha256(self) -> str:
    return sha256_strings(self._texts)

  def validate(self) -> None:
    validate_corpus(self.ids, self._texts, self.name)


class _Scan:
  """What one pass over a corpus records: ids, empty rows and the digest of the texts."""

  def __init__(self):
    self.ids, self.empty, self.digest = [], [], StringsDigest()

  def add(self, doc_id: str, text: str) -> None:
    if not text.strip():
      self.empty.append(len(self.ids))
    self.ids.append(doc_id)
    self.digest.update(text)


class _ScannedCorpus(Corpus):
  """A corpus whose first pass kept the ids, the empty rows and the digest of the texts."""

  def _keep(self, scan: _Scan) -> None:
    self.ids, self._empty, self._sha256 = scan.ids, scan.empty, scan.digest.hexdigest()

  @property
  def texts_sha256(self) -> str:
    return self._sha256

  def validate(self) -> None:
    validate_ids(self.ids, self.name)
    warn_empty(self.name, self.ids, self._empty)


# (record, file, line, row) -> (id, text); raises DataError naming the file and line.
ParseFn = Callable[[dict, str, int, int], tuple[str, str]]


class JsonlCorpus(_ScannedCorpus):
  """A JSONL file read a range of rows at a time.

  One pass (`JsonlCorpus(path, parse)`) parses every line, checks the ids and
  keeps the ids, the byte offset and line of every row (16 bytes a row) and the
  digest of the texts; `texts(start, stop)` then seeks to row `start` and parses
  only the rows asked for. A file changed after the pass is an error, not a
  silent mix of two versions.
  """

  def __init__(self, path: str, parse: ParseFn, name: Optional[str] = None,
               id_label: str = 'id'):
    self.path, self._parse, self.name = path, parse, name or path
    scan, offsets, lines, seen = _Scan(), array.array('q'), array.array('q'), {}
    for lineno, offset, record in sources.iter_jsonl_at(path):
      doc_id, text = parse(record, path, lineno, len(scan.ids))
      if doc_id in seen:
        raise DataError(f'{path}:{lineno}: duplicate {id_label} {doc_id!r} (first on line '
                        f'{seen[doc_id]})')
      seen[doc_id] = lineno
      scan.add(doc_id, text)
      offsets.append(offset)
      lines.append(lineno)
    self._keep(scan)
    self._offsets, self._lines = np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int64)

  def texts(self, start: int, stop: int) -> list[str]:
    out: list[str] = []
    if start >= stop:
      return out
    rows = sources.iter_jsonl_at(self.path, offset=int(self._offsets[start]),
                                 first_line=int(self._lines[start]))
    for lineno, _, record in rows:
      row = start + len(out)
      doc_id, text = self._parse(record, self.path, lineno, row)
      if doc_id != self.ids[row]:
        raise DataError(f'{self.path}:{lineno}: id {doc_id!r} where {self.ids[row]!r} was when '
                        'the file was first read; the file changed while in use')
      out.append(text)
      if len(out) == stop - start:
        break
    if len(out) < stop - start:
      raise DataError(f'{self.path}: ends before row {start + len(out)}; the file changed '
                      'while in use')
    return out


class RecordsCorpus(_ScannedCorpus):
  """A random-access sequence of example dicts (e.g. `tfds.data_source(...)`): one pass
  for the ids and the digest, then `texts(start, stop)` reads those records alone."""

  def __init__(self, records, id_field: Optional[str], text_fields: Sequence[str],
               name: str):
    self._records, self._id_field, self._fields, self.name = (records, id_field,
                                                               tuple(text_fields), name)
    scan, seen = _Scan(), {}
    for row in range(len(records)):
      doc_id, text = self._parse(records[row], row)
      if doc_id in seen:
        raise DataError(f'{name} example {row}: duplicate id {doc_id!r} (first in example '
                        f'{seen[doc_id]})')
      seen[doc_id] = row
      scan.add(doc_id, text)
    self._keep(scan)

  def _parse(self, example: dict, row: int) -> tuple[str, str]:
    return _example(example, row, self._id_field, self._fields, self.name)

  def texts(self, start: int, stop: int) -> list[str]:
    return [self._parse(self._records[row], row)[1] for row in range(start, stop)]


def beir_corpus(folder: str) -> JsonlCorpus:
  """corpus.jsonl of a BEIR folder as a JsonlCorpus (`sources.read_beir_corpus`'s rows)."""
  return JsonlCorpus(os.path.join(folder, 'corpus.jsonl'),
                     lambda record, path, lineno, row: sources.beir_document(record, path, lineno),
                     id_label='_id')


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
  parse = jsonl_parser(id_field, text_fields)
  for lineno, record in sources.iter_jsonl(path):
    doc_id, text = parse(record, path, lineno, len(ids))
    if doc_id in seen:
      raise DataError(f'{path}:{lineno}: duplicate id {doc_id!r} (first on line {seen[doc_id]})')
    seen[doc_id] = lineno
    ids.append(doc_id)
    texts.append(text)
  return ids, texts


def jsonl_parser(id_field: Optional[str], text_fields: Sequence[str]) -> ParseFn:
  """The (id, text) of a record of a JSONL corpus, as `read_jsonl_corpus` reads it (the
  row number is the id without `id_field`)."""
  def parse(record: dict, path: str, lineno: int, row: int) -> tuple[str, str]:
    where = f'{path}:{lineno}'
    return _id_of(record, id_field, str(row), where), _join_fields(record, text_fields, where)
  return parse


def read_tf_dataset(dataset, id_field: Optional[str], text_fields: Sequence[str],
                    name: str) -> tuple[list[str], list[str]]:
  """(ids, texts) of a tf.data dataset of dicts (TFDS split, seqio task source).

  Without `id_field` (or when the examples lack it) the ids are row numbers.
  """
  ids, texts, seen = [], [], {}
  for row, example in enumerate(dataset.as_numpy_iterator()):
    doc_id, text = _example(example, row, id_field, text_fields, name)
    if doc_id in seen:
      raise DataError(f'{name} example {row}: duplicate id {doc_id!r} (first in example '
                      f'{seen[doc_id]})')
    seen[doc_id] = row
    ids.append(doc_id)
    texts.append(text)
  return ids, texts


def _example(example: dict, row: int, id_field: Optional[str], text_fields: Sequence[str],
             name: str) -> tuple[str, str]:
  """(id, text) of a dataset example; the id is the row number without `id_field`."""
  where = f'{name} example {row}'
  field = id_field if id_field and id_field in example else None
  return _id_of(example, field, str(row), where), _join_fields(example, text_fields, where)
