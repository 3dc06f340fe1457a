"""BM25 first stage on a BEIR folder, with bm25s: the run rerankers start from.

Scoring is bm25s' Lucene variant (k1 = 1.5, b = 0.75 by default); documents
are "title text", and documents and queries are tokenized alike: English
stopwords removed, Snowball English stemming (PyStemmer). This is the
configuration of the shared BM25 reference (medquad test nDCG@10 0.5529).

    python scripts/eval.py bm25 --beir=DIR --split=test --out=bm25.trec --k=100

writes a TREC run (read back by t5dual.retrieval.read_trec_run, usable as the
first stage of scripts/rerank.py or as the negatives pool of
t5dual.data.lists) for the queries that have qrels in the split.

The corpus is read and tokenized a chunk of texts at a time: the index keeps
each document's term ids (one growing vocabulary of stems), never the texts.
The tokens are bm25s.tokenize's, so the index and its scores are the ones
bm25s builds from the whole list of texts.
"""

from __future__ import annotations

import array
import dataclasses
import logging
import re
from typing import Iterable, Sequence

import numpy as np

from t5dual import cli, corpus, retrieval

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


class _TermIds:
  """bm25s.tokenize's tokens as ids of one vocabulary of stems that grows chunk by chunk.

  As bm25s: lower-cased words of two or more word characters (its token pattern),
  English stopwords dropped, then PyStemmer's Snowball stem; each distinct word
  is stemmed once.
  """

  def __init__(self, stemmer):
    bm25s = _bm25s()
    self._split = re.compile(r'(?u)\b\w\w+\b').findall
    self._stopwords = set(bm25s.tokenization._infer_stopwords('en'))
    self._stem = stemmer.stemWord
    self.vocab: dict[str, int] = {}          # stem -> term id
    self._words: dict[str, int] = {}         # word -> term id (stopwords absent)

  def __call__(self, texts: Iterable[str]) -> list[array.array]:
    """Each text's term ids, in text order (4 bytes a token: the index's largest input)."""
    out = []
    for text in texts:
      ids = []
      for word in self._split(text.lower()):
        term = self._words.get(word)
        if term is None:
          if word in self._stopwords:
            continue
          term = self.vocab.setdefault(self._stem(word), len(self.vocab))
          self._words[word] = term
        ids.append(term)
      out.append(array.array('i', ids))
    return out


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
    if len(doc_ids) != len(texts):
      raise ValueError(f'{len(doc_ids)} document ids for {len(texts)} texts')
    return cls.build_from_corpus(corpus.InMemoryCorpus(doc_ids, texts), k1, b)

  @classmethod
  def build_from_corpus(cls, source: corpus.Corpus, k1: float = 1.5, b: float = 0.75,
                        chunk_size: int = 10_000) -> 'BM25Index':
    """Indexes a corpus read `chunk_size` texts at a time; only term ids are kept."""
    bm25s = _bm25s()
    import Stemmer
    if not len(source):
      raise ValueError('cannot index an empty corpus')
    stemmer = Stemmer.Stemmer('english')
    terms, doc_terms = _TermIds(stemmer), []
    for _, texts in source.chunks(chunk_size):
      doc_terms += terms(texts)
    retriever = bm25s.BM25(k1=k1, b=b, method='lucene')
    retriever.index((doc_terms, terms.vocab), show_progress=False)
    return cls(list(source.ids), retriever, stemmer)

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
  documents = corpus.beir_corpus(folder)
  log.info('BM25: indexing %s of %s', cli.plural(len(documents), 'document'), folder)
  index = BM25Index.build_from_corpus(documents, k1=k1, b=b)
  log.info('BM25: top-%d of %s', k, cli.plural(len(qids), f'{split} query', f'{split} queries'))
  return index.search(qids, qtexts, k)
