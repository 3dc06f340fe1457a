"""The retrieval and evaluation scripts run as processes (scripts/eval.py, scripts/export.py):
exact search over two devices, eval.py run / score / mine / diagnose chained, a collection
with empty documents, and user errors as one line. The in-process tests are in
test_retrieval_eval.py."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from t5dual import evaluation, export, retrieval, t5
from t5dual.data import sources
import cli_output  # tests/helpers
from random_sde import METRICS, beir_with_random_sde, write_model_dir  # tests/helpers
from script_modules import load_script  # tests/helpers
import tolerances  # tests/helpers
from trec_files import assert_in_score_order  # tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every test starts processes: a 2-device JAX, or the scripts themselves.
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope='module')
def beir(tmp_path_factory, demo_beir):
  return beir_with_random_sde(demo_beir, tmp_path_factory.mktemp('beir'))


TWO_DEVICES = textwrap.dedent('''
    import numpy as np, jax
    from t5dual import retrieval
    assert len(jax.local_devices()) == 2, jax.local_devices()
    rng = np.random.default_rng(1)
    q = rng.normal(size=(11, 8)).astype(np.float32)
    c = rng.normal(size=(500, 8)).astype(np.float16)
    s, i = retrieval.exact_search(q, c, 7, chunk_size=64, query_block=4)
    ref = np.argsort(-(q.astype(np.float64) @ c.astype(np.float64).T), axis=1, kind='stable')
    np.testing.assert_array_equal(i, ref[:, :7])
    print('ok', s.sharding if hasattr(s, 'sharding') else 'numpy')
''')


def test_exact_search_spreads_queries_over_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.run([sys.executable, '-c', TWO_DEVICES], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_eval_script_chains_export_retrieve_evaluate(beir, tmp_path):
  model_dir, out = str(tmp_path / 'model'), str(tmp_path / 'eval')
  write_model_dir(beir, model_dir)
  cmd = [sys.executable, 'scripts/eval.py', 'run', f'--model_dir={model_dir}',
         f'--beir={beir["folder"]}', '--split=test', f'--out_dir={out}', '--dtype=float32',
         '--batch_size=16', '--shard_size=64', '--no_progress']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.load(open(os.path.join(out, 'metrics.json')))
  assert summary['step'] == 3 and summary['k'] == 100
  manifest = export.load_manifest(os.path.join(out, 'corpus'))
  assert (manifest['step'], manifest['tower'], manifest['count']) == (3, 'right', 160)

  # Same numbers as the in-memory path with the same (restored) model.
  doc_ids, doc_texts = sources.read_beir_corpus(beir['folder'])
  qrels = evaluation.load_qrels(beir['folder'], 'test')
  want = evaluation.evaluate_beir(beir['model'], beir['params'], beir['tok'], doc_ids,
                                  doc_texts, sources.read_beir_queries(beir['folder']), qrels,
                                  16, 32, batch_size=16)
  assert summary['metrics'] == pytest.approx(want, rel=0, abs=METRICS)
  assert 'nDCG@10' in proc.stdout and f'{want["RR@10"]:.4f}' in proc.stdout
  assert_in_score_order(summary['run'])  # line order and ranks as the scores say

  # The score mode: run + qrels -> the same table.
  eval_script = load_script('eval')
  eval_script.main(['score', f'--run={summary["run"]}', f'--beir={beir["folder"]}',
                    f'--json={tmp_path / "table.json"}'])
  table = json.load(open(tmp_path / 'table.json'))
  assert table[summary['run']] == pytest.approx(summary['metrics'], rel=0, abs=METRICS)

  # Hard negatives from that run, scored against exported positives -> training JSONL.
  triples = str(tmp_path / 'negatives.jsonl')
  stats = eval_script.main(['mine', f'--run={summary["run"]}', f'--beir={beir["folder"]}',
                            '--split=test', f'--out={triples}', f'--embeddings={out}',
                            '--min_rank=2', '--max_rank=30', '--num_negatives=3',
                            '--margin=0.01'])
  pairs = sources.jsonl_pairs(triples)
  assert len(pairs) == stats['records'] > 0
  qrels = evaluation.load_qrels(beir['folder'], 'test')
  corpus = dict(zip(doc_ids, doc_texts))
  for line, negatives in zip(open(triples), pairs.negatives):
    record = json.loads(line)
    assert 1 <= len(record['negative_ids']) <= 3
    assert negatives == [corpus[d] for d in record['negative_ids']]
    assert not set(record['negative_ids']) & set(qrels[record['query_id']])
    assert max(record['negative_scores']) <= record['positive_score'] - 0.01

  # Diagnostics of the checkpoint, drawn twice side by side.
  paths = eval_script.main(['diagnose', f'--model_dir={model_dir}', f'--model_dir={model_dir}',
                            '--label=a', '--label=b', f'--beir={beir["folder"]}',
                            f'--out_dir={tmp_path / "diag"}', '--sample=20',
                            '--batch_size=16'])
  for name in ('tsne', 'top1_cosine', 'qq_qp_ratio'):
    assert open(paths[name], 'rb').read(4) == b'\x89PNG'
  stats = json.load(open(paths['stats']))
  assert stats['a'] == stats['b'] and stats['a']['queries'] == 48


def _collection_like_cranfield(source, folder):
  """The fixture's collection with what real ones hold: a document with neither title nor
  text, one with a title only, an empty query without judgements, a judged query whose
  only judgement is non-relevant, and judgements citing documents not in the corpus."""
  import shutil
  shutil.copytree(source, folder)
  corpus = [json.loads(l) for l in open(os.path.join(folder, 'corpus.jsonl'))]
  corpus[5].update(title='', text='')
  corpus[6].update(title='a title only', text='')
  with open(os.path.join(folder, 'corpus.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in corpus)
  with open(os.path.join(folder, 'queries.jsonl'), 'a') as f:
    f.write(json.dumps({'_id': 'unjudged', 'text': ''}) + '\n')
    f.write(json.dumps({'_id': 'nothing_relevant', 'text': 'what is there'}) + '\n')
  test_qrels = os.path.join(folder, 'qrels', 'test.tsv')
  first_query = open(test_qrels).read().splitlines()[1].split('\t')[0]
  with open(test_qrels, 'a') as f:
    f.write(f'{first_query}\tgone\t1\nnothing_relevant\t{corpus[0]["_id"]}\t0\n')
  return corpus[5]['_id']


@pytest.mark.slow
def test_eval_run_on_a_collection_with_empty_documents(beir, tmp_path, caplog):
  """Empty and title-only documents are encoded, with one warning; neither an unjudged
  query nor a missing document stops the run, and training warns about the same
  judgement the same way."""
  folder, model_dir, out = str(tmp_path / 'data'), str(tmp_path / 'model'), str(tmp_path / 'eval')
  empty_id = _collection_like_cranfield(beir['folder'], folder)
  write_model_dir(beir, model_dir)
  cmd = [sys.executable, 'scripts/eval.py', 'run', f'--model_dir={model_dir}', f'--beir={folder}',
         f'--out_dir={out}', '--dtype=float32', '--batch_size=16', '--no_progress']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l.split(' WARNING ', 1)[1] for l in proc.stderr.splitlines() if ' WARNING ' in l]
  qrels_file = os.path.join(folder, 'qrels', 'test.tsv')
  assert warnings == [
      f"{qrels_file}: 1 judgement(s) cite 1 document(s) not in the corpus ('gone'); they are "
      'kept and count as documents never retrieved, as in BEIR',
      f"{folder}/corpus.jsonl: 1 of 160 texts are empty ('{empty_id}'); each empty text is "
      'encoded as EOS only'], proc.stderr
  assert 'Unable to initialize backend' not in proc.stderr and 'Traceback' not in proc.stderr

  summary = json.load(open(os.path.join(out, 'metrics.json')))
  run = retrieval.read_trec_run(summary['run'])
  assert 'nothing_relevant' in run and 'unjudged' not in run
  qrels = evaluation.load_qrels(folder, 'test')
  assert summary['metrics'] == pytest.approx(evaluation.evaluate(run, qrels), abs=1e-12)
  docs = export.open_embeddings(os.path.join(out, 'corpus'))
  eos_only = beir['model'].encode(beir['params'], np.array([[t5.EOS_ID]], np.int32),
                                  side='right')
  tolerances.assert_close(docs.take([docs.ids.index(empty_id)]), eos_only, magnitude=1.0,
                          depth=5, width=128, both_sides=True)  # two float32 programs

  with caplog.at_level('WARNING'):
    pairs = sources.beir_pairs(folder, 'test')
  assert len(pairs) == sum(r > 0 for j in qrels.values() for r in j.values()) - 1
  gone_line = len(open(qrels_file).read().splitlines()) - 1
  ours = [r.getMessage() for r in caplog.records if r.name.startswith('t5dual')]
  assert ours[0] == (f"{qrels_file}: 1 judgement(s) cite 1 document(s) not in the corpus "
                     f"('gone' on line {gone_line}); those pairs are skipped")
  assert len(ours) == 2 and ours[1].startswith(f'{qrels_file}: 2 of {len(pairs)} pairs hold an '
                                               f'empty query or document (')


def _cli(script, *args):
  return subprocess.run([sys.executable, f'scripts/{script}.py', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_user_errors_are_one_line(beir, tmp_path):
  """Bad input to scripts/eval.py and scripts/export.py: exit 2 and exactly one stderr
  line, 'error: <file>:<line>: ...', without a traceback."""
  folder, model_dir = str(tmp_path / 'data'), str(tmp_path / 'model')
  import shutil
  shutil.copytree(beir['folder'], folder)
  with open(os.path.join(folder, 'corpus.jsonl'), 'a') as f:
    f.write('{"_id": "broken", "text": \n')
  latin1 = tmp_path / 'run.trec'
  latin1.write_bytes('q1 Q0 d1 1 0.5 t\nq1 Q0 café 2 0.4 t\n'.encode('latin-1'))
  write_model_dir(beir, model_dir)
  cases = [
      (('eval', 'run', f'--model_dir={model_dir}', f'--beir={folder}', '--no_progress'),
       rf'error: {folder}/corpus.jsonl:161: not valid JSON'),
      (('eval', 'score', f'--run={latin1}', f'--beir={folder}'),
       rf'error: {latin1}:2: not valid UTF-8 \(byte 0xe9 at column 10\)'),
      (('eval', 'run', f'--model_dir={model_dir}', f'--beir={beir["folder"]}',
        '--measures=nDCG@10,nDGC@10'), r"error: unknown measure 'nDGC@10'"),
      (('export', f'--model_dir={model_dir}', '--side=document', f'--jsonl={latin1}',
        f'--out_dir={tmp_path / "out"}'), rf'error: {latin1}:1: not valid JSON'),
      (('export', f'--model_dir={tmp_path / "nothing"}', '--tower=left',
        f'--beir={beir["folder"]}', f'--out_dir={tmp_path / "out"}'),
       r'error: .*nothing.* is not a t5dual model directory'),
  ]
  for (script, *args), pattern in cases:
    proc = _cli(script, *args)
    lines = cli_output.error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr)
    assert re.fullmatch(pattern + '.*', lines[0]), (pattern, lines[0])
  assert not os.path.exists(tmp_path / 'out')
