"""Hard negatives mined from a retrieval run, written as training JSONL.

For each (query, positive) of the qrels, a negative is a document of the
query's run that
  - is ranked within [min_rank, max_rank] (1-based ranks of the run),
  - is not a known positive of the query (relevance >= min_relevance),
  - with a margin, scores clearly below that positive:
      absolute  score <= positive_score - margin
      relative  score <= positive_score * (1 - margin)   (0.05: at most 95% of it;
                meant for the positive inner products of normalised embeddings)
The first `num_negatives` such documents in rank order are kept, or a random
sample of them with `sample=True`. A pair left with fewer than `min_negatives`
is dropped.

The positive's score is its score in the run, or, when the run did not
retrieve it, the one given in `positive_scores` (see
`positive_scores_from_embeddings`).

Each output line is read back by `t5dual.data.sources.jsonl_pairs`:
  {"query", "positive", "negatives", "query_id", "positive_id", "negative_ids",
   "positive_score", "negative_scores"}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional

import numpy as np

from t5dual import cli, fileio
from t5dual.data import sources
from t5dual.data.sources import Qrels, Run


@dataclasses.dataclass(frozen=True)
class MiningConfig:
  num_negatives: int = 8
  min_rank: int = 1
  max_rank: int = 100
  margin: Optional[float] = None
  relative_margin: bool = False
  min_relevance: int = 1
  min_negatives: int = 1
  sample: bool = False
  seed: int = 0

  def __post_init__(self):
    if not 1 <= self.min_rank <= self.max_rank:
      raise cli.ConfigError(f'rank window must satisfy 1 <= min_rank <= max_rank, got '
                            f'[{self.min_rank}, {self.max_rank}]')
    if self.num_negatives < 1:
      raise cli.ConfigError(f'num_negatives must be positive, got {self.num_negatives}')
    if self.margin is not None and self.margin < 0:
      raise cli.ConfigError(f'margin must be >= 0, got {self.margin}')


def _threshold(positive_score: float, config: MiningConfig) -> float:
  if config.margin is None:
    return np.inf
  if config.relative_margin:
    return positive_score * (1.0 - config.margin)
  return positive_score - config.margin


def mine_hard_negatives(run: Run, qrels: Qrels, config: MiningConfig = MiningConfig(),
                        positive_scores: Optional[Mapping[tuple[str, str], float]] = None
                        ) -> tuple[list[dict], dict]:
  """(records, stats): one record per kept (query, positive) with ids and scores.

  `run[qid]` lists documents in rank order (as `retrieval.read_trec_run` and
  `retrieval.to_run` give them).
  """
  rng = np.random.default_rng(config.seed)
  positive_scores = positive_scores or {}
  records = []
  stats = {'pairs': 0, 'queries_without_run': 0, 'pairs_with_too_few_negatives': 0}
  for qid, judged in qrels.items():
    positives = [d for d, rel in judged.items() if rel >= config.min_relevance]
    if not positives:
      continue
    stats['pairs'] += len(positives)
    ranked = list(run.get(qid, {}).items())
    if not ranked:
      stats['queries_without_run'] += 1
      continue
    window = [(d, s) for d, s in ranked[config.min_rank - 1:config.max_rank]
              if judged.get(d, 0) < config.min_relevance]
    for pid in positives:
      score = run[qid].get(pid, positive_scores.get((qid, pid)))
      if score is None and config.margin is not None:
        raise cli.ConfigError(f'positive {pid!r} of query {qid!r} is not in the run, so a '
                              'margin cannot be applied; pass positive_scores (see '
                              'positive_scores_from_embeddings) or retrieve deeper')
      limit = _threshold(score, config) if score is not None else np.inf
      candidates = [(d, s) for d, s in window if s <= limit]
      if config.sample and len(candidates) > config.num_negatives:
        keep = np.sort(rng.choice(len(candidates), config.num_negatives, replace=False))
        candidates = [candidates[i] for i in keep]
      candidates = candidates[:config.num_negatives]
      if len(candidates) < config.min_negatives:
        stats['pairs_with_too_few_negatives'] += 1
        continue
      records.append({'query_id': qid, 'positive_id': pid,
                      'positive_score': None if score is None else float(score),
                      'negative_ids': [d for d, _ in candidates],
                      'negative_scores': [float(s) for _, s in candidates]})
  stats['records'] = len(records)
  return records, stats


def positive_scores_from_embeddings(queries, corpus, qrels: Qrels, min_relevance: int = 1
                                    ) -> dict[tuple[str, str], float]:
  """Inner products of every judged positive pair, from two `export.Embeddings`."""
  q_row = {q: i for i, q in enumerate(queries.ids)}
  d_row = {d: i for i, d in enumerate(corpus.ids)}
  pairs = [(q, d) for q, judged in qrels.items() if q in q_row
           for d, rel in judged.items() if rel >= min_relevance and d in d_row]
  if not pairs:
    return {}
  q_vecs = queries.take([q_row[q] for q, _ in pairs])
  d_vecs = corpus.take([d_row[d] for _, d in pairs])
  scores = np.einsum('pd,pd->p', q_vecs, d_vecs)
  return {pair: float(s) for pair, s in zip(pairs, scores)}


def write_triples(path: str, records: list[dict], queries: Mapping[str, str],
                  corpus: Mapping[str, str]) -> int:
  """Writes the records as JSONL with their texts; returns the number of lines."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with fileio.atomic_write(path, encoding='utf-8') as f:
    for r in records:
      for key, ids in (('query', [r['query_id']]), ('positive', [r['positive_id']]),
                       ('negatives', r['negative_ids'])):
        table = queries if key == 'query' else corpus
        missing = [i for i in ids if i not in table]
        if missing:
          raise sources.DataError(f'{key} id {missing[0]!r} has no text in the '
                                  f'{"queries" if key == "query" else "corpus"}')
      line = {'query': queries[r['query_id']], 'positive': corpus[r['positive_id']],
              'negatives': [corpus[d] for d in r['negative_ids']], **r}
      f.write(json.dumps(line, ensure_ascii=False) + '\n')
  return len(records)
