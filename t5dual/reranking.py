"""Second-stage reranking: a reranker rescores a first stage's top-k, writes a run, evaluates.

  first stage (BM25, a dual encoder, any TREC run) --top_k--> (query, document)
  pairs --template, tokenizer--> ids --length buckets--> reranker scores --> run

Pairs are tokenized once, sorted by length and scored in fixed-shape,
length-bucketed batches (encoding.map_bucketed), data-parallel over the local
devices, so short documents cost short sequences and each bucket compiles once.
The reranked run holds the model's raw scores for each query's top-k.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from t5dual import cli, distributed, encoding, partitioning, rerankers
from t5dual.data.sources import Run

log = logging.getLogger(__name__)


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
    param_sh = partitioner.param_shardings(
        model.logical_axes(), jax.eval_shape(model.init_params, jax.random.PRNGKey(0)))
    _SCORERS[key] = (partitioner.partition(
        model.score, in_shardings=(param_sh, partitioner.batch_sharding(2)),
        out_shardings=partitioner.batch_sharding(1)), param_sh)
  return _SCORERS[key]


def top_k_pairs(run: Run, k: int) -> list[tuple[str, str]]:
  """(query id, doc id) of each query's k best documents, best first (ties: run order)."""
  pairs = []
  for qid, docs in run.items():
    ranked = sorted(docs.items(), key=lambda kv: -kv[1])[:k]
    pairs += [(qid, d) for d, _ in ranked]
  return pairs


def rerank(score_fn: encoding.BatchFn, tokenizer, queries: Mapping[str, str],
           documents: Mapping[str, str], run: Run, top_k: int, input_length: int,
           template: str = rerankers.DEFAULT_TEMPLATE, batch_size: int = 64,
           progress: bool = True, chunk_pairs: int = 16384) -> Run:
  """The reranker's raw scores for each query's top_k documents of `run`.

  Queries of the run without text in `queries` are an error, as are documents
  missing from `documents`. Pairs are tokenized and scored in chunks of
  `chunk_pairs`, so memory stays bounded for long runs. In a multi-host job
  each process scores its share of the pairs on its own devices and every
  process returns all scores (`distributed.process_rows` / `gather_rows`).
  """
  if top_k < 1:
    raise cli.ConfigError(f'--top_k must be positive, got {top_k}')
  missing_q = [q for q in run if q not in queries]
  if missing_q:
    raise cli.UserError(f'{len(missing_q)} queries of the run have no text, first: '
                        f'{missing_q[0]!r}')
  pairs = top_k_pairs(run, top_k)
  missing_d = sorted({d for _, d in pairs if d not in documents})
  if missing_d:
    raise cli.UserError(f'{len(missing_d)} documents of the run are not in the corpus, '
                        f'first: {missing_d[0]!r}')
  mine = distributed.process_rows(len(pairs))
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(mine), desc='rerank', unit='pair', dynamic_ncols=True,
               mininterval=1.0)
  scores = np.empty(len(mine), np.float32)
  try:
    for start in range(0, len(mine), chunk_pairs):
      chunk = [pairs[i] for i in mine[start:start + chunk_pairs]]
      ids = rerankers.encode_pairs(tokenizer, [queries[q] for q, _ in chunk],
                                   [documents[d] for _, d in chunk], template, input_length)
      scores[start:start + len(chunk)] = encoding.map_bucketed(
          score_fn, ids, batch_size, on_batch=bar.update if bar else None)
  finally:
    if bar is not None:
      bar.close()
  scores = distributed.gather_rows(scores, len(pairs))
  out: Run = {}
  for (qid, doc), s in zip(pairs, scores.tolist()):
    out.setdefault(qid, {})[doc] = s
  return out


def load_reranker(model_dir: str, step: Optional[int] = None, dtype: Optional[str] = None,
                  partitioner: Optional[partitioning.Partitioner] = None):
  """(model, params, step, tokenizer, input_length) of a reranker directory.

  `dtype` replaces the activation dtype the model was trained with (e.g.
  'float32' to score a bfloat16-trained model exactly); parameters are float32.
  """
  from t5dual import checkpoints
  model, params, step, tokenizer, lengths = checkpoints.restore_for_inference(
      model_dir, step, partitioner)
  if getattr(model, 'kind', None) != rerankers.RerankerModel.kind:
    raise cli.UserError(f'{model_dir} holds a {getattr(model, "kind", "?")} model, not a '
                        'reranker (scripts/eval.py run evaluates dual encoders)')
  if dtype is not None:
    config = dataclasses.replace(model.config, t5=dataclasses.replace(model.config.t5,
                                                                      dtype=dtype))
    model = rerankers.RerankerModel(config, model.loss, model.lists)
  return model, params, step, tokenizer, lengths.get('inputs', model.config.input_length)


def rerank_beir(model_dir: str, beir: str, split: str, run_path: str, out: str,
                top_k: int = 100, step: Optional[int] = None, dtype: Optional[str] = None,
                batch_size: int = 64, input_length: Optional[int] = None,
                measures: Sequence[str] = ('nDCG@10', 'RR@10', 'R@100'),
                progress: bool = True,
                partitioner: Optional[partitioning.Partitioner] = None) -> dict:
  """Reranks a run of a BEIR split, writes `out` and evaluates both runs.

  `partitioner` lays the model out on this process's devices (default: replicated,
  pairs split over them; `distributed.host_partitioner` splits the model too).

  The data and the run are read and checked before the model is restored.
  Returns {'step', 'run', 'pairs', 'metrics': {'first stage': ..., 'reranked': ...}}.
  """
  from t5dual import evaluation, retrieval
  from t5dual.data import sources
  qrels = evaluation.load_qrels(beir, split)
  queries = sources.read_beir_queries(beir)
  doc_ids, doc_texts = sources.read_beir_corpus(beir)
  first = retrieval.read_trec_run(run_path)
  first = {q: docs for q, docs in first.items() if q in qrels}
  if not first:
    raise cli.UserError(f'{run_path}: no query of the run has judgements in {beir} {split}')
  model, params, step, tokenizer, trained_length = load_reranker(model_dir, step, dtype,
                                                                 partitioner)
  length = input_length or trained_length
  reranked = rerank(make_score_fn(model, params, partitioner=partitioner), tokenizer, queries,
                    dict(zip(doc_ids, doc_texts)), first, top_k, length,
                    model.config.template, batch_size, progress)
  if jax.process_index() == 0:  # every process holds all scores; one writes them
    retrieval.write_trec_run(out, reranked, tag=f't5dual-{model.config.scorer}')
  metrics = {'first stage': evaluation.evaluate(first, qrels, measures),
             'reranked': evaluation.evaluate(reranked, qrels, measures)}
  return {'step': step, 'run': out, 'pairs': sum(len(d) for d in reranked.values()),
          'metrics': metrics}
