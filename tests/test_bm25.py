"""BM25 first stage: Lucene BM25 against a direct NumPy formula, and the shared reference."""

import importlib.util
import json
import math
import pathlib
import time

import numpy as np
import pytest

pytest.importorskip('bm25s')
pytest.importorskip('Stemmer')

from t5dual import bm25, evaluation, retrieval
from trec_files import assert_in_score_order  # tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]

# Words that are neither English stopwords nor changed by the Snowball stemmer,
# so the reference below can tokenize by whitespace.
CORPUS = {
    'd1': ('cat', 'cat sat mat'),
    'd2': ('', 'dog bark loud dog'),
    'd3': ('fish', 'fish swim deep sea fish'),
    'd4': ('bird', 'bird sing song'),
    'd5': ('', 'cat dog bird fish'),
    'd6': ('', 'mat floor wall'),
}
QUERIES = {'q1': 'cat mat', 'q2': 'dog', 'q3': 'fish bird', 'q4': 'zebra'}
QRELS = {'q1': {'d1': 1}, 'q2': {'d2': 1}, 'q3': {'d3': 1}, 'q4': {'d6': 1}}


def _write_beir(folder):
  folder.mkdir(exist_ok=True)
  (folder / 'qrels').mkdir(exist_ok=True)
  with open(folder / 'corpus.jsonl', 'w') as f:
    for doc_id, (title, text) in CORPUS.items():
      f.write(json.dumps({'_id': doc_id, 'title': title, 'text': text}) + '\n')
  with open(folder / 'queries.jsonl', 'w') as f:
    for qid, text in QUERIES.items():
      f.write(json.dumps({'_id': qid, 'text': text}) + '\n')
  with open(folder / 'qrels' / 'test.tsv', 'w') as f:
    f.write('query-id\tcorpus-id\tscore\n')
    for qid, rels in QRELS.items():
      for doc_id, rel in rels.items():
        f.write(f'{qid}\t{doc_id}\t{rel}\n')
  return folder


def _lucene_bm25(query, k1=1.5, b=0.75):
  """{doc id: score} of Lucene BM25, written out from the formula.

  Lucene (since 8.0, and bm25s' 'lucene' method) drops the constant (k1 + 1)
  of the classic term-frequency factor: tf / (tf + k1 (1 - b + b dl / avgdl)).
  """
  docs = {d: f'{title} {text}'.split() for d, (title, text) in CORPUS.items()}
  n = len(docs)
  avgdl = np.mean([len(t) for t in docs.values()])
  scores = {}
  for d, terms in docs.items():
    score = 0.0
    for term in set(query.split()):
      df = sum(term in t for t in docs.values())
      tf = terms.count(term)
      if tf:
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        score += idf * tf / (tf + k1 * (1 - b + b * len(terms) / avgdl))
    if score > 0:
      scores[d] = score
  return scores


def test_tiny_collection_matches_the_lucene_formula(tmp_path):
  run = bm25.beir_run(str(_write_beir(tmp_path / 'beir')), 'test', k=10)
  assert set(run) == set(QUERIES)
  for qid, text in QUERIES.items():
    ref = _lucene_bm25(text)
    assert set(run[qid]) == set(ref), qid  # only documents sharing a term
    for doc_id, score in run[qid].items():
      assert score == pytest.approx(ref[doc_id], rel=1e-5)
    assert list(run[qid].values()) == sorted(run[qid].values(), reverse=True)
  assert run['q4'] == {}  # no term in the corpus: nothing retrieved
  assert list(run['q1'])[0] == 'd1'


def test_stemming_stopwords_and_k(tmp_path):
  index = bm25.BM25Index.build(['a', 'b', 'c'], ['the runner was running', 'walks in a park',
                                                   'nothing relevant here'])
  run = index.search(['s', 'w', 'x'], ['runs', 'walking', 'the of and'], k=50)
  assert list(run['s']) == ['a'] and list(run['w']) == ['b'] and run['x'] == {}
  assert len(index.search(['p'], ['runner park relevant'], k=2)['p']) == 2
  with pytest.raises(ValueError, match='k must be positive'):
    index.search(['p'], ['runner'], k=0)


def _eval_script():
  spec = importlib.util.spec_from_file_location('script_eval', REPO / 'scripts' / 'eval.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cli_writes_a_run_and_prints_metrics(tmp_path, capsys):
  folder = _write_beir(tmp_path / 'beir')
  out = tmp_path / 'runs' / 'bm25.trec'
  metrics = _eval_script().main(['bm25', f'--beir={folder}', '--split=test', f'--out={out}',
                                 '--k=3', '--measures=nDCG@10,R@100'])
  written = retrieval.read_trec_run(str(out))
  expected = {q: docs for q, docs in bm25.beir_run(str(folder), 'test', k=3).items() if docs}
  assert {q: list(d) for q, d in written.items()} == {q: list(d) for q, d in expected.items()}
  assert all(len(docs) <= 3 for docs in written.values())
  assert metrics == evaluation.evaluate(written, evaluation.load_qrels(str(folder), 'test'),
                                        ['nDCG@10', 'R@100'])
  assert 'nDCG@10' in capsys.readouterr().out
  with open(out) as f:
    assert f.readline().split()[5] == 'bm25'
  assert_in_score_order(str(out))


def test_bm25s_debug_lines_stay_quiet_at_default_verbosity(tmp_path, caplog):
  import logging
  # What importing bm25s does to its logger (it sets DEBUG), whatever the import order.
  logging.getLogger('bm25s').setLevel(logging.DEBUG)
  folder = _write_beir(tmp_path / 'beir')
  with caplog.at_level(logging.DEBUG):
    bm25.beir_run(str(folder), 'test', k=3)
  assert 'Building index' not in caplog.text and 'BM25: indexing 6 documents' in caplog.text
  assert 'BM25: top-3 of 4 test queries' in caplog.text


def test_medquad_reproduces_the_shared_reference(shared_dir):
  folder = shared_dir / 'data' / 'medquad'
  if not (folder / 'corpus.jsonl').exists():
    pytest.skip(f'{folder} is absent')
  start = time.perf_counter()
  run = bm25.beir_run(str(folder), 'test', k=100)
  seconds = time.perf_counter() - start
  metrics = evaluation.evaluate(run, evaluation.load_qrels(str(folder), 'test'),
                                ['nDCG@10', 'R@100'])
  # shared/README.md: nDCG@10 0.5529, Recall@100 0.9808 (bm25s reference script)
  assert metrics['nDCG@10'] == pytest.approx(0.5529, abs=0.002)
  assert metrics['R@100'] == pytest.approx(0.9808, abs=0.002)
  assert seconds < 60, f'BM25 over medquad took {seconds:.0f}s'
