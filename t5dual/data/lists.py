"""Training lists for rerankers: per query, qrels positives + first-stage negatives.

A list holds up to `list_size` (2..100) candidates of one query:
  - up to `num_positives` documents judged relevant (qrels relevance >= min_relevance),
    labelled with their graded relevance;
  - negatives sampled uniformly, without replacement, from the documents a
    first-stage run (a TREC run file: BM25 from t5dual.bm25, a t5dual
    retrieval run, anything) ranks inside [min_rank, max_rank] (1-based, ranks
    by descending score, ties in file order), excluding every document judged
    relevant at any grade; labelled 0;
  - padding up to list_size when the window is short (where = False).
Localized contrastive estimation (Gao et al. 2021) is this sampling with one
positive and `ranking_losses.lce_loss`.

Optional teacher scores (distillation) come from a TREC run or a JSONL file of
  {"query_id": "q1", "scores": {"d1": 3.2, "d7": 1.5, ...}}   or
  {"query_id": "q1", "ranking": ["d7", "d1", ...]}          (best first; score = -rank).
With a teacher, only documents it scored are sampled, so every valid list
entry has a teacher score.

Queries without a positive, without a negative in the window, or (with a
teacher) without a teacher-scored positive are skipped with one warning that
counts them: a list with no positive never reaches a loss. Malformed lines and
lines naming unknown query or document ids raise `sources.DataError` naming
the file and line.

`ListBatcher.batch(step)` is a pure function of (seed, step), like
`pipeline.PairBatcher`: batch s holds stream positions s*B .. s*B+B-1 of an
endless stream in which epoch e visits the queries in `permutation(seed, e)`,
and the list at position p is sampled with a generator seeded by (seed, p).
A resumed run sees the same batches, and slice k of n, rows [k * B / n, (k + 1) * B / n)
of the global batch, is what the processes of data shard k load
(partitioning.DataLayout).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Callable, Container, Mapping, Optional

import numpy as np

from t5dual.data import pipeline, sources
from t5dual.vocab import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = 'Query: {query} Document: {document}'
MIN_LIST_SIZE, MAX_LIST_SIZE = 2, 100
_LIST_STREAM = 7  # separates the list-sampling seeds from the epoch-permutation seeds

RankedList = list[tuple[str, float]]  # (document id, score), best first


def reranker_input(query: str, document: str) -> str:
  """The reranker's input text (RankT5's template)."""
  return DEFAULT_TEMPLATE.format(query=query, document=document)


def read_run(path: str, query_ids: Container[str], doc_ids: Container[str]
             ) -> dict[str, RankedList]:
  """A TREC run, each query's documents by descending score (ties: file order).

  Every line must read `qid Q0 docid rank score tag` and name a known query
  and document; otherwise DataError names the file and line.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: run file not found')
  rows: dict[str, list[tuple[float, int, str]]] = {}
  seen: dict[tuple[str, str], int] = {}
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      entry = parse_run_line(line, path, lineno)
      if entry is None:
        continue
      qid, doc_id, value = entry
      where = f'{path}:{lineno}'
      if qid not in query_ids:
        raise sources.DataError(f'{where}: query id {qid!r} is not in queries.jsonl')
      if doc_id not in doc_ids:
        raise sources.DataError(f'{where}: document id {doc_id!r} is not in corpus.jsonl')
      if (qid, doc_id) in seen:
        raise sources.DataError(f'{where}: document {doc_id!r} listed twice for query '
                                f'{qid!r} (first on line {seen[qid, doc_id]})')
      seen[qid, doc_id] = lineno
      rows.setdefault(qid, []).append((-value, lineno, doc_id))
  if not rows:
    raise sources.DataError(f'{path}: empty run file')
  return {qid: [(d, -s) for s, _, d in sorted(r)] for qid, r in rows.items()}


def parse_run_line(line: str, path: str, lineno: int) -> Optional[tuple[str, str, float]]:
  """(query id, document id, score) of a TREC run line, None for a blank one; DataError
  names the file and line of a malformed one."""
  parts = line.split()
  if not parts:
    return None
  where = f'{path}:{lineno}'
  if len(parts) != 6:
    raise sources.DataError(f'{where}: expected "qid Q0 docid rank score tag", '
                            f'got {line.strip()!r}')
  qid, _, doc_id, _, score, _ = parts
  try:
    value = float(score)
  except ValueError:
    raise sources.DataError(f'{where}: score {score!r} is not a number') from None
  if not math.isfinite(value):
    raise sources.DataError(f'{where}: score {score!r} is not finite')
  return qid, doc_id, value


def read_teacher(path: str, query_ids: Container[str], doc_ids: Container[str]
                 ) -> dict[str, dict[str, float]]:
  """Teacher scores {query id: {doc id: score}} from a JSONL file (.jsonl) or a TREC run."""
  if not path.endswith('.jsonl'):
    return {q: dict(ranked) for q, ranked in read_run(path, query_ids, doc_ids).items()}
  teacher: dict[str, dict[str, float]] = {}
  first_line: dict[str, int] = {}
  for lineno, record in sources.iter_jsonl(path):
    where = f'{path}:{lineno}'
    qid, scores = teacher_record(record, where, query_ids, first_line.get)
    first_line[qid] = lineno
    unknown = [d for d in scores if d not in doc_ids]
    if unknown:
      raise sources.DataError(f'{where}: document id {unknown[0]!r} is not in corpus.jsonl')
    teacher[qid] = scores
  if not teacher:
    raise sources.DataError(f'{path}: no teacher scores')
  return teacher


def teacher_record(record: dict, where: str, query_ids: Container[str],
                   first_line: Callable[[str], Optional[int]]) -> tuple[str, dict[str, float]]:
  """(query id, {document id: score}) of a JSONL teacher's record at `where` (file:line),
  checked in this order: a known query, not seen before (`first_line(query id)`: the
  line it was first on, None if new), exactly one of "scores" / "ranking", distinct ids
  or finite numbers. Its document ids are the caller's to check (read_teacher one by
  one, the prepared store's reader vectorised), after these checks."""
  qid = record.get('query_id')
  if not isinstance(qid, str) or qid not in query_ids:
    raise sources.DataError(f'{where}: "query_id" {qid!r} is not in queries.jsonl')
  first = first_line(qid)
  if first is not None:
    raise sources.DataError(f'{where}: query {qid!r} again (first on line {first})')
  if ('scores' in record) == ('ranking' in record):
    raise sources.DataError(f'{where}: give exactly one of "scores" (an object) or '
                            '"ranking" (a list of document ids, best first)')
  if 'ranking' in record:
    ranking = record['ranking']
    if not isinstance(ranking, list) or len(set(map(str, ranking))) != len(ranking):
      raise sources.DataError(f'{where}: "ranking" must be a list of distinct document ids')
    return qid, {str(d): -float(rank) for rank, d in enumerate(ranking, 1)}
  scores = record['scores']
  if not isinstance(scores, dict) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
      for v in scores.values()):
    raise sources.DataError(f'{where}: "scores" must map document ids to finite numbers')
  return qid, {d: float(v) for d, v in scores.items()}


@dataclasses.dataclass
class TrainingLists:
  """Candidates per query; documents are rows of `doc_ids` / `documents`.

  positives[i]: (document row, relevance) of query i, in qrels order.
  negatives[i]: document rows in the rank window, in rank order.
  teacher[i]: {document row: teacher score}, or teacher is None.
  skipped: how many queries were left out, by reason.
  """

  query_ids: list[str]
  queries: list[str]
  positives: list[list[tuple[int, float]]]
  negatives: list[list[int]]
  doc_ids: list[str]
  documents: list[str]
  teacher: Optional[list[dict[int, float]]] = None
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.query_ids)


def build_lists(queries: Mapping[str, str], doc_ids: list[str], documents: list[str],
                qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, RankedList], *,
                min_rank: int = 1, max_rank: int = 100, min_relevance: int = 1,
                teacher: Optional[Mapping[str, Mapping[str, float]]] = None,
                source: str = 'lists') -> TrainingLists:
  """Training lists of the queries of `qrels` and `run` (ids already validated)."""
  if not 1 <= min_rank <= max_rank:
    raise ValueError(f'rank window must satisfy 1 <= min_rank <= max_rank, got '
                     f'[{min_rank}, {max_rank}]')
  if min_relevance < 1:
    raise ValueError(f'min_relevance must be >= 1, got {min_relevance}')
  row = {d: i for i, d in enumerate(doc_ids)}
  out = TrainingLists([], [], [], [], list(doc_ids), list(documents),
                      [] if teacher is not None else None)
  skipped = {'no positive': 0, 'no negative in the rank window': 0,
             'no teacher score for a positive': 0}
  for qid in dict.fromkeys(list(qrels) + list(run)):  # qrels order, then run-only queries
    judged = qrels.get(qid, {})
    scores = None if teacher is None else teacher.get(qid, {})
    positives = [(row[d], float(rel)) for d, rel in judged.items() if rel >= min_relevance]
    if not positives:
      skipped['no positive'] += 1
      continue
    if scores is not None:
      positives = [(r, rel) for r, rel in positives if doc_ids[r] in scores]
      if not positives:
        skipped['no teacher score for a positive'] += 1
        continue
    window = run.get(qid, [])[min_rank - 1:max_rank]
    negatives = [row[d] for d, _ in window
                 if judged.get(d, 0) <= 0 and (scores is None or d in scores)]
    if not negatives:
      skipped['no negative in the rank window'] += 1
      continue
    out.query_ids.append(qid)
    out.queries.append(queries[qid])
    out.positives.append(positives)
    out.negatives.append(negatives)
    if scores is not None:
      rows = [r for r, _ in positives] + negatives
      out.teacher.append({r: scores[doc_ids[r]] for r in rows})
  out.skipped = {k: v for k, v in skipped.items() if v}
  if out.skipped:
    log.warning('%s: skipped %d queries (%s); %d lists remain', source,
                sum(out.skipped.values()),
                ', '.join(f'{v} with {k}' for k, v in out.skipped.items()), len(out))
  if not out.query_ids:
    raise sources.DataError(f'{source}: no query has both a positive and a negative in '
                            f'ranks [{min_rank}, {max_rank}] ({out.skipped})')
  return out


def read_qrels(path: str, query_ids: Container[str], doc_ids: Container[str]
               ) -> dict[str, dict[str, int]]:
  """{query id: {document id: relevance}} of a qrels file whose every line names a known
  query and document (DataError names the file and line otherwise)."""
  qrels: dict[str, dict[str, int]] = {}
  for lineno, qid, did, score in sources._qrels_rows(path):  # line-numbered reader
    if qid not in query_ids:
      raise sources.DataError(f'{path}:{lineno}: query id {qid!r} is not in queries.jsonl')
    if did not in doc_ids:
      raise sources.DataError(f'{path}:{lineno}: corpus id {did!r} is not in corpus.jsonl')
    qrels.setdefault(qid, {})[did] = score
  return qrels


# Host memory of a TREC run read into lists, per byte of the file: ~470 bytes an entry of
# ~36 bytes (BENCHMARKS.md, "Training data": 2.2 GiB for 5M entries).
RUN_MEMORY_PER_BYTE = 13


def load_lists(beir: str, split: str, run: 'str | Mapping[str, Mapping[str, float]]', *,
               min_rank: int = 1,
               max_rank: int = 100, min_relevance: int = 1,
               teacher_path: Optional[str] = None) -> TrainingLists:
  """Lists for the queries of <beir>/qrels/<split>.tsv and of the first-stage run.

  `run` is a TREC run file, or a run already in memory ({query id: {doc id:
  score}}, e.g. `bm25.beir_run`), whose ids are then trusted.
  """
  doc_ids, documents = sources.read_beir_corpus(beir)
  known_docs = set(doc_ids)
  queries = sources.read_beir_queries(beir)
  qrels_file = sources.qrels_path(beir, split)
  qrels = read_qrels(qrels_file, queries, known_docs)
  if isinstance(run, str):
    run_name = run
    sources.warn_if_large(
        run, RUN_MEMORY_PER_BYTE, f'--source=beir:{beir}:{split} --run={run} '
        f'--min_rank={min_rank} --max_rank={max_rank}'
        + (f' --teacher={teacher_path}' if teacher_path else ''))
    run = read_run(run, queries, known_docs)
  else:
    run_name = 'first-stage run'
    run = {q: sorted(docs.items(), key=lambda kv: -kv[1]) for q, docs in run.items()}
  teacher = None if teacher_path is None else read_teacher(teacher_path, queries, known_docs)
  return build_lists(queries, doc_ids, documents, qrels, run, min_rank=min_rank,
                     max_rank=max_rank, min_relevance=min_relevance, teacher=teacher,
                     source=f'{run_name} + {qrels_file}')


def list_choices(seed: int, position: int, num_positive: int, num_negative: int,
                 num_positives: int, list_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The list at stream `position` of a query with `num_positive` positives and
  `num_negative` negatives: (positives taken, negatives taken, order), indices into
  the query's positives and negatives, and the permutation of [positives taken +
  negatives taken] that is the list order (no position carries the label).

  Shared by ListBatcher and the store's list batcher (data/store_batchers.py).
  """
  rng = np.random.default_rng([seed, position, _LIST_STREAM])
  n_pos = min(num_positives, num_positive)
  n_neg = min(list_size - n_pos, num_negative)
  pos = rng.choice(num_positive, n_pos, replace=False)
  neg = rng.choice(num_negative, n_neg, replace=False)
  return pos, neg, rng.permutation(n_pos + n_neg)


def list_batch_spec(batch_size: int, list_size: int, input_length: int,
                    teacher: bool = False) -> dict:
  """Shapes and dtypes (jax.ShapeDtypeStruct) of `batch_size` rows of ListBatcher batches
  (with a teacher: its scores too).

  The one description of a list batch that the planner and the benchmarks compile
  for; tests hold ListBatcher.batch to it.
  """
  import jax
  s = jax.ShapeDtypeStruct
  b, n = batch_size, list_size
  spec = {'inputs': s((b, n, input_length), np.int32), 'labels': s((b, n), np.float32),
          'where': s((b, n), np.bool_)}
  if teacher:
    spec['teacher_scores'] = s((b, n), np.float32)
  return spec


@dataclasses.dataclass
class ListBatcher:
  """Tokenized training lists in fixed-shape batches.

  Batch keys: 'inputs' [B, list_size, input_length] int32 (input_fn(query,
  document) tokenized, trimmed, EOS appended, 0-padded; all 0 for padding),
  'labels' [B, list_size] float32 (graded relevance, 0 for negatives and
  padding), 'where' [B, list_size] bool, and with a teacher 'teacher_scores'
  [B, list_size] float32 (0 for padding). B is the per-process batch.
  """

  lists: TrainingLists
  tokenizer: Tokenizer
  batch_size: int
  list_size: int = 8
  input_length: int = 512
  num_positives: int = 1
  input_fn: Callable[[str, str], str] = reranker_input
  seed: int = 0

  def __post_init__(self):
    if not MIN_LIST_SIZE <= self.list_size <= MAX_LIST_SIZE:
      raise ValueError(f'list_size must be in [{MIN_LIST_SIZE}, {MAX_LIST_SIZE}], '
                       f'got {self.list_size}')
    if not 1 <= self.num_positives < self.list_size:
      raise ValueError(f'num_positives must be in [1, list_size), got {self.num_positives}')
    if self.batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {self.batch_size}')
    if self.input_length < 2:
      raise ValueError(f'input_length must be >= 2 (a token and EOS), got {self.input_length}')
    if not len(self.lists):
      raise ValueError('no training lists')
    self._order = pipeline.EpochOrder(self.seed, len(self.lists))

  def positions(self, step: int, shard_index: int = 0, num_shards: int = 1
                ) -> np.ndarray:
    """Stream positions of global batch `step`, slice `shard_index` of `num_shards`."""
    if self.batch_size % num_shards:
      raise ValueError(f'batch size {self.batch_size} is not divisible by the {num_shards} '
                       'data shards of the mesh')
    per_shard = self.batch_size // num_shards
    start = step * self.batch_size + shard_index * per_shard
    return np.arange(start, start + per_shard)

  def list_indices(self, step: int, shard_index: int = 0, num_shards: int = 1
                   ) -> np.ndarray:
    """Which query each row of slice `shard_index` of batch `step` holds."""
    return self._order.rows(self.positions(step, shard_index, num_shards))

  def sample(self, position: int, query: int) -> tuple[list[int], list[float]]:
    """(document rows, labels) of the list at stream `position`, in list order."""
    positives, negatives = self.lists.positives[query], self.lists.negatives[query]
    pos, neg, order = list_choices(self.seed, position, len(positives), len(negatives),
                                   self.num_positives, self.list_size)
    picked = [positives[i] for i in pos] + [(negatives[i], 0.0) for i in neg]
    picked = [picked[i] for i in order]
    return [r for r, _ in picked], [y for _, y in picked]

  def batch_spec(self) -> dict:
    """The global batch its `batch` slices make up (`list_batch_spec`)."""
    return list_batch_spec(self.batch_size, self.list_size, self.input_length,
                           teacher=self.lists.teacher is not None)

  def batch(self, step: int, shard_index: int = 0, num_shards: int = 1) -> dict:
    positions = self.positions(step, shard_index, num_shards)
    queries = self.list_indices(step, shard_index, num_shards)
    rows, size = len(positions), self.list_size
    labels = np.zeros((rows, size), np.float32)
    where = np.zeros((rows, size), bool)
    teacher = np.zeros((rows, size), np.float32) if self.lists.teacher is not None else None
    texts, slots = [], []
    for i, (position, query) in enumerate(zip(positions.tolist(), queries.tolist())):
      docs, grades = self.sample(position, query)
      labels[i, :len(docs)] = grades
      where[i, :len(docs)] = True
      if teacher is not None:
        teacher[i, :len(docs)] = [self.lists.teacher[query][d] for d in docs]
      texts += [self.input_fn(self.lists.queries[query], self.lists.documents[d]) for d in docs]
      slots += [(i, j) for j in range(len(docs))]
    inputs = np.zeros((rows, size, self.input_length), np.int32)
    ids = self.tokenizer.encode(texts, self.input_length)
    inputs[tuple(np.asarray(slots).T)] = ids
    out = {'inputs': inputs, 'labels': labels, 'where': where}
    if teacher is not None:
      out['teacher_scores'] = teacher
    return out

  def steps_per_epoch(self) -> int:
    return max(1, len(self.lists) // self.batch_size)
