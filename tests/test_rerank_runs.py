"""Reranking as a user meets it (t5dual/rerank_runs.py, scripts/rerank.py) with a small random
reranker: runs written in score order with ranks 1..k, every query of the run that has text
reranked (judgements only for evaluation, none needed at all), the first stage's tail below
the reranked head or the deeper measures left out, and scoring that resumes after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from t5dual import bm25, checkpoints, cli, evaluation, rerank_runs, rerankers, retrieval, t5
from t5dual.data import sources
from t5dual.vocab import Tokenizer
from script_modules import load_script  # tests/helpers
from trec_files import assert_in_score_order, read_as_written  # tests/helpers
import cli_output  # tests/helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 32
DEPTH, TOP_K = 30, 10


@pytest.fixture(scope='module')
def collection(tmp_path_factory, demo_beir):
  """A demo BEIR folder, its vocabulary, a random 'enc' reranker directory, a BM25 run of the
  test queries plus two queries unknown to the folder and a judged-nowhere-in-test query."""
  work = tmp_path_factory.mktemp('reranking')
  folder, vocab = demo_beir(150, 20, 300, lexical_overlap=0.5,
                            extra_texts=['Query: Document: Relevant:'])
  config = rerankers.RerankerConfig(
      t5=t5.t5_config('tiny', vocab_size=300, dtype='float32'), scorer='enc',
      input_length=LENGTH)
  model_dir = str(work / 'model')
  load_script('convert').save_model_dir(
      model_dir, rerankers.RerankerModel(config),
      rerankers.init_params(config, jax.random.PRNGKey(3)), vocab,
      {'inputs': LENGTH})
  run = bm25.beir_run(folder, 'test', k=DEPTH)
  train_query = next(iter(sources.read_qrels(folder, 'train')))
  run[train_query] = dict(list(max(run.values(), key=len).items())[:15])
  run['nope1'] = {'d1': 2.0}
  run['nope2'] = {'d2': 1.0}
  path = str(work / 'first.trec')
  retrieval.write_trec_run(path, run, tag='bm25')
  return dict(work=work, folder=folder, vocab=vocab, model_dir=model_dir, run=path,
              train_query=train_query)


def _direct_scores(model_dir, folder, pairs):
  """The reranker's scores of `pairs`, one fixed-shape call, no buckets or chunks."""
  restored = checkpoints.restore_for_inference(model_dir)
  model, params = restored.model, restored.params
  queries = sources.read_beir_queries(folder)
  docs = dict(zip(*sources.read_beir_corpus(folder)))
  ids = rerankers.encode_pairs(restored.tokenizer, [queries[q] for q, _ in pairs],
                               [docs[d] for _, d in pairs], model.config.template, LENGTH)
  return np.asarray(jax.jit(model.score)(params, ids))


# --------------------------------------------------------------------------- run files

def test_write_trec_run_writes_score_order_with_ranks_whatever_the_dict_order(tmp_path):
  run = {'q1': {'a': 0.1, 'b': 0.9, 'c': 0.5, 'd': 0.5, 'e': float('nan')},
         'q2': {'x': -3.0, 'y': 2.0}}
  path = str(tmp_path / 'r.trec')
  retrieval.write_trec_run(path, run, 'tag')
  assert assert_in_score_order(path) == {'q1': ['b', 'c', 'd', 'a', 'e'], 'q2': ['y', 'x']}
  # Reading it back gives the same ranking, and in_score_order does the same in memory.
  assert {q: list(d) for q, d in retrieval.read_trec_run(path).items()} == {
      'q1': ['b', 'c', 'd', 'a', 'e'], 'q2': ['y', 'x']}
  assert list(retrieval.in_score_order(run)['q1']) == ['b', 'c', 'd', 'a', 'e']


def test_rerank_returns_each_query_best_first_and_append_tail_keeps_the_rest():
  ids = {'q': 'query', 'r': 'other'}
  docs = {f'd{i}': f'text {i}' for i in range(6)}
  first = {'q': {f'd{i}': 10.0 - i for i in range(6)}, 'r': {'d5': 1.0, 'd4': 0.5}}

  def score(batch):  # texts differ in their digit only: d5 > d4 > ... > d0
    return batch.sum(1).astype(np.float32)

  class Tok:  # one id per character, enough to rank by the document's digit
    def encode(self, texts, length):
      out = np.zeros((len(texts), length), np.int32)
      for i, text in enumerate(texts):
        codes = [ord(c) for c in text][:length - 1] + [1]
        out[i, :len(codes)] = codes
      return out
  got = rerank_runs.rerank(score, Tok(), ids, docs, first, 3, 40, progress=False)
  assert [list(v) for v in got.values()] == [['d2', 'd1', 'd0'], ['d5', 'd4']]
  assert all(list(v.values()) == sorted(v.values(), reverse=True) for v in got.values())
  full = rerank_runs.append_tail(got, first)
  assert list(full['q']) == ['d2', 'd1', 'd0', 'd3', 'd4', 'd5']
  assert full['q']['d3'] < min(got['q'].values()) and full['q']['d2'] == got['q']['d2']
  assert list(full['r']) == ['d5', 'd4']
  assert rerank_runs.measures_within(['nDCG@10', 'R@100', 'AP', 'P@3'], 10) == (
      ['nDCG@10', 'P@3'], ['R@100', 'AP'])


def test_rerank_cli_reranks_every_query_with_text_in_score_order(collection, capsys, caplog):
  out = str(collection['work'] / 'reranked.trec')
  rerank_script = load_script('rerank')
  assert rerank_script.main([
      f'--model_dir={collection["model_dir"]}', f'--beir={collection["folder"]}',
      f'--run={collection["run"]}', f'--top_k={TOP_K}', f'--out={out}', '--no_progress',
      '--batch_size=16']) == 0
  printed = capsys.readouterr().out
  # The default split is test; both unknown queries and the unjudged one are counted.
  assert f'reranked top-{TOP_K} + first stage {TOP_K + 1}-{DEPTH}' in printed
  assert "2 queries without text in queries.jsonl, not reranked (first: 'nope1')" in printed
  assert (f"1 query without judgements in test, reranked, not evaluated (first: "
          f"{collection['train_query']!r})") in printed
  written = assert_in_score_order(out)  # as `head` or a person reads it
  first = retrieval.read_trec_run(collection['run'])
  qrels = evaluation.load_qrels(collection['folder'], 'test')
  assert set(written) == set(first) - {'nope1', 'nope2'}
  assert collection['train_query'] in written
  rows = read_as_written(out)
  reordered = 0
  for qid, docs in written.items():
    order = list(first[qid])
    assert sorted(docs[:TOP_K]) == sorted(order[:TOP_K]) and docs[TOP_K:] == order[TOP_K:], qid
    reordered += docs[:TOP_K] != order[:TOP_K]
  assert reordered > len(written) // 2  # not the first stage's order relabelled
  # The head is the reranker's own ranking of those documents, with its own scores.
  pairs = [(q, d) for q, docs in written.items() for d in docs[:TOP_K]]
  direct = _direct_scores(collection['model_dir'], collection['folder'], pairs)
  np.testing.assert_allclose([s for q in written for _, _, s in rows[q][:TOP_K]], direct,
                             rtol=1e-5, atol=1e-5)
  # The table's figures are those of the files, and R@100 counts the same documents.
  summary = rerank_runs.rerank_beir(collection['model_dir'], collection['folder'], 'test',
                                  collection['run'], out, top_k=TOP_K, progress=False)
  m = summary['metrics']
  assert m['reranked'] == pytest.approx(evaluation.evaluate(retrieval.read_trec_run(out), qrels))
  assert m['reranked']['R@100'] == pytest.approx(m['first stage']['R@100'])
  assert summary['skipped'] == {'count': 2, 'first': 'nope1'}
  assert summary['unjudged'] == {'count': 1, 'first': collection['train_query']}


def test_tail_drop_writes_the_head_and_leaves_deeper_measures_out(collection, capsys):
  out = str(collection['work'] / 'head.trec')
  summary = rerank_runs.rerank_beir(collection['model_dir'], collection['folder'], 'test',
                                  collection['run'], out, top_k=TOP_K, progress=False,
                                  measures=['nDCG@10', 'R@100', 'AP'], tail='drop')
  assert summary['left_out'] == ['R@100', 'AP']
  assert list(summary['metrics']['reranked']) == ['nDCG@10']
  written = assert_in_score_order(out)
  assert max(map(len, written.values())) == TOP_K
  assert load_script('rerank').main([
      f'--model_dir={collection["model_dir"]}', f'--beir={collection["folder"]}',
      f'--run={collection["run"]}', f'--top_k={TOP_K}', f'--out={out}', '--no_progress',
      '--tail=drop']) == 0
  printed = capsys.readouterr().out
  assert f'reranked top-{TOP_K} only' in printed and 'R@100' not in printed.splitlines()[0]
  assert f'left out: R@100 (deeper than --top_k={TOP_K}' in printed


def test_reranking_needs_no_qrels(collection, tmp_path, capsys):
  hidden = str(tmp_path / 'hidden')
  shutil.copytree(collection['folder'], hidden)
  shutil.rmtree(os.path.join(hidden, 'qrels'))
  out = str(tmp_path / 'hidden.trec')
  rerank_script = load_script('rerank')
  assert rerank_script.main([
      f'--model_dir={collection["model_dir"]}', f'--beir={hidden}',
      f'--run={collection["run"]}', f'--top_k={TOP_K}', f'--out={out}', '--no_progress']) == 0
  printed = capsys.readouterr().out
  assert 'not evaluated: no qrels given' in printed
  assert set(assert_in_score_order(out)) == set(retrieval.read_trec_run(collection['run'])) - {
      'nope1', 'nope2'}
  # Naming a split that has no judgements is a mistake, said in one line before any work.
  os.remove(out)
  with pytest.raises(SystemExit) as e:
    cli.run_main(rerank_script.main, [
        f'--model_dir={collection["model_dir"]}', f'--beir={hidden}', '--split=test',
        f'--run={collection["run"]}', f'--out={out}', '--no_progress'])
  assert e.value.code == 2
  err = cli_output.error_lines(capsys.readouterr().err)
  assert len(err) == 1 and 'qrels file not found' in err[0], err
  assert not os.path.exists(out)


def test_rerank_errors_are_one_line_before_the_model_loads(collection, tmp_path, capsys):
  foreign = tmp_path / 'foreign.trec'
  foreign.write_text('x1 Q0 d1 1 1.0 t\nx2 Q0 d2 1 1.0 t\n')
  unknown_doc = tmp_path / 'unknown_doc.trec'
  qid = next(iter(sources.read_qrels(collection['folder'], 'test')))
  unknown_doc.write_text(f'{qid} Q0 d1 1 2.0 t\n{qid} Q0 nodoc 2 1.0 t\n')
  cases = [(foreign, "none of its 2 queries has text in"),
           (unknown_doc, "1 document of " + str(unknown_doc) + " not in the corpus, first: "
                         "'nodoc'")]
  for run, expected in cases:
    out = tmp_path / 'out.trec'
    with pytest.raises(SystemExit) as e:
      cli.run_main(load_script('rerank').main, [
          f'--model_dir={tmp_path / "no_model"}', f'--beir={collection["folder"]}',
          f'--run={run}', f'--out={out}', '--no_progress'])
    assert e.value.code == 2
    err = cli_output.error_lines(capsys.readouterr().err)
    # The model directory does not exist: the run's problem is found first.
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


# --------------------------------------------------------------------------- resumable scoring

@pytest.fixture(scope='module')
def pairs_and_texts(collection):
  queries = sources.read_beir_queries(collection['folder'])
  docs = dict(zip(*sources.read_beir_corpus(collection['folder'])))
  run = retrieval.read_trec_run(collection['run'])
  pairs = rerank_runs.top_k_pairs({q: d for q, d in run.items() if q in queries}, 6)
  return pairs, queries, docs, Tokenizer(collection['vocab'])


def _fake_score(batch):
  """A score of each row alone (padding and batch-mates change nothing)."""
  return (batch.astype(np.float64) * np.arange(1, batch.shape[1] + 1)).sum(1).astype(
      np.float32) / 1000


class _Counting:
  def __init__(self, fail_after=None):
    self.calls, self.rows, self.fail_after = 0, 0, fail_after

  def __call__(self, batch):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise KeyboardInterrupt('stopped')
    self.calls += 1
    self.rows += len(batch)
    return _fake_score(batch)


def test_score_pairs_resumes_from_its_finished_chunks(pairs_and_texts, tmp_path, caplog):
  pairs, queries, docs, tok = pairs_and_texts
  common = dict(input_length=LENGTH, batch_size=4, progress=False, chunk_pairs=16)
  want = rerank_runs.score_pairs(_fake_score, tok, queries, docs, pairs, **common)
  work = str(tmp_path / 'partial')
  chunks = -(-len(pairs) // 16)
  with pytest.raises(KeyboardInterrupt):  # stopped in chunk 3 (4 calls per chunk)
    rerank_runs.score_pairs(_Counting(fail_after=10), tok, queries, docs, pairs, work_dir=work,
                          fingerprint={'model': 'a'}, **common)
  assert sorted(f for f in os.listdir(work) if f.endswith('.json')) == [
      'chunk-000000.json', 'chunk-000001.json', 'plan.json']
  again = _Counting()
  with caplog.at_level('INFO', logger='t5dual.rerank_runs'):
    got = rerank_runs.score_pairs(again, tok, queries, docs, pairs, work_dir=work,
                                fingerprint={'model': 'a'}, **common)
  np.testing.assert_array_equal(got, want)
  sizes = [min(16, len(pairs) - 16 * i) for i in range(chunks)]
  assert chunks >= 4 and again.calls == sum(-(-s // 4) for s in sizes[2:])
  assert 'resuming: 32 pairs (2 chunks) were scored before' in caplog.text
  assert 'pairs/s, about' in caplog.text
  # A damaged chunk is scored again, with the ones after it.
  data = os.path.join(work, 'chunk-000001.npy')
  raw = bytearray(open(data, 'rb').read())
  raw[-1] ^= 0xFF
  open(data, 'wb').write(bytes(raw))
  third = _Counting()
  np.testing.assert_array_equal(rerank_runs.score_pairs(
      third, tok, queries, docs, pairs, work_dir=work, fingerprint={'model': 'a'}, **common),
      want)
  assert third.rows >= len(pairs) - 16
  # Another model (or other pairs) starts afresh.
  caplog.clear()
  fresh = _Counting()
  with caplog.at_level('WARNING', logger='t5dual.rerank_runs'):
    rerank_runs.score_pairs(fresh, tok, queries, docs, pairs, work_dir=work,
                          fingerprint={'model': 'b'}, **common)
  assert fresh.rows >= len(pairs) and 'scoring afresh' in caplog.text


KILLED = textwrap.dedent('''
    import json, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from t5dual import rerank_runs
    from t5dual.vocab import Tokenizer
    pairs, queries, docs = json.load(open(sys.argv[3]))
    def slow(batch):
      time.sleep(0.3)
      return (batch.astype(np.float64) * np.arange(1, batch.shape[1] + 1)).sum(1).astype(
          np.float32) / 1000
    rerank_runs.score_pairs(slow, Tokenizer(sys.argv[2]), queries, docs,
                          [tuple(p) for p in pairs], input_length=%d, batch_size=4,
                          progress=False, chunk_pairs=16, work_dir=sys.argv[4],
                          fingerprint={'model': 'a'})
    print('finished')
''' % LENGTH)


@pytest.mark.multiprocess
def test_score_pairs_resumes_after_kill_9(pairs_and_texts, collection, tmp_path):
  pairs, queries, docs, tok = pairs_and_texts
  args = str(tmp_path / 'args.json')
  json.dump([pairs, queries, docs], open(args, 'w'))
  work = str(tmp_path / 'partial')
  proc = subprocess.Popen([sys.executable, '-c', KILLED, REPO, collection['vocab'], args, work],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  deadline = time.time() + 120
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(os.path.join(work, 'chunk-000001.json')):
        break
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
  assert b'finished' not in out, err.decode()[-2000:]
  done = sorted(f for f in os.listdir(work) if f.startswith('chunk') and f.endswith('.json'))
  assert 2 <= len(done) < -(-len(pairs) // 16), done
  again = _Counting()
  got = rerank_runs.score_pairs(again, tok, queries, docs, pairs, input_length=LENGTH,
                              batch_size=4, progress=False, chunk_pairs=16, work_dir=work,
                              fingerprint={'model': 'a'})
  want = rerank_runs.score_pairs(_fake_score, tok, queries, docs, pairs, input_length=LENGTH,
                               batch_size=4, progress=False, chunk_pairs=16)
  np.testing.assert_array_equal(got, want)
  assert again.rows <= 16 * (-(-len(pairs) // 16) - len(done))
