"""BM25 first stage on a BEIR folder, with bm25s: the run rerankers start from.

Scoring is bm25s' Lucene variant (k1 = 1.5, b = 0.75 by default); documents
are "title text", and documents and queries are tokenized alike: English
stopwords removed, Snowball English stemming (PyStemmer). This is the
configuration of the shared BM25 reference (medquad test nDCG@10 0.5529).

    python scripts/eval.py bm25 --beir=DIR --split=test --out=bm25.trec --k=100

writes a TREC run (read back by t5dual.retrieval.read_trec_run, usable as the
first stage of scripts/rerank.py or as the negatives pool of
t5dual.data.lists) for the queries that have qrels in the split.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from t5dual import cli, retrieval
from t5dual.data import sources

log = logging.getLogger(__name__)

Run = retrieval.Run


def _bm25s():
  """The bm25s module, its logger kept at WARNING: bm25s sets its own to DEBUG when
  imported, which would print its 'Building index' lines at default verbosity."""
  import bm25s
  logger = logging.getLogger('bm25s')
  if logger.level < logging.WARNING:
    logger.setLevel(logging.WARNING)
  return bm25s


def _tokenize(texts: Sequence[str], stemmer):
  bm25s = _bm25s()
  return bm25s.tokenize(list(texts), stopwords='en', stemmer=stemmer, show_progress=False)


@dataclasses.dataclass
class BM25Index:
  """A bm25s index over a corpus, with the corpus ids in index order."""

  doc_ids: list[str]
  retriever: object  # bm25s.BM25
  stemmer: object    # Stemmer.Stemmer

  @classmethod
  def build(cls, doc_ids: Sequence[str], texts: Sequence[str], k1: float = 1.5,
            b: float = 0.75) -> 'BM25Index':
    """Indexes `texts` (one per id in `doc_ids`)."""
    bm25s = _bm25s()
    import Stemmer
    if len(doc_ids) != len(texts):
      raise ValueError(f'{len(doc_ids)} document ids for {len(texts)} texts')
    if not doc_ids:
      raise ValueError('cannot index an empty corpus')
    stemmer = Stemmer.Stemmer('english')
    retriever = bm25s.BM25(k1=k1, b=b, method='lucene')
    retriever.index(_tokenize(texts, stemmer), show_progress=False)
    return cls(list(doc_ids), retriever, stemmer)

  def search(self, query_ids: Sequence[str], query_texts: Sequence[str], k: int) -> Run:
    """The top-k run, {query id: {doc id: score}} in descending score order.

    Only documents sharing a term with the query are retrieved (a Lucene BM25
    score is positive exactly then), so a query may get fewer than k; k is
    capped at the corpus size.
    """
    if len(query_ids) != len(query_texts):
      raise ValueError(f'{len(query_ids)} query ids for {len(query_texts)} texts')
    if k < 1:
      raise ValueError(f'k must be positive, got {k}')
    if not query_ids:
      return {}
    index, scores = self.retriever.retrieve(_tokenize(query_texts, self.stemmer),
                                            k=min(k, len(self.doc_ids)), show_progress=False)
    return {qid: {self.doc_ids[j]: float(s) for j, s in zip(rows, row_scores) if s > 0}
            for qid, rows, row_scores in zip(query_ids, np.asarray(index), np.asarray(scores))}


def beir_run(folder: str, split: str = 'test', k: int = 100, k1: float = 1.5,
             b: float = 0.75) -> Run:
  """BM25's top-k for the queries with qrels in `split` of a BEIR folder."""
  from t5dual import evaluation
  qrels = evaluation.load_qrels(folder, split)
  qids, qtexts = evaluation.beir_queries_with_qrels(folder, qrels)
  doc_ids, doc_texts = sources.read_beir_corpus(folder)
  log.info('BM25: indexing %s of %s', cli.plural(len(doc_ids), 'document'), folder)
  index = BM25Index.build(doc_ids, doc_texts, k1=k1, b=b)
  log.info('BM25: top-%d of %s', k, cli.plural(len(qids), f'{split} query', f'{split} queries'))
  return index.search(qids, qtexts, k)
