"""Multi-stage fine-tuning run whole (t5dual/multistage.py, configs/runs/two_stage_rerank.gin):
a two-stage reranker chain run by scripts/train.py, its record and evaluations, each stage
starting from the previous one and reloading by kind, a re-run that trains nothing, kill -9 in
stage 2, teacher scoring that resumes, and the chain directory standing for its final model.
The gin checks of stage scopes, which run nothing, are in test_multistage.py."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5dual import checkpoints, cli, multistage, rerank_runs
from t5dual.data import lists as lists_lib
from t5dual.data import tasks
from metrics_log import metrics_by_step  # tests/helpers
from rerank_chain import BATCH_SIZE, CHAIN_FILES, DEMO_DATA, MAX_RANK, STEPS  # tests/helpers
import rerank_chain  # tests/helpers
from trec_files import assert_in_score_order  # tests/helpers

# Each test runs or reads a whole chain trained by scripts/train.py in a subprocess.
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def demo_data(demo_beir):
  return demo_beir(*DEMO_DATA)


def _chain_cmd(model_dir, data, spm):
  return ([sys.executable, os.path.join(REPO, 'scripts', 'train.py')] +
          [f'--gin_file={f}' for f in CHAIN_FILES] +
          [f'--gin_bindings={b}' for b in rerank_chain.bindings(model_dir, data, spm)])


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  # The chains of this file compile the same steps; a persistent compilation cache
  # lets the later ones skip it (the executables, hence the numbers, are the same).
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': cache,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}


@pytest.fixture(scope='module')
def chain(demo_data, env, tmp_path_factory):
  """An uninterrupted two-stage chain: (model_dir, its stderr)."""
  data, spm = demo_data
  model_dir = str(tmp_path_factory.mktemp('chain') / 'run')
  done = subprocess.run(_chain_cmd(model_dir, data, spm), cwd=REPO, env=env,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return model_dir, done.stderr


def _record(model_dir):
  with open(os.path.join(model_dir, multistage.RECORD)) as f:
    return json.load(f)


def _stage_dir(model_dir, i):
  return os.path.join(model_dir, 'stages', f'{i}-{list(STEPS)[i - 1]}')


def _read_run(path):
  run = {}
  with open(path) as f:
    for line in f:
      qid, _, doc, _, score, _ = line.split()
      run.setdefault(qid, {})[doc] = float(score)
  return run


def _ndcg10(run, qrels):
  """nDCG@10 straight from pytrec_eval, averaged over the judged queries (missing = 0)."""
  import pytrec_eval
  per_query = pytrec_eval.RelevanceEvaluator(qrels, {'ndcg_cut.10'}).evaluate(
      {q: d for q, d in run.items() if q in qrels})
  return sum(v['ndcg_cut_10'] for v in per_query.values()) / len(qrels)


def _test_qrels(data):
  qrels = {}
  with open(os.path.join(data, 'qrels', 'test.tsv')) as f:
    next(f)
    for line in f:
      qid, doc, rel = line.split()
      qrels.setdefault(qid, {})[doc] = int(rel)
  return qrels


def test_the_chain_records_each_stage_and_its_evaluation(chain, demo_data):
  model_dir, log = chain
  data, _ = demo_data
  record = _record(model_dir)
  stages = record['stages']
  assert [s['name'] for s in stages] == list(STEPS)
  assert [s['status'] for s in stages] == ['complete', 'complete']
  assert [s['step'] for s in stages] == list(STEPS.values())
  assert [s['dir'] for s in stages] == ['stages/1-contrastive', 'stages/2-distill']
  assert [s['starts_from'] for s in stages] == [None, 'stages/1-contrastive']
  assert [s['teacher'] for s in stages] == [None, 'stages/2-distill/teacher.trec']
  assert record['final_model_dir'] == 'stages/2-distill'
  assert os.readlink(os.path.join(model_dir, 'final')) == 'stages/2-distill'
  assert not os.path.exists(os.path.join(model_dir, 'checkpoints'))
  qrels = _test_qrels(data)
  for i, stage in enumerate(stages, 1):
    assert stage['train_metrics'] == metrics_by_step(_stage_dir(model_dir, i))[stage['step']]
    evaluation = stage['evaluation']
    assert evaluation['step'] == stage['step'] and evaluation['split'] == 'test'
    # The recorded nDCG@10 of the first stage (BM25) and of the reranked run are those
    # of the run files it names, as pytrec_eval measures them.
    for row, path in (('first stage', evaluation['first_stage']),
                      ('reranked', evaluation['run'])):
      assert evaluation['metrics'][row]['nDCG@10'] == pytest.approx(
          _ndcg10(_read_run(path), qrels), abs=1e-12)
    # Runs are written in score order with ranks 1..k, as any reader takes them; the
    # reranked top EVAL_TOP_K = 10 sits above BM25's other documents in BM25's order, so
    # R@100 (of BM25's top 100, not its top 10) counts the same documents in both rows.
    first = assert_in_score_order(evaluation['first_stage'])
    written = assert_in_score_order(evaluation['run'])
    assert evaluation['first_stage_depth'] == max(map(len, first.values())) > 10
    assert os.path.basename(evaluation['first_stage']) == 'bm25-data-test-top100.trec'
    for qid, docs in written.items():
      assert sorted(docs[:10]) == sorted(first[qid][:10]) and docs[10:] == first[qid][10:]
    assert evaluation['metrics']['reranked']['R@100'] == pytest.approx(
        evaluation['metrics']['first stage']['R@100'], abs=1e-12)
    # ... and the table at the end of the log shows it.
    value = evaluation['metrics']['reranked']['nDCG@10']
    assert f'{i}-{stage["name"]}: reranked' in log and f'{value:.4f}' in log
  assert 'final model: ' + os.path.join(model_dir, 'final') in log
  # The teacher scored what stage 2 consumes: the 20 x 4 lists visit 80 training queries,
  # said with the count before scoring starts; teacher.trec is in score order too.
  teacher = assert_in_score_order(os.path.join(_stage_dir(model_dir, 2),
                                               multistage.TEACHER_FILE))
  visited = STEPS['distill'] * BATCH_SIZE
  assert len(teacher) == visited
  assert (f'scores {sum(map(len, teacher.values()))} candidates of the {visited} of ') in log
  assert f'train queries that {STEPS["distill"]} steps of {BATCH_SIZE} lists visit' in log
  assert not os.path.exists(os.path.join(_stage_dir(model_dir, 2), 'teacher.trec.partial'))


def test_each_stage_reloads_by_kind_and_stage_2_starts_from_stage_1(chain, demo_data):
  model_dir, _ = chain
  data, _ = demo_data
  stage1 = checkpoints.restore_for_inference(_stage_dir(model_dir, 1))
  stage2 = checkpoints.restore_for_inference(_stage_dir(model_dir, 2))
  first, params1, step1, tokenizer = stage1.model, stage1.params, stage1.step, stage1.tokenizer
  second, params2, step2, lengths = (stage2.model, stage2.params, stage2.step,
                                     stage2.feature_lengths)
  assert (first.kind, second.kind) == ('reranker', 'reranker')
  assert (step1, step2) == tuple(STEPS.values())
  assert first.loss.__name__ == 'lce_loss'
  assert second.loss.__name__ == 'teacher_rank_pairwise_loss'
  teacher_path = os.path.join(_stage_dir(model_dir, 2), multistage.TEACHER_FILE)
  # The teacher is the stage's task's (model.json records the task beside the model).
  task = tasks.from_description(checkpoints.read_model_json(_stage_dir(model_dir, 2)))
  assert task.teacher == teacher_path

  # Stage 2's first logged loss (step 1, before its first update) is the loss of stage
  # 1's final parameters on stage 2's first batch; and the teacher scores of that batch,
  # read from teacher.trec, are stage 1's scores of its candidates.
  batcher = task.make_batcher(f'beir:{data}:train', tokenizer, BATCH_SIZE, lengths, seed=0,
                              template=second.template)
  batch = batcher.batch(0)

  @jax.jit
  def loss_and_scores(params):
    return second.loss_fn(params, batch, None)[0], first.score(params, batch['inputs'])

  from_stage_1, scores = loss_and_scores(params1)
  from_stage_2, _ = loss_and_scores(params2)
  logged = metrics_by_step(_stage_dir(model_dir, 2))[1]['loss']
  # float32 losses of a 2-layer model computed by two compilations: ~1e-6 relative.
  assert logged == pytest.approx(float(from_stage_1), rel=1e-4)
  # Other parameters (stage 2's final ones) give another loss: the check can fail.
  assert abs(float(from_stage_2) - logged) > 100 * 1e-4 * abs(logged)
  where = batch['where']
  assert where.sum() > BATCH_SIZE
  np.testing.assert_allclose(batch['teacher_scores'][where], np.asarray(scores)[where],
                             rtol=1e-5, atol=1e-5)
  # ... of every candidate of the queries the stage visits: their lists hold the same
  # candidates as without a teacher, and the stage's batches visit each of them once.
  from t5dual import bm25
  bm25_run = bm25.beir_run(data, 'train', k=MAX_RANK)
  plain = lists_lib.load_lists(data, 'train', bm25_run, max_rank=MAX_RANK)
  visited = [q for q in plain.query_ids if q in set(batcher.lists.query_ids)]
  assert batcher.lists.query_ids == visited
  assert len(visited) == STEPS['distill'] * BATCH_SIZE < len(plain)
  for i, qid in enumerate(batcher.lists.query_ids):
    j = plain.query_ids.index(qid)
    assert batcher.lists.negatives[i] == plain.negatives[j]
    assert batcher.lists.positives[i] == plain.positives[j]
  seen = np.concatenate([batcher.list_indices(step) for step in range(STEPS['distill'])])
  assert sorted(seen.tolist()) == list(range(len(visited)))


def _snapshot(model_dir):
  """What a run that trains nothing leaves as it was."""
  files = {}
  for i in (1, 2):
    directory = _stage_dir(model_dir, i)
    files[i] = (sorted(os.listdir(directory)), sorted(os.listdir(
        os.path.join(directory, 'checkpoints'))),
        open(os.path.join(directory, 'metrics.jsonl')).read())
  return files, _record(model_dir)


def test_rerunning_a_complete_chain_trains_nothing(chain, demo_data, env):
  model_dir, _ = chain
  data, spm = demo_data
  before = _snapshot(model_dir)
  again = subprocess.run(_chain_cmd(model_dir, data, spm), cwd=REPO, env=env,
                         capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert _snapshot(model_dir) == before  # no config-<time>.gin either: no stage started
  for i, (name, steps) in enumerate(STEPS.items(), 1):
    assert (f"stage {i}/2 {name!r} is trained (step {steps} in {_stage_dir(model_dir, i)}): "
            'not training it again') in again.stderr
  assert 'training encdec reranker' not in again.stderr
  assert 'evaluating' not in again.stderr and 'evaluation recorded' in again.stderr


def test_kill_9_in_stage_2_then_the_rerun_resumes_stage_2(chain, demo_data, env, tmp_path):
  reference, _ = chain
  data, spm = demo_data
  model_dir = str(tmp_path / 'run')
  proc = subprocess.Popen(_chain_cmd(model_dir, data, spm), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(_stage_dir(model_dir, 2), 'checkpoints')
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if any(s.isdigit() for s in (os.listdir(ckpt) if os.path.isdir(ckpt) else [])):
        break
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  manager = checkpoints.checkpoint_manager(_stage_dir(model_dir, 2))
  killed_at = manager.latest_step()
  manager.close()
  assert killed_at is not None and killed_at < STEPS['distill'], (
      f'stage 2 was not killed midway (latest checkpoint {killed_at})')
  assert [s['name'] for s in _record(model_dir)['stages']] == ['contrastive']

  resumed = subprocess.run(_chain_cmd(model_dir, data, spm), cwd=REPO, env=env,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  log = resumed.stderr
  assert "stage 1/2 'contrastive' is trained" in log
  assert f'resuming from {_stage_dir(model_dir, 2)} at step {killed_at}' in log
  assert 'teacher scores of ' in log and 'reusing' in log
  assert [f for f in os.listdir(_stage_dir(model_dir, 1)) if f.startswith('config')] == [
      'config.gin']
  record, expected = _record(model_dir), _record(reference)
  assert [s['status'] for s in record['stages']] == ['complete', 'complete']
  # The same losses, step by step, as the uninterrupted chain: same teacher, same
  # starting point, same data after the resume. (Same executables on one machine: the
  # values agree to float32 rounding; any other data or parameters would differ by far more.)
  for i in (1, 2):
    got, want = metrics_by_step(_stage_dir(model_dir, i)), metrics_by_step(_stage_dir(reference, i))
    assert sorted(got) == sorted(want) == list(range(1, list(STEPS.values())[i - 1] + 1))
    np.testing.assert_allclose([got[s]['loss'] for s in sorted(got)],
                               [want[s]['loss'] for s in sorted(want)], rtol=1e-6)
  teacher = lambda d: _read_run(os.path.join(_stage_dir(d, 2), multistage.TEACHER_FILE))
  assert teacher(model_dir).keys() == teacher(reference).keys()
  for row, metrics in expected['stages'][1]['evaluation']['metrics'].items():
    assert record['stages'][1]['evaluation']['metrics'][row] == pytest.approx(metrics)


def test_teacher_scoring_resumes_after_an_interruption(chain, demo_data, tmp_path, monkeypatch,
                                                       caplog):
  model_dir, _ = chain
  data, _ = demo_data
  stage1 = _stage_dir(model_dir, 1)
  task = tasks.ListTask(list_size=4, max_rank=MAX_RANK)
  kwargs = dict(batch_size=BATCH_SIZE, train_steps=STEPS['distill'], seed=0)
  monkeypatch.setattr(multistage, 'TEACHER_CHUNK_PAIRS', 64)
  reference = str(tmp_path / 'reference.trec')
  multistage.with_previous_stage_teacher(task, f'beir:{data}:train', stage1, reference,
                                         **kwargs)
  real, calls = rerank_runs.make_score_fn, []

  def stopping(*args, **kw):
    fn = real(*args, **kw)

    def score(ids):
      if len(calls) == 6:
        raise KeyboardInterrupt('killed')
      calls.append(len(ids))
      return fn(ids)
    score.batch_multiple = fn.batch_multiple
    return score
  teacher = str(tmp_path / 'teacher.trec')
  monkeypatch.setattr(rerank_runs, 'make_score_fn', stopping)
  with pytest.raises(KeyboardInterrupt):
    multistage.with_previous_stage_teacher(task, f'beir:{data}:train', stage1, teacher,
                                           **kwargs)
  assert not os.path.exists(teacher)
  kept = [f for f in os.listdir(teacher + '.partial') if f.endswith('.json')]
  assert 'chunk-000000.json' in kept
  monkeypatch.setattr(rerank_runs, 'make_score_fn', real)
  with caplog.at_level('INFO'):
    taught = multistage.with_previous_stage_teacher(task, f'beir:{data}:train', stage1,
                                                    teacher, **kwargs)
  assert 'were scored before' in caplog.text
  assert taught.teacher == teacher and not os.path.exists(teacher + '.partial')
  assert open(teacher).read() == open(reference).read()


def test_a_chain_directory_stands_for_its_final_model(chain, tmp_path, caplog):
  model_dir, _ = chain
  with caplog.at_level('INFO'):
    model, _, step, _, _ = rerank_runs.load_reranker(model_dir)
  assert step == STEPS['distill'] and model.loss.__name__ == 'teacher_rank_pairwise_loss'
  assert f'{model_dir} is a chain of stages: using its final model' in caplog.text
  # A chain whose last stage is not complete names the stages that can be used.
  partial = tmp_path / 'partial'
  (partial / 'stages').mkdir(parents=True)
  os.symlink(_stage_dir(model_dir, 1), partial / 'stages' / '1-contrastive')
  record = _record(model_dir)
  record['stages'] = record['stages'][:1]
  record['final_model_dir'] = None
  (partial / multistage.RECORD).write_text(json.dumps(record))
  with pytest.raises(cli.UserError, match=r'is a chain of stages whose last stage is not '
                     r'complete .*give a stage directory: .*stages/1-contrastive$'):
    rerank_runs.load_reranker(str(partial))
  # eval.py run takes dual encoders: the chain's final reranker is named as such.
  from t5dual import evaluation
  with pytest.raises(cli.UserError, match=r'final holds a reranker model; eval.py run encodes'):
    evaluation.evaluate_checkpoint_on_beir(model_dir, '/nonexistent')
