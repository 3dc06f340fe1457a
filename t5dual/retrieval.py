"""Top-k retrieval by inner product, and TREC run files.

`exact_search` streams the corpus in chunks (an in-memory array or the
memory-mapped shards of an export), so the corpus never has to fit in device
memory: for each chunk it scores every query block against the chunk and
merges the chunk's top-k into a running top-k on the device. Query blocks are
split over all local devices; the chunk is replicated. Scores are computed in
float32 at full precision (no TF32), so the ranking is exact.

`faiss_search` builds an optional FAISS index (flat, IVF or HNSW) instead.

A run (`sources.Run`) is {query_id: {doc_id: score}}, each query's documents
in rank order; `write_trec_run` writes every query in score order with ranks
1..k whatever the dicts' order.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from t5dual import cli, fileio, partitioning
from t5dual.data import sources
from t5dual.data.sources import Run
from t5dual.encoding import round_up
from t5dual.export import Embeddings
from t5dual.sides import Side

log = logging.getLogger(__name__)
Corpus = Union[np.ndarray, Embeddings, Sequence[np.ndarray]]


class RunFormatError(sources.DataError):
  """A malformed TREC run file; the message names the file and line."""


# --------------------------------------------------------------------------- exact search

def as_embeddings(corpus: Corpus) -> Embeddings:
  return corpus if isinstance(corpus, Embeddings) else Embeddings.from_arrays(corpus)


@functools.partial(jax.jit, static_argnames=('k',), donate_argnums=(0, 1))
def _merge_chunk(best_scores, best_index, queries, chunk, offset, valid, *, k: int):
  """Running top-k [b, k] merged with the top-k of `queries @ chunk[:valid].T`."""
  scores = jnp.einsum('qd,cd->qc', queries.astype(jnp.float32), chunk.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  scores = jnp.where(jnp.arange(chunk.shape[0])[None, :] < valid, scores, -jnp.inf)
  chunk_scores, chunk_index = jax.lax.top_k(scores, min(k, chunk.shape[0]))
  scores = jnp.concatenate([best_scores, chunk_scores], axis=1)
  index = jnp.concatenate([best_index, chunk_index.astype(jnp.int32) + offset], axis=1)
  top_scores, pos = jax.lax.top_k(scores, k)
  return top_scores, jnp.take_along_axis(index, pos, axis=1)


def exact_search(queries: np.ndarray, corpus: Corpus, k: int, chunk_size: int = 32768,
                 query_block: int = 4096, devices: Optional[Sequence[jax.Device]] = None,
                 partitioner: Optional[partitioning.Partitioner] = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(scores float32 [Q, k'], corpus row indices int64 [Q, k']) with k' = min(k, corpus size).

  Rows are sorted by descending score; equal scores keep the lower row first
  (XLA's top_k on CPU; accelerators may order exact ties differently).
  Each corpus chunk is read from disk once; `query_block` queries (split over
  the 'data' axis of `partitioner`; default: data-parallel over `devices` or
  this process's local devices) are scored against it at a time, so device
  memory holds about query_block x chunk_size float32 scores.
  """
  queries = np.asarray(queries)
  n = as_embeddings(corpus).count
  if queries.ndim != 2:
    raise ValueError(f'queries must be [num_queries, dim], got shape {queries.shape}')
  if n == 0:
    raise ValueError('the corpus is empty')
  if n >= 2**31:
    raise ValueError(f'corpus of {n} rows exceeds the int32 row index of exact_search')
  k = min(k, n)
  if k < 1:
    raise cli.ConfigError(f'k must be positive, got {k}')
  chunk_size = min(chunk_size, n)
  partitioner = partitioner or partitioning.local_data_parallel(devices)
  split, replicated = partitioner.batch_sharding(2), partitioner.replicated
  block = round_up(min(query_block, len(queries)), partitioner.data_parallel)
  padded = np.zeros((round_up(len(queries), block), queries.shape[1]), np.float32)
  padded[:len(queries)] = queries
  blocks = [jax.device_put(padded[i:i + block], split) for i in range(0, len(padded), block)]
  state = [(jax.device_put(np.full((block, k), -np.inf, np.float32), split),
            jax.device_put(np.full((block, k), -1, np.int32), split)) for _ in blocks]
  for offset, chunk in as_embeddings(corpus).chunks(chunk_size):
    if chunk.shape[1] != queries.shape[1]:
      raise ValueError(f'corpus dimension {chunk.shape[1]} != query dimension {queries.shape[1]}')
    valid = len(chunk)
    if valid < chunk_size:
      chunk = np.concatenate([chunk, np.zeros((chunk_size - valid, chunk.shape[1]), chunk.dtype)])
    chunk = jax.device_put(chunk, replicated)
    state = [_merge_chunk(s, i, q, chunk, np.int32(offset), np.int32(valid), k=k)
             for (s, i), q in zip(state, blocks)]
  scores = np.concatenate([np.asarray(s) for s, _ in state])[:len(queries)]
  index = np.concatenate([np.asarray(i) for _, i in state])[:len(queries)]
  return scores, index.astype(np.int64)


# --------------------------------------------------------------------------- FAISS

def _import_faiss():
  try:
    import faiss
  except ImportError:
    raise ImportError('FAISS search needs the faiss package: pip install faiss-cpu '
                      '(or faiss-gpu); exact_search needs nothing extra') from None
  return faiss


def faiss_factory_string(index: str) -> str:
  """'flat' | 'ivf' | 'ivf<nlist>' | 'hnsw' | 'hnsw<M>' | any FAISS factory string."""
  low = index.lower()
  if low == 'flat':
    return 'Flat'
  if low.startswith('ivf') and low[3:].isdigit() or low == 'ivf':
    return f'IVF{low[3:] or 1024},Flat'
  if low.startswith('hnsw') and low[4:].isdigit() or low == 'hnsw':
    return f'HNSW{low[4:] or 32}'
  return index


def faiss_search(queries: np.ndarray, corpus: Corpus, k: int, index: str = 'flat',
                 nprobe: int = 32, ef_search: int = 256, train_size: int = 262_144,
                 chunk_size: int = 65536, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Like `exact_search`, through a FAISS inner-product index (approximate unless 'flat').

  IVF indexes train on a random sample of at most `train_size` rows.
  Missing results (fewer than k found) have index -1 and score -inf.
  """
  faiss = _import_faiss()
  n = as_embeddings(corpus).count
  dim = np.asarray(queries).shape[1]
  spec = faiss_factory_string(index)
  ann = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
  if not ann.is_trained:
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, train_size), replace=False))
    parts = []
    for offset, chunk in as_embeddings(corpus).chunks(chunk_size):
      lo, hi = np.searchsorted(rows, [offset, offset + len(chunk)])
      parts.append(np.asarray(chunk[rows[lo:hi] - offset], np.float32))
    sample = np.concatenate(parts)
    ann.train(np.ascontiguousarray(sample))
  for _, chunk in as_embeddings(corpus).chunks(chunk_size):
    ann.add(np.ascontiguousarray(chunk, np.float32))
  params = faiss.ParameterSpace()
  if 'IVF' in spec:
    params.set_index_parameter(ann, 'nprobe', nprobe)
  if 'HNSW' in spec:
    params.set_index_parameter(ann, 'efSearch', ef_search)
  scores, index_ = ann.search(np.ascontiguousarray(queries, np.float32), min(k, n))
  scores = np.where(index_ < 0, -np.inf, scores).astype(np.float32)
  return scores, index_.astype(np.int64)


def search(queries: np.ndarray, corpus: Corpus, k: int, backend: str = 'exact', **kwargs
           ) -> tuple[np.ndarray, np.ndarray]:
  """`exact_search` (backend 'exact') or `faiss_search` (backend 'faiss')."""
  if backend == 'exact':
    return exact_search(queries, corpus, k, **kwargs)
  if backend == 'faiss':
    return faiss_search(queries, corpus, k, **kwargs)
  raise cli.ConfigError(f"backend must be 'exact' or 'faiss', got {backend!r}")


# --------------------------------------------------------------------------- runs

def to_run(query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray,
           index: np.ndarray, k: Optional[int] = None, exclude_identical_ids: bool = False
           ) -> Run:
  """Search results as a run; optionally drops a document whose id equals the query's
  (BEIR's `ignore_identical_ids`, for corpora such as ArguAna and Quora)."""
  if len(query_ids) != len(scores):
    raise ValueError(f'{len(query_ids)} query ids for {len(scores)} result rows')
  run: Run = {}
  for qid, row_scores, row_index in zip(query_ids, scores, index):
    ranked = run.setdefault(qid, {})
    for score, i in zip(row_scores.tolist(), row_index.tolist()):
      if i < 0 or (exclude_identical_ids and doc_ids[i] == qid):
        continue
      if k is not None and len(ranked) >= k:
        break
      ranked[doc_ids[i]] = score
  return run


def ranked(docs: 'dict[str, float]') -> list[tuple[str, float]]:
  """One query's (document id, score) pairs best first: by descending score, equal
  scores in the order given, NaN last."""
  return sorted(docs.items(), key=lambda kv: (math.isnan(kv[1]), 0.0 if math.isnan(kv[1])
                                              else -kv[1]))


def in_score_order(run: Run) -> Run:
  """`run` with each query's documents in score order (`ranked`)."""
  return {qid: dict(ranked(docs)) for qid, docs in run.items()}


def write_trec_run(path: str, run: Run, tag: str = 't5dual') -> None:
  """`qid Q0 docid rank score tag` lines, written atomically.

  Every process of a multi-host run may write the same run: each writes its own
  temporary (named by process index) and renames it, so no wrapper is needed.

  Each query's lines are in score order (`ranked`: descending, equal scores in
  the run's order) with ranks 1, 2, ..., so the line order, the rank column and
  the scores tell the same ranking, whatever order the run's dicts are in.
  """
  if not tag or any(c.isspace() for c in tag):
    raise cli.ConfigError(f'run tag must be one word, got {tag!r}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with fileio.atomic_write(path, encoding='utf-8',
                           tmp_suffix=f'.tmp{jax.process_index()}') as f:
    for qid, docs in run.items():
      for rank, (doc_id, score) in enumerate(ranked(docs), 1):
        f.write(f'{qid} Q0 {doc_id} {rank} {float(score):.9g} {tag}\n')


def read_trec_run(path: str) -> Run:
  """A TREC run file; each query's documents ordered by descending score (ties: file order)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: run file not found')
  run: dict[str, list[tuple[float, int, str]]] = {}
  seen: dict[tuple[str, str], int] = {}
  for lineno, line in sources.iter_lines(path, RunFormatError):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 6:
      raise RunFormatError(f'{path}:{lineno}: expected "qid Q0 docid rank score tag", '
                           f'got {line.strip()!r}')
    qid, _, doc_id, _, score, _ = parts
    try:
      value = float(score)
    except ValueError:
      raise RunFormatError(f'{path}:{lineno}: score {score!r} is not a number') from None
    if (qid, doc_id) in seen:
      raise RunFormatError(f'{path}:{lineno}: document {doc_id!r} listed twice for query '
                           f'{qid!r} (first on line {seen[qid, doc_id]})')
    seen[qid, doc_id] = lineno
    run.setdefault(qid, []).append((-value, lineno, doc_id))
  if not run:
    raise RunFormatError(f'{path}: empty run file')
  return {qid: {d: -s for s, _, d in sorted(rows)} for qid, rows in run.items()}


def retrieve(queries: Embeddings, corpus: Embeddings, k: int, backend: str = 'exact',
             exclude_identical_ids: bool = False, **kwargs) -> Run:
  """The top-k run of two exports (queries encoded by the query side, corpus the document side)."""
  if queries.dim != corpus.dim:
    raise sources.DataError(f'{queries.path} has dimension {queries.dim}, {corpus.path} has '
                            f'{corpus.dim}')
  for emb, side in ((queries, Side.QUERY), (corpus, Side.DOCUMENT)):
    if emb.side != side:
      log.warning('%s export %s was encoded by the %s side', side.beir_part, emb.path, emb.side)
  scores, index = search(queries.to_numpy(), corpus, k + int(exclude_identical_ids),
                         backend, **kwargs)
  return to_run(queries.ids, corpus.ids, scores, index, k, exclude_identical_ids)
