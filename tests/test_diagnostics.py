"""The SamToNe diagnostics: numbers checked by hand, pictures written as PNG files."""

import json

import numpy as np
import pytest

from t5dual import diagnostics, export
import tolerances  # tests/helpers

PNG = b'\x89PNG\r\n\x1a\n'


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def towers(rng, n, dim, offset):
  """Queries and their positives around shared topics; the query tower adds `offset`
  along one axis and the document tower along another (0: one space; large: apart)."""
  topics = rng.normal(size=(n, dim))
  queries = topics + 0.3 * rng.normal(size=(n, dim))
  positives = topics + 0.3 * rng.normal(size=(n, dim))
  queries[:, 0] += offset
  positives[:, 1] += offset
  return _unit(queries).astype(np.float32), _unit(positives).astype(np.float32)


def test_top1_cosine_matches_brute_force():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(25, 8)).astype(np.float32)
  corpus = [rng.normal(size=(40, 8)).astype(np.float16) for _ in range(3)]
  got = diagnostics.top1_cosines(queries, corpus, chunk_size=16)
  docs = np.concatenate(corpus).astype(np.float64)
  best = docs[np.argmax(queries @ docs.T, axis=1)]
  want = np.sum(_unit(queries.astype(np.float64)) * _unit(best), axis=1)
  # Both sides are float64 cosines of the same vectors (8 wide, after normalising).
  tolerances.assert_close(got, want, magnitude=1.0, depth=2, width=8, dtype=np.float64)


def test_qq_qp_ratio_and_mixing_by_hand():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(30, 6))
  # Positives equal to their queries: cos(q_i, q_j) / cos(q_i, p_j) is exactly 1 (numerator and
  # denominator are the same float64 operations on the same numbers).
  np.testing.assert_array_equal(diagnostics.qq_qp_ratios(q, q, 500), 1.0)
  # Positives scaled by 2 and negated: the ratio is -1 (cosine ignores the scale; scaling by a
  # power of 2 and negating are exact, so the denominator is exactly minus the numerator).
  np.testing.assert_array_equal(diagnostics.qq_qp_ratios(q, -2 * q, 500), -1.0)
  # By hand, with 2 queries q0 = (1, 0), q1 = (1, 1) and positives p0 = (0, 1), p1 = (1, 0):
  # (i, j) = (0, 1): cos(q0, q1) / cos(q0, p1) = 0.7071 / 1;  (1, 0): 0.7071 / 0.7071 = 1.
  ratios = diagnostics.qq_qp_ratios(np.array([[1.0, 0.0], [1.0, 1.0]]),
                                    np.array([[0.0, 1.0], [1.0, 0.0]]), 50)
  assert set(np.round(ratios, 12)) == {round(0.5 ** 0.5, 12), 1.0}
  # k-NN mixing: far apart clusters never neighbour each other; a set and its copy always do.
  far = np.c_[np.ones(20), 0.01 * rng.normal(size=(20, 3))]
  assert diagnostics.knn_mixing(far, -far, k=5) == 0.0
  assert diagnostics.knn_mixing(q, q, k=1) == 1.0


def test_pictures_side_by_side(tmp_path):
  import matplotlib.image
  rng = np.random.default_rng(2)
  mixed = towers(rng, 60, 16, offset=0.0)
  apart = towers(rng, 60, 16, offset=10.0)
  diags = [diagnostics.compute(label, q, p, corpus=p, sample=40, num_pairs=2000, seed=0)
           for label, (q, p) in (('same space', mixed), ('separate spaces', apart))]
  same, separate = (d.stats for d in diags)
  assert same['knn_mixing'] > 0.3 > 0.05 > separate['knn_mixing']
  assert same['centroid_cosine'] > separate['centroid_cosine']
  assert same['top1_cosine_mean'] > separate['top1_cosine_mean']
  # Separate spaces: queries are much closer to each other than to other queries' documents.
  assert separate['qq_qp_ratio_median'] > 2 * same['qq_qp_ratio_median']
  assert diags[0].tsne_queries.shape == diags[0].tsne_docs.shape == (40, 2)

  paths = diagnostics.save_all(diags, str(tmp_path / 'two'))
  single = diagnostics.save_all(diags[:1], str(tmp_path / 'one'))
  for name in ('tsne', 'top1_cosine', 'qq_qp_ratio'):
    assert open(paths[name], 'rb').read(8) == PNG
    two_wide = matplotlib.image.imread(paths[name]).shape
    one_wide = matplotlib.image.imread(single[name]).shape
    assert two_wide[1] > 1.8 * one_wide[1] and two_wide[0] == one_wide[0]
  stats = json.load(open(paths['stats']))
  assert list(stats) == ['same space', 'separate spaces']
  assert stats['separate spaces'] == separate  # JSON keeps float64 values exactly


def test_query_positive_pairs_and_errors():
  q_rows, d_rows = diagnostics.query_positive_pairs(
      ['q1', 'q2', 'q3'], ['d1', 'd2'], {'q1': {'x': 1, 'd2': 1}, 'q2': {'d1': 0}, 'q3': {'d1': 2}})
  assert (q_rows, d_rows) == ([0, 2], [1, 0])
  with pytest.raises(ValueError, match='only 1 queries have a positive'):
    diagnostics.query_positive_pairs(['q1'], ['d1'], {'q1': {'d1': 1}})
  with pytest.raises(ValueError, match='no diagnostics'):
    diagnostics.save_all([], 'unused')
  with pytest.raises(ValueError, match='positive vectors'):
    diagnostics.compute('x', np.ones((3, 2)), np.ones((2, 2)), np.ones((4, 2)))


def test_compute_reads_an_export(tmp_path):
  """Top-1 documents come from a sharded export as from the same vectors in memory."""
  rng = np.random.default_rng(3)
  vectors = _unit(rng.normal(size=(50, 8))).astype(np.float32)
  ids = [f'd{i}' for i in range(50)]

  class Rows:
    def encode(self, texts, length):
      return np.array([[int(t[1:]) + 1] for t in texts], np.int32)

  export.export_embeddings(lambda t: vectors[t[:, 0] - 1], Rows(), ids, ids, str(tmp_path),
                           export.ExportOptions(max_length=1, side='document', shard_size=15,
                                                dtype='float32', progress=False))
  emb = export.open_embeddings(str(tmp_path))
  queries = _unit(rng.normal(size=(12, 8))).astype(np.float32)
  # Float64 cosines of the same float32 vectors (8 wide, after normalising).
  tolerances.assert_close(diagnostics.top1_cosines(queries, emb, chunk_size=8),
                          diagnostics.top1_cosines(queries, vectors), magnitude=1.0, depth=2,
                          width=8, dtype=np.float64)
