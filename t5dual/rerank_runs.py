"""Second-stage reranking: a reranker rescores a first stage's top-k, writes a run, evaluates.

  first stage (BM25, a dual encoder, any TREC run) --top_k--> (query, document)
  pairs --template, tokenizer--> ids --length buckets--> reranker scores --> run

Pairs are tokenized once, sorted by length and scored in fixed-shape,
length-bucketed batches (encoding.map_bucketed), data-parallel over the local
devices, so short documents cost short sequences and each bucket compiles once.
The reranked run holds the model's raw scores for each query's top-k, best
first; `append_tail` puts the rest of the first stage's documents below them
in the first stage's order, so measures deeper than top-k compare the same
documents. Long scorings (a distillation teacher's) can keep their finished
chunks on disk and resume after a kill (`score_pairs` with `work_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from t5dual import cli, distributed, encoding, fileio, model_api, partitioning, rerankers
from t5dual.data.sources import Run

log = logging.getLogger(__name__)

TAILS = ('append', 'drop')


def make_score_fn(model: 'rerankers.RerankerModel', params,
                  devices: Optional[Sequence[jax.Device]] = None,
                  partitioner: Optional[partitioning.Partitioner] = None) -> encoding.BatchFn:
  """numpy ids [B, L] -> numpy float32 scores [B]; parameters placed by their logical
  axes, the batch split over the 'data' axis of `partitioner` (default:
  data-parallel over `devices`, or this process's local devices)."""
  partitioner = partitioner or partitioning.local_data_parallel(devices)
  fn, param_sh = _jitted_score(model, partitioner)
  params = jax.device_put(params, param_sh)
  split = partitioner.batch_sharding(2)

  def score(ids: np.ndarray) -> np.ndarray:
    return np.asarray(fn(params, jax.device_put(np.asarray(ids, np.int32), split)), np.float32)

  score.batch_multiple = partitioner.data_parallel
  return score


_SCORERS: dict = {}


def _jitted_score(model, partitioner: partitioning.Partitioner):
  """(jitted scorer, parameter shardings) per (config, partitioner): repeated reranks
  reuse the compilations."""
  key = (model.config, partitioner)
  if key not in _SCORERS:
    param_sh = partitioner.for_model(model).param_shardings(
        model.logical_axes(), jax.eval_shape(model.init_params, jax.random.PRNGKey(0)))
    _SCORERS[key] = (partitioner.partition(
        model.score, in_shardings=(param_sh, partitioner.batch_sharding(2)),
        out_shardings=partitioner.batch_sharding(1)), param_sh)
  return _SCORERS[key]


def top_k_pairs(run: Run, k: int) -> list[tuple[str, str]]:
  """(query id, doc id) of each query's k best documents, best first (ties: run order)."""
  from t5dual import retrieval
  return [(qid, d) for qid, docs in run.items() for d, _ in retrieval.ranked(docs)[:k]]


# --------------------------------------------------------------------------- scoring pairs

SCORES_FORMAT = 't5dual.pair_scores/1'
_PLAN = 'plan.json'


def _pairs_sha256(pairs: Sequence[tuple[str, str]]) -> str:
  h = hashlib.sha256()
  for q, d in pairs:
    h.update(f'{q}\t{d}\n'.encode('utf-8'))
  return h.hexdigest()


def _sha256_file(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _write_json(path: str, obj) -> None:
  fileio.write_json(path, obj, indent=1, tmp_suffix=f'.tmp{jax.process_index()}')


def _chunk_files(work_dir: str, index: int) -> tuple[str, str]:
  return (os.path.join(work_dir, f'chunk-{index:06d}.npy'),
          os.path.join(work_dir, f'chunk-{index:06d}.json'))


def _load_chunk(work_dir: str, index: int, size: int) -> Optional[np.ndarray]:
  """Chunk `index`'s scores if its record is there and its data matches it, else None."""
  data, record = _chunk_files(work_dir, index)
  try:
    with open(record) as f:
      meta = json.load(f)
    if meta.get('count') != size or meta.get('sha256') != _sha256_file(data):
      return None
    scores = np.load(data, allow_pickle=False)
  except (OSError, ValueError):
    return None
  if scores.shape != (size,) or scores.dtype != np.float32:
    return None
  return scores


def _save_chunk(work_dir: str, index: int, scores: np.ndarray) -> None:
  data, record = _chunk_files(work_dir, index)
  with fileio.atomic_write(data, 'wb', tmp_suffix=f'.tmp{jax.process_index()}') as f:
    np.save(f, scores)
  # The record last: a chunk counts as done only once its data is complete.
  _write_json(record, {'count': len(scores), 'sha256': _sha256_file(data)})


def _resume_point(work_dir: str, plan: dict, sizes: Sequence[int]) -> tuple[int, list]:
  """(leading chunks already scored, their scores) of an earlier run with the same plan;
  (0, []) and a fresh work_dir (written by process 0) otherwise."""
  done = []
  try:
    with open(os.path.join(work_dir, _PLAN)) as f:
      same = json.load(f) == plan
  except (OSError, ValueError):
    same = False
  if same:
    for i, size in enumerate(sizes):
      scores = _load_chunk(work_dir, i, size)
      if scores is None:
        break
      done.append(scores)
  count = len(done)
  if jax.process_count() > 1:  # all processes resume at the same chunk
    from jax.experimental import multihost_utils
    count = int(np.min(multihost_utils.process_allgather(np.int32(count))))
  if not same and os.path.isdir(work_dir) and os.listdir(work_dir):
    log.warning('%s holds partial scores of other pairs or another model: scoring afresh',
                work_dir)
  if jax.process_index() == 0 and not same:
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir, exist_ok=True)
    _write_json(os.path.join(work_dir, _PLAN), plan)
  return count, done[:count]


def _duration(seconds: float) -> str:
  if seconds < 90:
    return f'{seconds:.0f} s'
  if seconds < 5400:
    return f'{seconds / 60:.0f} min'
  return f'{seconds / 3600:.1f} h'


def score_pairs(score_fn: encoding.BatchFn, tokenizer, queries: Mapping[str, str],
                documents: Mapping[str, str], pairs: Sequence[tuple[str, str]],
                input_length: int, template: str = rerankers.DEFAULT_TEMPLATE,
                batch_size: int = 64, progress: bool = True, chunk_pairs: int = 16384,
                work_dir: Optional[str] = None, fingerprint: Optional[dict] = None,
                label: str = 'rerank') -> np.ndarray:
  """float32 scores of (query id, document id) `pairs`, in their order.

  Pairs are tokenized and scored in chunks of `chunk_pairs`, so memory stays
  bounded; each chunk is split over the processes of a multi-host job
  (`distributed.process_rows`) and its scores gathered on every process.

  With `work_dir`, the scoring survives a kill: work_dir/plan.json records what
  is scored (the pairs' sha256, the chunk size and `fingerprint`, e.g. the
  model and its step), and each chunk's scores are written as soon as they are
  computed (chunk-<i>.npy, then chunk-<i>.json with their count and sha256,
  each written atomically, by process 0). A later call with the same plan
  checks the chunks it finds and scores only from the first one missing or
  damaged; any other plan starts afresh. Progress is logged with the rate and
  the time left. The caller removes work_dir once it has kept the result.
  """
  n = len(pairs)
  chunk_pairs = max(1, int(chunk_pairs))
  bounds = [(lo, min(lo + chunk_pairs, n)) for lo in range(0, n, chunk_pairs)]
  scores = np.empty(n, np.float32)
  done = 0
  if work_dir is not None:
    plan = {'format': SCORES_FORMAT, 'pairs': n, 'pairs_sha256': _pairs_sha256(pairs),
            'chunk_pairs': chunk_pairs, 'fingerprint': fingerprint or {}}
    done, previous = _resume_point(work_dir, plan, [hi - lo for lo, hi in bounds])
    for (lo, hi), chunk_scores in zip(bounds, previous):
      scores[lo:hi] = chunk_scores
    already = bounds[done - 1][1] if done else 0
    log.info('%s: %s in %s of up to %d (kept in %s as they finish)%s', label,
             cli.plural(n, 'pair'), cli.plural(len(bounds), 'chunk'), chunk_pairs, work_dir,
             f'; resuming: {already} pairs ({cli.plural(done, "chunk")}) were scored before'
             if done else '')
  bar = None
  if progress:
    from tqdm import tqdm
    local = sum(len(distributed.process_rows(hi - lo)) for lo, hi in bounds[done:])
    bar = tqdm(total=local, desc=label, unit='pair', dynamic_ncols=True, mininterval=1.0)
  start, scored, last_log = time.time(), 0, 0.0
  todo = sum(hi - lo for lo, hi in bounds[done:])
  try:
    for index in range(done, len(bounds)):
      lo, hi = bounds[index]
      mine = distributed.process_rows(hi - lo)
      local_scores = np.empty(0, np.float32)
      if len(mine):
        chunk = [pairs[lo + i] for i in mine]
        ids = rerankers.encode_pairs(tokenizer, [queries[q] for q, _ in chunk],
                                     [documents[d] for _, d in chunk], template, input_length)
        local_scores = encoding.map_bucketed(score_fn, ids, batch_size,
                                             on_batch=bar.update if bar else None)
      scores[lo:hi] = distributed.gather_rows(np.asarray(local_scores, np.float32), hi - lo)
      scored += hi - lo
      if work_dir is not None:
        if jax.process_index() == 0:
          _save_chunk(work_dir, index, scores[lo:hi])
        now = time.time()
        if now - last_log >= 30 or index in (done, len(bounds) - 1):
          last_log = now
          rate = scored / max(now - start, 1e-9)
          log.info('%s: %d of %d pairs (%.0f%%), %.0f pairs/s, about %s left', label, hi, n,
                   100 * hi / max(n, 1), rate, _duration((todo - scored) / max(rate, 1e-9)))
  finally:
    if bar is not None:
      bar.close()
  return scores


def rerank(score_fn: encoding.BatchFn, tokenizer, queries: Mapping[str, str],
           documents: Mapping[str, str], run: Run, top_k: int, input_length: int,
           template: str = rerankers.DEFAULT_TEMPLATE, batch_size: int = 64,
           progress: bool = True, chunk_pairs: int = 16384) -> Run:
  """The reranker's raw scores for each query's top_k documents of `run`, best first.

  Queries of the run without text in `queries` are an error, as are documents
  missing from `documents` (`rerank_beir` leaves such queries out, counting
  them). Pairs are scored by `score_pairs`. In a multi-host job each process
  scores its share of the pairs on its own devices and every process returns
  all scores.
  """
  from t5dual import retrieval
  if top_k < 1:
    raise cli.ConfigError(f'--top_k must be positive, got {top_k}')
  missing_q = [q for q in run if q not in queries]
  if missing_q:
    raise cli.UserError(f'{cli.plural(len(missing_q), "query")} of the run without text, '
                        f'first: {missing_q[0]!r}')
  pairs = top_k_pairs(run, top_k)
  _check_documents(pairs, documents)
  scores = score_pairs(score_fn, tokenizer, queries, documents, pairs, input_length,
                       template, batch_size, progress, chunk_pairs)
  out: Run = {}
  for (qid, doc), s in zip(pairs, scores.tolist()):
    out.setdefault(qid, {})[doc] = s
  return retrieval.in_score_order(out)


def _check_documents(pairs, documents, where: str = 'the run') -> None:
  missing_d = list(dict.fromkeys(d for _, d in pairs if d not in documents))
  if missing_d:
    raise cli.UserError(f'{cli.plural(len(missing_d), "document")} of {where} not in the '
                        f'corpus, first: {missing_d[0]!r}')


def append_tail(reranked: Run, first: Run) -> Run:
  """Each query of `reranked`, its first-stage documents that were not reranked below it.

  The reranked head keeps the reranker's scores, best first; the tail follows in
  the first stage's order, scored (lowest reranked score) - 1, - 2, ... so that
  every reader (trec_eval, line order, the rank column) puts it there. Measures
  deeper than top_k then count the same documents as the first stage's.
  """
  from t5dual import retrieval
  out: Run = {}
  for qid, head in reranked.items():
    floor = min((s for s in head.values() if s == s), default=0.0)  # NaN-free
    tail = [d for d, _ in retrieval.ranked(first.get(qid, {})) if d not in head]
    out[qid] = {**dict(retrieval.ranked(head)),
                **{d: floor - 1.0 - i for i, d in enumerate(tail)}}
  return out


def measures_within(measures: Sequence[str], depth: int) -> tuple[list[str], list[str]]:
  """(measures whose cutoff is at most `depth`, the others: deeper or without cutoff)."""
  from t5dual import evaluation
  within, deeper = [], []
  for name in measures:
    cutoffs = [m.params.get('cutoff') for m in evaluation.parse_measures([name])]
    (within if all(c is not None and c <= depth for c in cutoffs) else deeper).append(name)
  return within, deeper


# --------------------------------------------------------------------------- model directories

def require_reranker(model_dir: str, command: str) -> str:
  """`model_dir` (a chain's MODEL_DIR: its final model) if its model scores pairs
  (model_api.Scorer); else a one-line cli.UserError saying what it holds and which
  command takes it, read from model.json alone."""
  from t5dual import checkpoints
  model_dir = checkpoints.resolve_model_dir(model_dir)
  model_api.require(checkpoints.read_model(model_dir), model_api.Scorer, model_dir, command)
  return model_dir


def load_reranker(model_dir: str, step: Optional[int] = None, dtype: Optional[str] = None,
                  partitioner: Optional[partitioning.Partitioner] = None,
                  command: str = 'rerank.py'):
  """(model, params, step, tokenizer, input_length) of a reranker directory.

  A chain's MODEL_DIR (multistage.py) stands for its final model, MODEL_DIR/final.
  A directory whose model is no model_api.Scorer is a one-line error naming it and
  `command`, before anything is restored.
  `dtype` replaces the activation dtype the model was trained with (e.g.
  'float32' to score a bfloat16-trained model exactly); parameters are float32.
  """
  from t5dual import checkpoints
  model_dir = require_reranker(model_dir, command)
  restored = checkpoints.restore_for_inference(model_dir, step, partitioner)
  model = restored.model
  if dtype is not None:
    model = model.with_t5(dtype=dtype)
  return (model, restored.params, restored.step, restored.tokenizer,
          restored.feature_lengths.get('inputs', model.input_length))


def _first(ids) -> str:
  return repr(next(iter(ids))) if ids else 'none'


def rerank_beir(model_dir: str, beir: str, split: Optional[str], run_path: str, out: str,
                top_k: int = 100, step: Optional[int] = None, dtype: Optional[str] = None,
                batch_size: int = 64, input_length: Optional[int] = None,
                measures: Sequence[str] = ('nDCG@10', 'RR@10', 'R@100'),
                progress: bool = True,
                partitioner: Optional[partitioning.Partitioner] = None,
                tail: str = 'append') -> dict:
  """Reranks every query of a first-stage run that has text in a BEIR folder, writes `out`,
  and evaluates both runs where the queries are judged.

  Queries of the run without text in queries.jsonl are left out, with one
  warning (their count and the first id); if no query has text, that is an
  error. `split` names the qrels that judge the runs (None: none; the runs are
  written, not evaluated): the reranked queries without judgements are in the
  run but not in the measures, and judged queries the run lacks score 0 in both
  rows (one line each, with the count and the first id).

  `tail`: 'append' writes each query's first-stage documents below its reranked
  top_k, in first-stage order (`append_tail`), so measures deeper than top_k
  compare the same documents; 'drop' writes the top_k only and leaves the
  measures deeper than top_k (or without cutoff) out of the evaluation.

  `partitioner` lays the model out on this process's devices (default: replicated,
  pairs split over them; `distributed.host_partitioner` splits the model too).
  The data and the run are read and checked before the model is restored.

  Returns {'step', 'run', 'pairs', 'queries' (reranked), 'tail', 'first_stage_depth'
  (most documents of a query in the first stage), 'skipped' (no text),
  'unjudged', 'missing' (judged, not in the run): each None or {'count', 'first'},
  'left_out' (measures), 'metrics': {'first stage': ..., 'reranked': ...} or None,
  'not_evaluated' (why, when metrics is None)}.
  """
  from t5dual import evaluation, retrieval
  from t5dual.data import sources
  if tail not in TAILS:
    raise cli.ConfigError(f'--tail must be one of {", ".join(TAILS)}, got {tail!r}')
  if top_k < 1:
    raise cli.ConfigError(f'--top_k must be positive, got {top_k}')
  shown, left_out = (list(measures), []) if tail == 'append' else measures_within(measures,
                                                                                  top_k)
  qrels = evaluation.load_qrels(beir, split) if split is not None else None
  queries = sources.read_beir_queries(beir)
  doc_ids, doc_texts = sources.read_beir_corpus(beir)
  documents = dict(zip(doc_ids, doc_texts))
  run = retrieval.read_trec_run(run_path)
  unknown = [q for q in run if q not in queries]
  first = {q: docs for q, docs in run.items() if q in queries}
  if not first:
    raise cli.UserError(f'{run_path}: none of its {cli.plural(len(run), "query")} has text in '
                        f'{os.path.join(beir, "queries.jsonl")} (run ids such as '
                        f'{_first(run)}, queries.jsonl ids such as {_first(queries)})')
  summary = {'step': None, 'run': out, 'pairs': 0, 'queries': len(first), 'tail': tail,
             'first_stage_depth': max(len(d) for d in first.values()), 'skipped': None,
             'unjudged': None, 'missing': None, 'left_out': left_out, 'metrics': None,
             'not_evaluated': None}
  if unknown:
    summary['skipped'] = {'count': len(unknown), 'first': unknown[0]}
    log.warning('%s: %s of the run without text in %s, not reranked (first: %r)', run_path,
                cli.plural(len(unknown), 'query', 'queries'),
                os.path.join(beir, 'queries.jsonl'), unknown[0])
  _check_documents(top_k_pairs(first, top_k), documents, run_path)
  if qrels is not None:
    qrels_file = sources.qrels_path(beir, split)
    unjudged = [q for q in first if q not in qrels]
    missing = [q for q in qrels if q not in first]
    if len(unjudged) == len(first):
      summary['not_evaluated'] = (f'none of the {cli.plural(len(first), "reranked query")} '
                                  f'is judged in {qrels_file}')
      log.warning('%s: not evaluated (reranked ids such as %s, judged ids such as %s)',
                  summary['not_evaluated'], _first(first), _first(qrels))
      qrels = None
    else:
      if unjudged:
        summary['unjudged'] = {'count': len(unjudged), 'first': unjudged[0]}
        log.info('%s without judgements in %s: reranked, not evaluated (first: %r)',
                 cli.plural(len(unjudged), 'reranked query'), qrels_file, unjudged[0])
      if missing:
        summary['missing'] = {'count': len(missing), 'first': missing[0]}
        log.warning('%s of %s not in the run (or without text): they score 0 in both rows '
                    '(first: %r)', cli.plural(len(missing), 'judged query'), qrels_file,
                    missing[0])
  else:
    summary['not_evaluated'] = 'no qrels given'
  model, params, step, tokenizer, trained_length = load_reranker(model_dir, step, dtype,
                                                                 partitioner)
  length = input_length or trained_length
  reranked = rerank(make_score_fn(model, params, partitioner=partitioner), tokenizer, queries,
                    documents, first, top_k, length, model.template, batch_size,
                    progress)
  written = append_tail(reranked, first) if tail == 'append' else reranked
  if jax.process_index() == 0:  # every process holds all scores; one writes them
    retrieval.write_trec_run(out, written, tag=f't5dual-{model.config.scorer}')
  summary.update(step=step, pairs=sum(len(d) for d in reranked.values()))
  if qrels is not None and shown:
    summary['metrics'] = {'first stage': evaluation.evaluate(first, qrels, shown),
                          'reranked': evaluation.evaluate(written, qrels, shown)}
  elif qrels is not None:
    summary['not_evaluated'] = (f'every measure is deeper than --top_k={top_k} '
                                f'({", ".join(left_out)}) and --tail=drop')
  return summary
