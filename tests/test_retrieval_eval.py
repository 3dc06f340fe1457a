"""Exact top-k retrieval, TREC runs and metrics (retrieval.py, evaluation.py, scripts/eval.py)
in process; the scripts run as processes are in test_retrieval_eval_cli.py."""

import numpy as np
import pytest

import jax

from t5dual import encoding, evaluation, export, retrieval
from t5dual.data import sources
from random_sde import METRICS, beir_with_random_sde, write_model_dir  # tests/helpers
from script_modules import load_script  # tests/helpers
import tolerances  # tests/helpers


def _dot_magnitude(queries, corpus):
  """Bounds the terms of every inner product: sum |q_i d_i| <= |q| |d|."""
  return np.linalg.norm(queries, axis=1).max() * np.linalg.norm(corpus, axis=1).max()


def brute_force(queries, corpus, k):
  """Row indices and scores of the top-k by inner product (float64; ties: lower row first)."""
  scores = np.asarray(queries, np.float64) @ np.asarray(corpus, np.float64).T
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(scores, order, axis=1), order


def numpy_metrics(ranking, qrels):
  """nDCG@10, RR@10, R@100 written out by hand, averaged over the qrels' queries."""
  ndcg, rr, recall = [], [], []
  for qid, judged in qrels.items():
    docs = ranking.get(qid, [])
    gains = [max(judged.get(d, 0), 0) for d in docs]
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    dcg = sum(g / np.log2(r + 2) for r, g in enumerate(gains[:10]))
    idcg = sum(g / np.log2(r + 2) for r, g in enumerate(ideal[:10]))
    ndcg.append(dcg / idcg if idcg else 0.0)
    first = next((r for r, g in enumerate(gains[:10]) if g > 0), None)
    rr.append(0.0 if first is None else 1.0 / (first + 1))
    recall.append(sum(g > 0 for g in gains[:100]) / max(1, len(ideal)))
  return {'nDCG@10': np.mean(ndcg), 'RR@10': np.mean(rr), 'R@100': np.mean(recall)}


def test_exact_search_matches_numpy():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(37, 16)).astype(np.float32)
  shards = [rng.normal(size=(n, 16)).astype(np.float32) for n in (300, 450, 251)]
  corpus = np.concatenate(shards)
  want_scores, want_index = brute_force(queries, corpus, 20)
  # Chunks of 128 cross the shard boundaries and the last one is partial;
  # query blocks of 8 do not divide 37.
  scores, index = retrieval.exact_search(queries, shards, 20, chunk_size=128, query_block=8)
  np.testing.assert_array_equal(index, want_index)
  tolerances.assert_close(scores, want_scores, magnitude=_dot_magnitude(queries, corpus),
                          width=16)
  assert index.dtype == np.int64 and scores.shape == (37, 20)

  # Fewer documents than k; duplicate documents keep the lower row first.
  small = np.concatenate([corpus[:3], corpus[:2]])
  scores, index = retrieval.exact_search(queries, small, 10, chunk_size=2)
  assert index.shape == (37, 5)
  np.testing.assert_array_equal(index, brute_force(queries, small, 5)[1])


def test_to_run_ranks_and_identical_ids():
  rng = np.random.default_rng(3)
  docs = rng.normal(size=(30, 8)).astype(np.float32)
  doc_ids = [f'd{i}' for i in range(30)]
  queries = docs[[4, 9]] + 0.01  # each query's best match is the document with its id
  scores, index = retrieval.exact_search(queries, docs, 6)
  run = retrieval.to_run(['d4', 'd9'], doc_ids, scores, index, k=5)
  assert [list(r)[0] for r in run.values()] == ['d4', 'd9']
  assert all(len(r) == 5 and list(r.values()) == sorted(r.values(), reverse=True)
             for r in run.values())
  dropped = retrieval.to_run(['d4', 'd9'], doc_ids, scores, index, k=5,
                             exclude_identical_ids=True)
  assert dropped['d4'] == dict(list(retrieval.to_run(['d4'], doc_ids, scores[:1], index[:1],
                                                     k=6)['d4'].items())[1:])
  assert all('d4' not in dropped['d4'] and len(r) == 5 for r in dropped.values())
  with pytest.raises(ValueError, match="backend must be 'exact' or 'faiss'"):
    retrieval.search(queries, docs, 3, backend='annoy')


def test_faiss_flat_matches_exact():
  pytest.importorskip('faiss')
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(20, 16)).astype(np.float32)
  corpus = rng.normal(size=(1000, 16)).astype(np.float32)
  want = retrieval.exact_search(queries, corpus, 10)
  got = retrieval.search(queries, corpus, 10, backend='faiss', index='flat', chunk_size=300)
  np.testing.assert_array_equal(got[1], want[1])
  tolerances.assert_close(got[0], want[0], magnitude=_dot_magnitude(queries, corpus), width=16,
                          both_sides=True)  # two float32 implementations
  hnsw = retrieval.faiss_search(queries, corpus, 10, index='hnsw16', ef_search=200)
  overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw[1], want[1])])
  assert overlap > 0.9
  ivf = retrieval.faiss_search(queries, corpus, 10, index='ivf8', nprobe=8, train_size=500)
  np.testing.assert_array_equal(ivf[1], want[1])  # nprobe = nlist: exhaustive


@pytest.fixture(scope='module')
def beir(tmp_path_factory, demo_beir):
  return beir_with_random_sde(demo_beir, tmp_path_factory.mktemp('beir'))


@pytest.mark.slow
def test_export_retrieve_evaluate_matches_brute_force(beir, tmp_path):
  folder, tok, model, params = beir['folder'], beir['tok'], beir['model'], beir['params']
  doc_ids, doc_texts = sources.read_beir_corpus(folder)
  queries = sources.read_beir_queries(folder)
  qrels = evaluation.load_qrels(folder, 'test')
  qids = [q for q in queries if q in qrels]

  common = dict(batch_size=16, shard_size=50, dtype='float32', progress=False)
  export.export_embeddings(encoding.make_encode_fn(model, params, 'document'), tok, doc_ids,
                           doc_texts, str(tmp_path / 'corpus'),
                           export.ExportOptions(max_length=32, side='document', **common))
  export.export_embeddings(encoding.make_encode_fn(model, params, 'query'), tok, qids,
                           [queries[q] for q in qids], str(tmp_path / 'queries'),
                           export.ExportOptions(max_length=16, side='query', **common))
  run = retrieval.retrieve(export.open_embeddings(str(tmp_path / 'queries')),
                           export.open_embeddings(str(tmp_path / 'corpus')), 100,
                           chunk_size=64, query_block=16)
  retrieval.write_trec_run(str(tmp_path / 'run.trec'), run, 'tiny')
  from_file = retrieval.read_trec_run(str(tmp_path / 'run.trec'))
  # The file keeps ranks, and float32 scores exactly.
  assert {q: list(docs) for q, docs in from_file.items()} == {q: list(d) for q, d in run.items()}
  assert all(np.float32(from_file[q][d]) == np.float32(s) for q in run for d, s in run[q].items())
  metrics = evaluation.evaluate(from_file, qrels)

  # Brute force: unbucketed encoding of everything, full NumPy ranking, hand-written metrics.
  encode = jax.jit(model.encode, static_argnames='side')  # whole batches, no buckets
  d = np.asarray(encode(params, tok.encode(doc_texts, 32), side='right'))
  q = np.asarray(encode(params, tok.encode([queries[x] for x in qids], 16), side='left'))
  _, order = brute_force(q, d, 100)
  ranking = {qid: [doc_ids[i] for i in row] for qid, row in zip(qids, order)}
  assert {qid: list(docs) for qid, docs in run.items()} == ranking
  want = numpy_metrics(ranking, qrels)
  assert metrics.keys() == want.keys()
  for name in want:
    assert metrics[name] == pytest.approx(want[name], rel=0, abs=METRICS), name
  assert 0 < metrics['R@100'] < 1  # not a degenerate case

  # The in-memory helper the demo uses gives the same numbers.
  in_memory = evaluation.evaluate_beir(model, params, tok, doc_ids, doc_texts, queries, qrels,
                                       query_length=16, doc_length=32, batch_size=16)
  assert in_memory == pytest.approx(metrics, rel=0, abs=METRICS)


# Graded judgements; d9 is judged non-relevant; q3 is judged but absent from the run.
QRELS = {'q1': {'d1': 2, 'd2': 1, 'd9': 0},
         'q2': {'d5': 1},
         'q3': {'d7': 1}}
RUN = {'q1': {'d3': 0.9, 'd1': 0.8, 'd9': 0.7, 'd2': 0.6, 'd4': 0.5},
       'q2': {f'x{i}': 1.0 - i / 100 for i in range(12)} | {'d5': 0.5},
       'q4': {'d1': 1.0}}


def test_metrics_match_pytrec_eval_on_hand_made_run(tmp_path):
  import pytrec_eval
  measures = ['nDCG@10', 'RR@10', 'R@100', 'P@5', 'AP', 'ndcg_cut_20', 'MRR@10']
  got = evaluation.evaluate(RUN, QRELS, measures)
  assert list(got) == ['nDCG@10', 'RR@10', 'R@100', 'P@5', 'AP', 'nDCG@20']

  # By hand, q1: d1 (gain 2) at rank 2, d2 (gain 1) at rank 4; q2: d5 at rank 13.
  ndcg_q1 = (2 / np.log2(3) + 1 / np.log2(5)) / (2 + 1 / np.log2(3))
  assert got['nDCG@10'] == pytest.approx(ndcg_q1 / 3, rel=0, abs=METRICS)
  assert got['RR@10'] == pytest.approx(0.5 / 3, rel=0, abs=METRICS)
  assert got['R@100'] == pytest.approx((1 + 1 + 0) / 3, rel=0, abs=METRICS)
  assert got['P@5'] == pytest.approx((2 / 5) / 3, rel=0, abs=METRICS)

  # pytrec_eval directly; trec_eval skips queries without results, t5dual counts them as 0.
  qrels_eval = pytrec_eval.RelevanceEvaluator(QRELS, {'ndcg_cut.10,20', 'recall.100', 'P.5',
                                                      'map', 'recip_rank'})
  top10 = {q: dict(list(docs.items())[:10]) for q, docs in RUN.items()}
  full = qrels_eval.evaluate(RUN)
  rr = pytrec_eval.RelevanceEvaluator(QRELS, {'recip_rank'}).evaluate(top10)
  mean = lambda table, key: sum(table[q][key] for q in table) / len(QRELS)
  assert set(full) == {'q1', 'q2'}
  assert got['nDCG@10'] == pytest.approx(mean(full, 'ndcg_cut_10'), rel=0, abs=METRICS)
  assert got['nDCG@20'] == pytest.approx(mean(full, 'ndcg_cut_20'), rel=0, abs=METRICS)
  assert got['R@100'] == pytest.approx(mean(full, 'recall_100'), rel=0, abs=METRICS)
  assert got['P@5'] == pytest.approx(mean(full, 'P_5'), rel=0, abs=METRICS)
  assert got['AP'] == pytest.approx(mean(full, 'map'), rel=0, abs=METRICS)
  assert got['RR@10'] == pytest.approx(mean(rr, 'recip_rank'), rel=0, abs=METRICS)

  per_query = evaluation.evaluate_per_query(RUN, QRELS, ['RR@10'])['RR@10']
  assert per_query == {'q1': 0.5, 'q2': 0.0, 'q3': 0.0}  # exact: a reciprocal rank of 2

  # Through a run file: same numbers, and the table prints them.
  path = str(tmp_path / 'hand.trec')
  retrieval.write_trec_run(path, RUN, 'hand')
  lines = open(path).read().splitlines()
  assert lines[0] == 'q1 Q0 d3 1 0.9 hand' and len(lines) == 5 + 13 + 1
  assert evaluation.evaluate(retrieval.read_trec_run(path), QRELS, measures) == got
  table = evaluation.format_table({'hand': got})
  assert 'nDCG@10' in table.splitlines()[0] and f'{got["AP"]:.4f}' in table


def test_search_depth_and_measure_names():
  assert evaluation.search_depth(['nDCG@10', 'R@100']) == 100
  assert evaluation.search_depth(['nDCG@10', 'AP']) == 1000
  names = [str(m) for m in evaluation.parse_measures(['MRR@10', 'Recall@50', 'recip_rank'])]
  assert names == ['RR@10', 'R@50', 'RR']
  with pytest.raises(ValueError, match="unknown measure 'nDGC@10'"):
    evaluation.parse_measures(['nDGC@10'])


def test_bad_inputs_give_clear_errors(tmp_path, beir):
  with pytest.raises(FileNotFoundError, match='no-such.tsv: qrels file not found'):
    evaluation.load_qrels(str(tmp_path / 'no-such.tsv'))
  with pytest.raises(FileNotFoundError, match=r'qrels/dev.tsv.*splits in .*: test, train'):
    evaluation.load_qrels(beir['folder'], 'dev')
  bad_qrels = tmp_path / 'bad.tsv'
  bad_qrels.write_text('query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\n')
  with pytest.raises(ValueError, match='bad.tsv:3: expected'):
    evaluation.load_qrels(str(bad_qrels))

  bad_run = tmp_path / 'bad.trec'
  bad_run.write_text('q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2 high t\n')
  with pytest.raises(retrieval.RunFormatError, match='bad.trec:2: score .high. is not a number'):
    retrieval.read_trec_run(str(bad_run))
  bad_run.write_text('q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2 0.4\n')
  with pytest.raises(retrieval.RunFormatError, match='bad.trec:2: expected "qid Q0'):
    retrieval.read_trec_run(str(bad_run))
  bad_run.write_text('q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n')
  with pytest.raises(retrieval.RunFormatError, match="bad.trec:2: document 'd1' listed twice"):
    retrieval.read_trec_run(str(bad_run))
  with pytest.raises(FileNotFoundError, match='missing.trec: run file not found'):
    retrieval.read_trec_run(str(tmp_path / 'missing.trec'))

  with pytest.raises(FileNotFoundError, match='missing.trec: run file not found'):
    load_script('eval').main(['score', f'--run={tmp_path / "missing.trec"}',
                          f'--beir={beir["folder"]}'])

  with pytest.raises(ValueError, match='none of the 1 queries of the run has qrels'):
    evaluation.evaluate({'x': {'d1': 1.0}}, QRELS)
  with pytest.raises(ValueError, match='1 qrels queries have no text'):
    evaluation.evaluate_beir(beir['model'], beir['params'], beir['tok'], ['d1'], ['text'],
                             {'q1': 'hello'}, {'q1': {'d1': 1}, 'q2': {'d1': 1}}, 8, 8)
  with pytest.raises(ValueError, match='corpus dimension 4 != query dimension 3'):
    retrieval.exact_search(np.ones((2, 3), np.float32), np.ones((5, 4), np.float32), 2)


def test_export_script(beir, tmp_path):
  """scripts/export.py on BEIR queries (left tower) and on a JSONL file."""
  model_dir = str(tmp_path / 'model')
  write_model_dir(beir, model_dir)
  export_script = load_script('export')
  export_script.main([f'--model_dir={model_dir}', '--side=query', f'--beir={beir["folder"]}',
                      f'--out_dir={tmp_path / "queries"}', '--shard_size=100', '--batch_size=16',
                      '--no_progress'])
  queries = sources.read_beir_queries(beir['folder'])
  emb = export.open_embeddings(str(tmp_path / 'queries'), verify_checksums=True)
  assert emb.ids == list(queries) and emb.manifest['max_length'] == 16
  assert (emb.manifest['tower'], emb.manifest['step'], emb.manifest['dtype']) == (
      'left', 3, 'float16')
  encode = jax.jit(beir['model'].encode, static_argnames='side')
  want = encode(beir['params'], beir['tok'].encode(list(queries.values()), 16), side='left')
  # Stored as float16 (one rounding of unit-vector entries), computed by two float32 programs
  # (2 layers of 2 residual blocks + head, widest reduction the 128-wide MLP).
  np.testing.assert_allclose(
      emb.to_numpy(), np.asarray(want), rtol=0,
      atol=tolerances.rounding(1.0, np.float16) +
      tolerances.tolerance(1.0, depth=5, width=128, both_sides=True))

  jsonl = tmp_path / 'docs.jsonl'
  jsonl.write_text('{"doc": "a", "body": "alpha beta"}\n{"doc": "b", "body": "gamma"}\n')
  export_script.main([f'--model_dir={model_dir}', '--tower=right', f'--jsonl={jsonl}',
                      '--id_field=doc', '--text_fields=body', '--dtype=float32', '--parquet',
                      '--batch_size=16', f'--out_dir={tmp_path / "docs"}', '--no_progress'])
  docs = export.open_embeddings(str(tmp_path / 'docs'))
  assert docs.ids == ['a', 'b'] and docs.manifest['shards'][0]['parquet']
  want = encode(beir['params'], beir['tok'].encode(['alpha beta', 'gamma'], 32), side='right')
  tolerances.assert_close(docs.to_numpy(), want, magnitude=1.0, depth=5, width=128,
                          both_sides=True)  # two float32 programs, as above


