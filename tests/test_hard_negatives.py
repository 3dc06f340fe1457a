"""Hard-negative mining from a run (t5dual/hard_negatives.py) and its training JSONL."""

import numpy as np
import pytest

from t5dual import export, hard_negatives as hn, retrieval
from t5dual.data import sources
import tolerances  # tests/helpers

# q1: positives p1 (2) and p2 (1); n3 is judged non-relevant, which is still a negative.
QRELS = {'q1': {'p1': 2, 'p2': 1, 'n3': 0}, 'q2': {'p9': 1}, 'q3': {'p5': 1}}
RUN = {
    'q1': {'n1': 0.95, 'p1': 0.90, 'n2': 0.85, 'p2': 0.80, 'n3': 0.70, 'n4': 0.60,
           'n5': 0.50, 'n6': 0.40},
    'q2': {'m1': 0.9, 'm2': 0.8},  # its positive p9 was not retrieved
}


def mine(**kwargs):
  positive_scores = kwargs.pop('positive_scores', None)
  records, stats = hn.mine_hard_negatives(RUN, QRELS, hn.MiningConfig(**kwargs),
                                          positive_scores)
  return {(r['query_id'], r['positive_id']): r['negative_ids'] for r in records}, stats


def test_rank_window_and_known_positives():
  got, stats = mine(num_negatives=3)
  assert got == {('q1', 'p1'): ['n1', 'n2', 'n3'], ('q1', 'p2'): ['n1', 'n2', 'n3'],
                 ('q2', 'p9'): ['m1', 'm2']}
  assert stats == {'pairs': 4, 'queries_without_run': 1, 'pairs_with_too_few_negatives': 0,
                   'records': 3}
  # Ranks 3..6 of the run are n2, p2, n3, n4; the positive p2 is dropped.
  got, _ = mine(num_negatives=10, min_rank=3, max_rank=6)
  assert got[('q1', 'p1')] == ['n2', 'n3', 'n4']
  # With min_relevance=2 only p1 is a positive, so p2 becomes a negative.
  got, _ = mine(num_negatives=10, min_rank=3, max_rank=6, min_relevance=2)
  assert got == {('q1', 'p1'): ['n2', 'p2', 'n3', 'n4']}


def test_margins_relative_to_each_positive():
  # Absolute: score <= positive - 0.15 -> p1 (0.90): <= 0.75; p2 (0.80): <= 0.65.
  got, _ = mine(num_negatives=10, margin=0.15, positive_scores={('q2', 'p9'): 0.85})
  assert got[('q1', 'p1')] == ['n3', 'n4', 'n5', 'n6']
  assert got[('q1', 'p2')] == ['n4', 'n5', 'n6']
  assert ('q2', 'p9') not in got  # 0.85 - 0.15 leaves neither m1 (0.9) nor m2 (0.8)
  # Relative: score <= positive * (1 - 0.25) -> p1: <= 0.675; p2: <= 0.6; p9: <= 0.975.
  got, stats = mine(num_negatives=2, margin=0.25, relative_margin=True,
                    positive_scores={('q2', 'p9'): 1.3})
  assert got == {('q1', 'p1'): ['n4', 'n5'], ('q1', 'p2'): ['n4', 'n5'],
                 ('q2', 'p9'): ['m1', 'm2']}
  # A pair whose margin leaves too few negatives is dropped and counted.
  got, stats = mine(num_negatives=5, margin=0.3, min_negatives=3,
                    positive_scores={('q2', 'p9'): 0.5})
  assert got == {('q1', 'p1'): ['n4', 'n5', 'n6']}
  assert stats['pairs_with_too_few_negatives'] == 2
  with pytest.raises(ValueError, match="positive 'p9' of query 'q2' is not in the run"):
    mine(margin=0.1)


def test_sampling_is_a_seeded_subset_in_rank_order():
  a, _ = mine(num_negatives=2, sample=True, seed=1)
  b, _ = mine(num_negatives=2, sample=True, seed=1)
  assert a == b
  window = ['n1', 'n2', 'n3', 'n4', 'n5', 'n6']
  for negatives in (a[('q1', 'p1')], a[('q1', 'p2')]):
    assert len(negatives) == 2 and negatives == sorted(negatives, key=window.index)
  seen = {tuple(mine(num_negatives=2, sample=True, seed=s)[0][('q1', 'p1')]) for s in range(20)}
  assert len(seen) > 3


def test_config_errors():
  with pytest.raises(ValueError, match='min_rank <= max_rank'):
    hn.MiningConfig(min_rank=5, max_rank=2)
  with pytest.raises(ValueError, match='margin must be >= 0'):
    hn.MiningConfig(margin=-0.1)


def test_triples_are_read_back_by_training(tmp_path):
  records, _ = hn.mine_hard_negatives(RUN, QRELS, hn.MiningConfig(num_negatives=2))
  queries = {'q1': 'first query', 'q2': 'second query', 'q3': 'unused'}
  corpus = {d: f'text of {d}' for d in ('p1', 'p2', 'p9', 'n1', 'n2', 'n3', 'm1', 'm2')}
  path = str(tmp_path / 'triples.jsonl')
  assert hn.write_triples(path, records, queries, corpus) == 3
  pairs = sources.jsonl_pairs(path)
  assert pairs.queries == ['first query', 'first query', 'second query']
  assert pairs.positives == ['text of p1', 'text of p2', 'text of p9']
  assert pairs.negatives == [['text of n1', 'text of n2']] * 2 + [['text of m1', 'text of m2']]
  # Ids by text, shared by positives and negatives, for in-batch duplicate masking.
  assert pairs.query_ids == [0, 0, 1] and pairs.doc_ids == [0, 3, 4]
  assert pairs.negative_ids == [[1, 2], [1, 2], [5, 6]]
  with pytest.raises(sources.DataError, match="positive id 'p9' has no text in the corpus"):
    hn.write_triples(path, records, queries, {k: v for k, v in corpus.items() if k != 'p9'})


def test_mining_from_exported_embeddings(tmp_path):
  """A run retrieved from exports, plus exact scores for positives it missed."""
  rng = np.random.default_rng(0)
  docs = rng.normal(size=(90, 8)).astype(np.float32)
  queries = rng.normal(size=(6, 8)).astype(np.float32)
  doc_ids, qids = [f'd{i}' for i in range(90)], [f'q{i}' for i in range(6)]
  for name, ids, vecs, side in (('corpus', doc_ids, docs, 'document'),
                                ('queries', qids, queries, 'query')):
    # Text '<letter><i>' is token i + 1 and the 'model' looks the row up.
    export.export_embeddings(lambda tokens, vecs=vecs: vecs[tokens[:, 0] - 1], _RowTokenizer(),
                             ids, ids, str(tmp_path / name),
                             export.ExportOptions(max_length=1, side=side, shard_size=25,
                                                  batch_size=8, dtype='float32',
                                                  progress=False))
    np.testing.assert_array_equal(export.open_embeddings(str(tmp_path / name)).to_numpy(), vecs)
  q_emb = export.open_embeddings(str(tmp_path / 'queries'))
  d_emb = export.open_embeddings(str(tmp_path / 'corpus'))
  # Positives: each query's best document, and one it ranks low (not in its top 10).
  full = queries.astype(np.float64) @ docs.astype(np.float64).T
  qrels = {q: {f'd{np.argmax(full[i])}': 1, f'd{np.argsort(full[i])[5]}': 1}
           for i, q in enumerate(qids)}
  scores = hn.positive_scores_from_embeddings(q_emb, d_emb, qrels)
  assert len(scores) == 12
  for (q, d), s in scores.items():
    # A float32 dot product of 8 terms, |terms| summing to at most |q| |d|.
    want = queries[int(q[1:])].astype(np.float64) @ docs[int(d[1:])].astype(np.float64)
    tolerances.assert_close(s, want, width=8, magnitude=np.linalg.norm(queries, axis=1).max() *
                            np.linalg.norm(docs, axis=1).max())

  run = retrieval.retrieve(q_emb, d_emb, 10, chunk_size=32)
  config = hn.MiningConfig(num_negatives=4, min_rank=2, max_rank=10, margin=0.5)
  records, _ = hn.mine_hard_negatives(run, qrels, config, scores)
  for r in records:
    row = full[int(r['query_id'][1:])]
    window = [f'd{i}' for i in np.argsort(-row)[1:10]]
    limit = row[int(r['positive_id'][1:])] - 0.5
    want = [d for d in window if d not in qrels[r['query_id']] and row[int(d[1:])] <= limit]
    assert r['negative_ids'] == want[:4]
  assert {r['query_id'] for r in records} == set(qids)


class _RowTokenizer:
  def encode(self, texts, length):
    return np.array([[int(t[1:]) + 1] for t in texts], np.int32)
