"""Sharded, resumable export of embeddings for a whole corpus, and reading exports back.

The corpus (ids + texts, in input order; see `t5dual.corpus`) is cut into
shards of `shard_size` consecutive rows; shard n holds rows n*shard_size ..
and is written by process n % process_count, so each host of a multi-host run
writes its own shards. Inside a shard the texts are encoded in length-bucketed
batches (`t5dual.encoding`) and the vectors are written in input order.

Layout of an export directory (shard n of N):

  plan.json                           what is exported; checked when resuming
  embeddings-0000n-of-0000N.npy       [rows, dim] float16 / float32, memory-mappable
  ids-0000n-of-0000N.txt              the ids of those rows, one per line
  embeddings-0000n-of-0000N.parquet   (optional) columns id, vector
  shard-0000n-of-0000N.json           written last: the shard is complete
  manifest.json                       plan + every shard's count and sha256

The plan's "tower" is the side's tower name ('left' = queries, 'right' =
documents; `Side.tower`). Each file is written under a temporary name and
renamed, and the shard's json is written after its data files, so an export
killed at any moment resumes from the last complete shard and ends with
exactly one vector per id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator, Optional, Sequence, Union

import jax
import numpy as np

from t5dual import cli, corpus, encoding, fileio
from t5dual.data import sources
from t5dual.sides import Side

log = logging.getLogger(__name__)

FORMAT = 't5dual.embeddings/1'
PLAN = 'plan.json'
MANIFEST = 'manifest.json'
DTYPES = ('float16', 'float32')


class ExportError(sources.DataError):
  """Bad export options, or an export directory that is incomplete or corrupt."""


# --------------------------------------------------------------------------- files

_sha256_file = fileio.sha256_file


def shard_names(index: int, num_shards: int) -> dict[str, str]:
  tag = f'{index:05d}-of-{num_shards:05d}'
  return {'embeddings': f'embeddings-{tag}.npy', 'ids': f'ids-{tag}.txt',
          'parquet': f'embeddings-{tag}.parquet', 'done': f'shard-{tag}.json'}


def _write_json(path: str, obj: dict, tmp_suffix: str = '.tmp') -> None:
  fileio.write_json(path, obj, indent=1, sort_keys=True, tmp_suffix=tmp_suffix)


def _read_json(path: str) -> dict:
  return fileio.read_json(path, ExportError)


def _import_pyarrow():
  """(pyarrow, pyarrow.parquet); a one-line UserError where it is missing."""
  try:
    import pyarrow
    import pyarrow.parquet
  except ImportError:
    raise cli.UserError("parquet output needs pyarrow, which t5dual's set-up installs "
                        "(setup.py pins it): bash scripts/run.sh export ... , or pip install "
                        "-e . in the project's .venv") from None
  return pyarrow, pyarrow.parquet


def _write_parquet(path: str, ids: Sequence[str], vectors: np.ndarray) -> None:
  pa, pq = _import_pyarrow()
  values = pa.array(vectors.reshape(-1))
  table = pa.table({'id': pa.array(list(ids), pa.string()),
                    'vector': pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])})
  with fileio.atomic_path(path) as tmp:
    pq.write_table(table, tmp)


def _shard_complete(out_dir: str, record_path: str, verify: bool) -> Optional[dict]:
  """The shard's record if it and its files are intact, else None."""
  if not os.path.exists(record_path):
    return None
  record = _read_json(record_path)
  for key in ('embeddings', 'ids', 'parquet'):
    if key not in record:
      continue
    path = os.path.join(out_dir, record[key])
    if not os.path.exists(path):
      log.warning('%s: %s is missing; re-encoding the shard', record_path, record[key])
      return None
    if verify and _sha256_file(path) != record[key + '_sha256']:
      log.warning('%s: checksum of %s differs; re-encoding the shard', record_path, record[key])
      return None
  return record


# --------------------------------------------------------------------------- export

@dataclasses.dataclass
class ExportOptions:
  """How to export; `side` is a Side or any of its names (query/left, document/right)."""

  max_length: int
  side: Side
  batch_size: int = 64
  shard_size: int = 50_000
  dtype: str = 'float16'
  buckets: Optional[Sequence[int]] = None
  parquet: bool = False
  progress: bool = True

  def __post_init__(self):
    try:
      self.side = Side.parse(self.side)
    except ValueError as e:
      raise ExportError(str(e)) from None
    if self.dtype not in DTYPES:
      raise ExportError(f'dtype must be one of {DTYPES}, got {self.dtype!r}')
    if self.shard_size < 1:
      raise ExportError(f'shard_size must be positive, got {self.shard_size}')
    if self.batch_size < 1 or self.max_length < 1:
      raise ExportError(f'batch_size and max_length must be positive, got {self.batch_size} '
                        f'and {self.max_length}')
    if self.parquet:
      _import_pyarrow()  # before any shard is written


def make_plan(ids: Sequence[str], texts: Union[Sequence[str], corpus.Corpus],
              options: ExportOptions, model_info: Optional[dict] = None,
              step: Optional[int] = None) -> dict:
  """What an export directory holds; two runs may only share a directory with equal plans.

  `texts` is the list of texts, or a `corpus.Corpus` (whose digest is computed once).
  """
  texts_sha256 = (texts.texts_sha256 if isinstance(texts, corpus.Corpus)
                  else corpus.sha256_strings(texts))
  return {
      'format': FORMAT,
      'model': model_info or {},
      'step': step,
      'tower': options.side.tower,
      'dtype': options.dtype,
      'max_length': options.max_length,
      'count': len(ids),
      'shard_size': options.shard_size,
      'num_shards': encoding.round_up(len(ids), options.shard_size) // options.shard_size,
      'ids_sha256': corpus.sha256_strings(ids),
      'texts_sha256': texts_sha256,
      'parquet': options.parquet,
  }


def _check_plan(out_dir: str, plan: dict, process_index: int) -> None:
  """Writes plan.json, or checks that the one there is the same (processes may race)."""
  diff = fileio.write_or_compare_json(os.path.join(out_dir, PLAN), plan, error=ExportError,
                                      tmp_suffix=f'.tmp{process_index}')
  if diff:
    raise ExportError(f'{out_dir} holds a different export (differs in: {", ".join(diff)}); '
                      'use a new directory or delete it')


def export_embeddings(encode_fn: encoding.EncodeFn, tokenizer, ids: Sequence[str],
                      texts: Sequence[str], out_dir: str, options: ExportOptions,
                      model_info: Optional[dict] = None, step: Optional[int] = None,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None,
                      name: str = 'export input') -> Optional[dict]:
  """`export_corpus` of (ids, texts) lists."""
  return export_corpus(encode_fn, tokenizer, corpus.InMemoryCorpus(ids, texts, name), out_dir,
                       options, model_info, step, process_index, process_count)


def export_corpus(encode_fn: encoding.EncodeFn, tokenizer, source: corpus.Corpus,
                  out_dir: str, options: ExportOptions, model_info: Optional[dict] = None,
                  step: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Optional[dict]:
  """Encodes this process's shards that are not complete yet; returns the manifest.

  `process_index` / `process_count` default to JAX's. The manifest is written
  (and returned) once every shard of every process is complete; on a real
  multi-host run the processes wait for each other and process 0 writes it.
  Otherwise None is returned (other simulated processes still have work).
  The texts are read one shard at a time (`source.texts`), so a corpus read from
  a file holds one shard of texts in memory. `source.name` says where the texts
  come from, in messages; empty texts are encoded (as EOS only) with one warning.
  """
  source.validate()
  ids = source.ids
  multihost = process_index is None and jax.process_count() > 1
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ExportError(f'process_index {process_index} not in [0, {process_count})')
  plan = make_plan(ids, source, options, model_info, step)
  _check_plan(out_dir, plan, process_index)
  num_shards, size = plan['num_shards'], options.shard_size
  mine = range(process_index, num_shards, process_count)

  todo = []
  for n in mine:
    names = shard_names(n, num_shards)
    if _shard_complete(out_dir, os.path.join(out_dir, names['done']), verify=True) is None:
      todo.append(n)
  total = sum(min(size, len(ids) - n * size) for n in mine)
  remaining = sum(min(size, len(ids) - n * size) for n in todo)
  bar = _Progress(total, total - remaining, options, process_index)
  try:
    for n in todo:
      start, stop = n * size, min((n + 1) * size, len(ids))
      vectors = encoding.encode_texts(encode_fn, tokenizer, source.texts(start, stop),
                                      options.max_length, options.batch_size, options.buckets,
                                      on_batch=bar.advance)
      _write_shard(out_dir, n, num_shards, start, list(ids[start:stop]),
                   vectors.astype(options.dtype), options.parquet, process_index)
  finally:
    bar.close()

  if multihost:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('t5dual.export: shards written')
    if process_index == 0:
      finalize(out_dir)
    multihost_utils.sync_global_devices('t5dual.export: manifest written')
    return load_manifest(out_dir)
  if all(os.path.exists(os.path.join(out_dir, shard_names(n, num_shards)['done']))
         for n in range(num_shards)):
    return finalize(out_dir)
  return None


class _Progress:
  """A tqdm bar over this process's rows that draws its 100% line once.

  tqdm's `close` always redraws the bar; when the last `update` has already
  drawn 100%, a log file (no carriage returns) shows that line twice. So the
  last rows are counted without drawing and `close` draws them; an export with
  nothing left to encode shows no bar at all.
  """

  def __init__(self, total: int, initial: int, options: ExportOptions, process_index: int):
    from tqdm import tqdm
    self.bar = tqdm(total=total, initial=initial, unit='doc', unit_scale=total >= 100_000,
                    smoothing=0.1, disable=not options.progress or initial >= total,
                    desc=f'{options.side} embeddings (process {process_index})')

  def advance(self, rows: int) -> None:
    if self.bar.n + rows < self.bar.total:
      self.bar.update(rows)
    else:
      self.bar.n += rows

  def close(self) -> None:
    self.bar.close()


def _write_shard(out_dir: str, index: int, num_shards: int, start: int, ids: list[str],
                 vectors: np.ndarray, parquet: bool, process_index: int) -> dict:
  names = shard_names(index, num_shards)
  paths = {k: os.path.join(out_dir, v) for k, v in names.items()}

  with fileio.atomic_write(paths['ids'], encoding='utf-8', newline='\n') as f:
    f.writelines(i + '\n' for i in ids)
  with fileio.atomic_write(paths['embeddings'], 'wb') as f:
    np.save(f, np.ascontiguousarray(vectors))
  record = {'index': index, 'start': start, 'count': len(ids), 'dim': int(vectors.shape[1]),
            'process_index': process_index,
            'embeddings': names['embeddings'],
            'embeddings_sha256': _sha256_file(paths['embeddings']),
            'ids': names['ids'], 'ids_sha256': _sha256_file(paths['ids'])}
  if parquet:
    _write_parquet(paths['parquet'], ids, vectors)
    record.update(parquet=names['parquet'], parquet_sha256=_sha256_file(paths['parquet']))
  _write_json(paths['done'], record)
  return record


def finalize(out_dir: str) -> dict:
  """Checks that every shard is complete and the ids add up, then writes manifest.json."""
  plan = _read_json(os.path.join(out_dir, PLAN))
  shards, ids = [], []
  for n in range(plan['num_shards']):
    names = shard_names(n, plan['num_shards'])
    record = _shard_complete(out_dir, os.path.join(out_dir, names['done']), verify=False)
    if record is None:
      raise ExportError(f'{out_dir}: shard {n} of {plan["num_shards"]} is not complete; '
                        'run the export again to finish it')
    shards.append(record)
    ids += _read_ids(os.path.join(out_dir, record['ids']))
  dims = {s['dim'] for s in shards}
  if len(dims) != 1:
    raise ExportError(f'{out_dir}: shards disagree on the dimension: {sorted(dims)}')
  if len(ids) != plan['count'] or corpus.sha256_strings(ids) != plan['ids_sha256']:
    raise ExportError(f'{out_dir}: the shards hold {len(ids)} ids that do not match the '
                      f'{plan["count"]} ids of the plan')
  manifest = dict(plan, dimension=dims.pop(), shards=shards)
  _write_json(os.path.join(out_dir, MANIFEST), manifest)
  return manifest


# --------------------------------------------------------------------------- reading

def _read_ids(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return f.read().splitlines()


def load_manifest(out_dir: str) -> dict:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    detail = ('the export is incomplete; run it again to finish'
              if os.path.exists(os.path.join(out_dir, PLAN)) else 'not an embeddings export')
    raise ExportError(f'{path} not found: {detail}')
  manifest = _read_json(path)
  if manifest.get('format') != FORMAT:
    raise ExportError(f'{path}: unknown format {manifest.get("format")!r}, expected {FORMAT!r}')
  return manifest


@dataclasses.dataclass
class Embeddings:
  """An export opened for reading: ids and memory-mapped shards, in input order."""

  path: str
  manifest: dict
  ids: list[str]
  shards: list[np.ndarray]

  @classmethod
  def from_arrays(cls, arrays) -> 'Embeddings':
    """In-memory vectors (one array or a list of [rows, dim] arrays), without ids."""
    arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
    return cls('<memory>', {'dimension': arrays[0].shape[1]}, [], arrays)

  @property
  def side(self) -> Optional[Side]:
    """The side that encoded the vectors (None for in-memory arrays)."""
    tower = self.manifest.get('tower')
    return Side.parse(tower) if tower else None

  @property
  def count(self) -> int:
    return sum(len(s) for s in self.shards)

  @property
  def dim(self) -> int:
    return self.manifest['dimension']

  def to_numpy(self, dtype=np.float32) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype) for s in self.shards], axis=0)

  def take(self, rows: Sequence[int], dtype=np.float32) -> np.ndarray:
    """The vectors of the given rows (any order), reading only those from the shards."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), self.dim), dtype)
    start = 0
    for shard in self.shards:
      sel = np.flatnonzero((rows >= start) & (rows < start + len(shard)))
      out[sel] = shard[rows[sel] - start]
      start += len(shard)
    return out

  def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, [<= size, dim] array) pieces covering all rows; pieces span shards."""
    offset, parts, have = 0, [], 0
    for shard in self.shards:
      pos = 0
      while pos < len(shard):
        take = min(size - have, len(shard) - pos)
        parts.append(shard[pos:pos + take])
        have, pos = have + take, pos + take
        if have == size:
          yield offset, np.concatenate(parts, axis=0)
          offset, parts, have = offset + size, [], 0
    if parts:
      yield offset, np.concatenate(parts, axis=0)


def open_embeddings(out_dir: str, verify_checksums: bool = False) -> Embeddings:
  """Opens a complete export; checks shapes, dtype, counts and (optionally) sha256s."""
  manifest = load_manifest(out_dir)
  ids, shards = [], []
  for record in manifest['shards']:
    path = os.path.join(out_dir, record['embeddings'])
    for key in ('embeddings', 'ids'):
      file = os.path.join(out_dir, record[key])
      if not os.path.exists(file):
        raise ExportError(f'{file} is listed in the manifest but missing')
      if verify_checksums and _sha256_file(file) != record[key + '_sha256']:
        raise ExportError(f'{file}: sha256 differs from the manifest (file corrupt or replaced)')
    array = np.load(path, mmap_mode='r')
    expected = (record['count'], manifest['dimension'])
    if array.shape != expected or array.dtype != np.dtype(manifest['dtype']):
      raise ExportError(f'{path}: {array.dtype}{list(array.shape)}, manifest says '
                        f'{manifest["dtype"]}{list(expected)}')
    shard_ids = _read_ids(os.path.join(out_dir, record['ids']))
    if len(shard_ids) != record['count']:
      raise ExportError(f'{record["ids"]}: {len(shard_ids)} ids for {record["count"]} vectors')
    ids += shard_ids
    shards.append(array)
  if len(ids) != manifest['count'] or len(set(ids)) != len(ids):
    raise ExportError(f'{out_dir}: {len(ids)} ids ({len(set(ids))} distinct), manifest says '
                      f'{manifest["count"]}')
  return Embeddings(out_dir, manifest, ids, shards)
