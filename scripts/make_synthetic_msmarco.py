#!/usr/bin/env python
"""Write an MS MARCO-shaped synthetic training collection, fast, at any scale.

  python scripts/make_synthetic_msmarco.py --out_dir=/tmp/msmarco-1pct --scale=0.01

At --scale=1: 8.8M passages, 503k training queries with one judged passage each, a
first-stage TREC run of depth --depth (1000) for every training query, teacher scores
(a TREC run over the first --teacher_depth candidates) and --negatives (30) hard
negatives per query as JSONL pairs. Passages and queries are words drawn from the
word frequencies of a real corpus (--real: a BEIR folder, medquad or scifact in
../shared/data), their lengths from its length distributions rescaled to MS MARCO's
means (56 words per passage, 6 per query). The judged passage is in the run for 80%
of the queries (at a rank skewed to the top); hard negatives are the run's best
candidates other than it. Numpy does the sampling, one %-format per chunk the writing.

Files: corpus.jsonl, queries.jsonl, qrels/train.tsv (a BEIR folder), run.trec,
teacher.trec, negatives.jsonl, synthetic.json (what was generated).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5dual import cli  # noqa: E402
from t5dual.data import sources  # noqa: E402

MSMARCO_PASSAGES, MSMARCO_TRAIN_QUERIES = 8_841_823, 502_939
PASSAGE_WORDS, QUERY_WORDS = 56.0, 6.0
CHUNK = 50_000  # documents or queries generated and written at a time
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'shared', 'data', 'medquad')


def real_statistics(folder: str):
  """(words, frequencies, passage lengths, query lengths) of a real BEIR folder; words
  that JSON would escape are left out, so lines can be formatted without an encoder."""
  counts: dict[str, int] = {}
  doc_lengths, query_lengths = [], []
  for _, text in zip(*sources.read_beir_corpus(folder)):
    words = text.split()
    doc_lengths.append(len(words))
    for w in words:
      counts[w] = counts.get(w, 0) + 1
  for text in sources.read_beir_queries(folder).values():
    query_lengths.append(len(text.split()))
  words = [w for w in counts if w.isprintable() and '"' not in w and '\\' not in w]
  freq = np.asarray([counts[w] for w in words], np.float64)
  return (np.asarray(words, object), freq / freq.sum(), np.asarray(doc_lengths, np.float64),
          np.asarray(query_lengths, np.float64))


def _lengths(rng, real: np.ndarray, mean: float, n: int) -> np.ndarray:
  real = real[real > 0]
  return np.maximum(1, np.rint(rng.choice(real, n) * mean / real.mean())).astype(np.int64)


def _texts(words: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> list[str]:
  flat = words[ids]
  return [' '.join(flat[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _write_run(f, first_query: int, docs: np.ndarray, scores: np.ndarray, tag: str) -> None:
  """TREC lines of queries first_query.. ([queries, depth] passages and scores, best
  first), a few hundred thousand lines per %-format."""
  n, depth = docs.shape
  step = max(1, 200_000 // depth)
  line = f'q%d Q0 d%d %d %.4f {tag}\n'
  for a in range(0, n, step):
    b = min(a + step, n)
    qids = np.repeat(np.arange(first_query + a, first_query + b), depth).tolist()
    ranks = np.tile(np.arange(1, depth + 1), b - a).tolist()
    f.write((line * ((b - a) * depth)) % tuple(
        x for row in zip(qids, docs[a:b].reshape(-1).tolist(), ranks,
                         scores[a:b].reshape(-1).tolist()) for x in row))


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--out_dir', required=True)
  p.add_argument('--scale', type=float, default=1.0, help='fraction of MS MARCO (1 = full)')
  p.add_argument('--depth', type=int, default=1000, help='run candidates per query')
  p.add_argument('--teacher_depth', type=int, default=None,
                 help='teacher-scored candidates per query (default: --depth)')
  p.add_argument('--negatives', type=int, default=30, help='hard negatives per query')
  p.add_argument('--real', default=SHARED, help='BEIR folder whose words and lengths to draw')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  num_docs = max(2, round(MSMARCO_PASSAGES * args.scale))
  num_queries = max(2, round(MSMARCO_TRAIN_QUERIES * args.scale))
  depth = min(args.depth, num_docs - 1)
  teacher_depth = min(args.teacher_depth or depth, depth)
  if args.negatives >= depth:
    raise cli.ConfigError(f'--negatives {args.negatives} needs a run deeper than {depth}')
  started = time.time()
  rng = np.random.default_rng(args.seed)
  words, freq, real_docs, real_queries = real_statistics(args.real)
  cum = np.cumsum(freq)

  def draw(n):  # word ids by frequency: inverse CDF, vectorised
    return np.minimum(np.searchsorted(cum, rng.random(n)), len(words) - 1).astype(np.int32)

  os.makedirs(os.path.join(args.out_dir, 'qrels'), exist_ok=True)
  path = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
  # Passages: their word ids stay in memory (4 bytes a word) for the hard negatives' texts.
  doc_lengths = _lengths(rng, real_docs, PASSAGE_WORDS, num_docs)
  doc_offsets = np.zeros(num_docs + 1, np.int64)
  np.cumsum(doc_lengths, out=doc_offsets[1:])
  doc_words = draw(int(doc_offsets[-1]))
  with open(path('corpus.jsonl'), 'w') as f:
    for a in range(0, num_docs, CHUNK):
      b = min(a + CHUNK, num_docs)
      texts = _texts(words, doc_words[doc_offsets[a]:doc_offsets[b]],
                     doc_offsets[a:b + 1] - doc_offsets[a])
      f.write(('{"_id": "d%d", "title": "", "text": "%s"}\n' * (b - a)) % tuple(
          x for pair in zip(range(a, b), texts) for x in pair))
  # The run: per query `depth` distinct passages (an arithmetic progression modulo the
  # corpus with a random start and stride), scores falling with the rank.
  stride_max = max(1, (num_docs - 1) // depth)
  with open(path('queries.jsonl'), 'w') as fq, open(path('qrels/train.tsv'), 'w') as fr, \
      open(path('run.trec'), 'w') as frun, open(path('teacher.trec'), 'w') as ft, \
      open(path('negatives.jsonl'), 'w') as fn:
    fr.write('query-id\tcorpus-id\tscore\n')
    for a in range(0, num_queries, CHUNK):
      b = min(a + CHUNK, num_queries)
      n = b - a
      q_lengths = _lengths(rng, real_queries, QUERY_WORDS, n)
      q_offsets = np.concatenate([[0], np.cumsum(q_lengths)])
      q_texts = _texts(words, draw(int(q_offsets[-1])), q_offsets)
      fq.write(('{"_id": "q%d", "text": "%s"}\n' * n) % tuple(
          x for pair in zip(range(a, b), q_texts) for x in pair))
      start = rng.integers(0, num_docs, n)
      stride = rng.integers(1, stride_max + 1, n)
      run = (start[:, None] + np.arange(depth)[None, :] * stride[:, None]) % num_docs
      in_run = rng.random(n) < 0.8
      rank = np.minimum(rng.geometric(0.05, n) - 1, depth - 1)
      positive = np.where(in_run, run[np.arange(n), rank], (start + depth * stride) % num_docs)
      fr.write(('q%d\td%d\t1\n' * n) % tuple(
          x for pair in zip(range(a, b), positive.tolist()) for x in pair))
      scores = 30.0 - np.arange(depth)[None, :] * (20.0 / depth) + rng.random((n, depth)) * 1e-3
      teacher = scores[:, :teacher_depth] + rng.normal(0, 2, (n, teacher_depth))
      _write_run(frun, a, run, scores, 'bm25')
      _write_run(ft, a, run[:, :teacher_depth], teacher, 'teacher')
      # Hard negatives: the run's best candidates other than the judged passage.
      top = run[:, :args.negatives + 1]
      keep = top != positive[:, None]
      keep[keep.sum(1) > args.negatives, args.negatives] = False
      negatives = top[keep].reshape(n, args.negatives)
      rows = np.concatenate([positive[:, None], negatives], 1).reshape(-1)
      lengths = doc_lengths[rows]
      offsets = np.concatenate([[0], np.cumsum(lengths)])
      ids = np.concatenate([doc_words[doc_offsets[r]:doc_offsets[r + 1]] for r in rows.tolist()])
      texts = _texts(words, ids, offsets)
      per = args.negatives + 1
      for i in range(n):
        group = texts[i * per:(i + 1) * per]
        fn.write('{"query": "%s", "positive": "%s", "negatives": ["%s"]}\n' % (
            q_texts[i], group[0], '", "'.join(group[1:])))
      print(f'queries {b}/{num_queries} ({time.time() - started:.0f} s)', flush=True)
  info = {'scale': args.scale, 'passages': num_docs, 'queries': num_queries, 'depth': depth,
          'teacher_depth': teacher_depth, 'negatives': args.negatives, 'real': args.real,
          'seed': args.seed, 'seconds': round(time.time() - started, 1),
          'bytes': {name: os.path.getsize(path(name)) for name in
                    ('corpus.jsonl', 'queries.jsonl', 'qrels/train.tsv', 'run.trec',
                     'teacher.trec', 'negatives.jsonl')}}
  with open(path('synthetic.json'), 'w') as f:
    json.dump(info, f, indent=1)
  print(json.dumps(info))


if __name__ == '__main__':
  cli.run_main(main)
