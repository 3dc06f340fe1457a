"""A RankT5 reranker trained through the one trainer, reloaded by its kind, and used by
scripts/rerank.py: training must improve the ranking, and the reranked run must hold
exactly the model's scores."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5dual import checkpoints, evaluation, ranking_losses, rerank_runs, rerankers, retrieval, t5
from t5dual import train_lib, trainer
from t5dual.data import sources, tasks
from t5dual.vocab import Tokenizer
import tolerances  # tests/helpers
from trec_files import assert_in_score_order  # tests/helpers
import cli_output  # tests/helpers

# Every test reads the reranker its module fixture trains.
pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 40
CANDIDATES = 20


def _random_run(folder, split, seed):
  """Each judged query's relevant documents among random others, with random scores:
  a first stage that knows nothing, so any gain is the reranker's."""
  rng = np.random.default_rng(seed)
  doc_ids, _ = sources.read_beir_corpus(folder)
  run = {}
  for qid, judged in sources.read_qrels(folder, split).items():
    docs = set(judged) | set(rng.choice(doc_ids, CANDIDATES, replace=False).tolist())
    run[qid] = {d: float(rng.random()) for d in docs}
  return run


@pytest.fixture(scope='module')
def trained(tmp_path_factory, demo_beir):
  work = tmp_path_factory.mktemp('reranker')
  folder, vocab = demo_beir(300, 30, 400)
  train_run = str(work / 'train.trec')
  retrieval.write_trec_run(train_run, _random_run(folder, 'train', 0))
  test_run = str(work / 'test.trec')
  retrieval.write_trec_run(test_run, _random_run(folder, 'test', 1))
  config = rerankers.RerankerConfig(
      t5=t5.t5_config('tiny', vocab_size=400, dtype='float32', num_layers=2),
      scorer='encdec', scoring_token_id=100, input_length=LENGTH)
  model = rerankers.RerankerModel(config, ranking_losses.softmax_loss)
  task = tasks.ListTask(first_stage_run=train_run, list_size=8)
  model_dir = str(work / 'model')
  train_lib.run(model_dir, model, f'beir:{folder}:train', vocab, task=task, batch_size=8,
                task_feature_lengths={'inputs': LENGTH}, train_steps=120, learning_rate=1e-2,
                trainer_config=trainer.TrainerConfig(log_every=60, save_every=120,
                                                     progress_bar=False, tensorboard=False))
  return dict(folder=folder, vocab=vocab, model=model, task=task, model_dir=model_dir,
              test_run=test_run, work=work)


def test_training_improves_reranking_over_the_initial_model(trained):
  folder, model = trained['folder'], trained['model']
  qrels = evaluation.load_qrels(folder, 'test')
  queries = sources.read_beir_queries(folder)
  docs = dict(zip(*sources.read_beir_corpus(folder)))
  first = retrieval.read_trec_run(trained['test_run'])
  tok = Tokenizer(trained['vocab'])

  def ndcg(params):
    run = rerank_runs.rerank(rerank_runs.make_score_fn(model, params), tok, queries, docs, first,
                           CANDIDATES + 5, LENGTH, model.config.template, progress=False)
    return evaluation.evaluate(run, qrels, ['nDCG@10'])['nDCG@10']

  initial = ndcg(model.init_params(jax.random.PRNGKey(0)))
  restored = checkpoints.restore_for_inference(trained['model_dir'])
  assert restored.step == 120 and restored.feature_lengths == {'inputs': LENGTH}
  after = ndcg(restored.params)
  random_order = evaluation.evaluate(first, qrels, ['nDCG@10'])['nDCG@10']
  assert after > max(initial, random_order) + 0.1, (initial, random_order, after)


def test_reloads_by_kind(trained):
  model = checkpoints.restore_for_inference(trained['model_dir']).model
  assert isinstance(model, rerankers.RerankerModel)
  assert model.config == trained['model'].config
  assert model.loss is ranking_losses.softmax_loss
  # The lists it trained on are its task's, recorded beside it in model.json.
  assert tasks.from_description(checkpoints.read_model_json(trained['model_dir'])) == (
      trained['task'])


@pytest.mark.multiprocess
def test_rerank_cli_writes_the_models_own_scores(trained):
  out = str(trained['work'] / 'reranked.trec')
  proc = subprocess.run(
      [sys.executable, 'scripts/rerank.py', f'--model_dir={trained["model_dir"]}',
       f'--beir={trained["folder"]}', '--split=test', f'--run={trained["test_run"]}',
       '--top_k=10', f'--out={out}', '--batch_size=16', '--no_progress'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'reranked top-10' in proc.stdout
  # Each query in the reranker's order, ranks 1..k: the top 10 rescored, then the first
  # stage's other documents in its order (--tail=append, the default).
  written = assert_in_score_order(out)
  reranked = retrieval.read_trec_run(out)
  first = retrieval.read_trec_run(trained['test_run'])
  pairs = rerank_runs.top_k_pairs(first, 10)
  assert sorted((q, d) for q, docs in written.items() for d in docs[:10]) == sorted(pairs)
  assert all(docs[10:] == list(first[q])[10:] for q, docs in written.items())
  # The same pairs scored directly, one fixed-shape batch, no length buckets.
  restored = checkpoints.restore_for_inference(trained['model_dir'])
  queries = sources.read_beir_queries(trained['folder'])
  docs = dict(zip(*sources.read_beir_corpus(trained['folder'])))
  ids = rerankers.encode_pairs(restored.tokenizer, [queries[q] for q, _ in pairs],
                               [docs[d] for _, d in pairs], restored.model.config.template,
                               LENGTH)
  direct = np.asarray(jax.jit(restored.model.score)(restored.params, ids))
  got = np.array([reranked[q][d] for q, d in pairs])
  # Two float32 programs (bucketed widths vs full width): 2 encoder and 2 decoder layers
  # (4 + 6 stages) and the head, reductions up to the MLP width 128.
  tolerances.assert_close(got, direct, magnitude=float(np.abs(direct).max()), depth=11,
                          width=128, both_sides=True)


def test_rerank_cli_errors_are_one_line(trained, tmp_path):
  bad_run = tmp_path / 'bad.trec'
  bad_run.write_text('q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2\n')
  cases = [
      ([f'--model_dir={tmp_path / "nothing"}', f'--run={trained["test_run"]}'],
       'is not a t5dual model directory'),
      ([f'--model_dir={trained["model_dir"]}', f'--run={bad_run}'], f'{bad_run}:2:'),
  ]
  for args, expected in cases:
    proc = subprocess.run(
        [sys.executable, 'scripts/rerank.py', f'--beir={trained["folder"]}',
         f'--out={tmp_path / "out.trec"}', *args], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    lines = cli_output.error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error:'), proc.stderr
    assert expected in lines[0], lines[0]
  assert not (tmp_path / 'out.trec').exists()


def test_dual_encoder_commands_refuse_a_reranker_in_one_line(trained, tmp_path):
  """eval.py run and export.py encode with a dual encoder: a reranker directory is named as
  such, with the command that takes it, before anything is read or written."""
  cases = [
      ['scripts/eval.py', 'run', f'--model_dir={trained["model_dir"]}',
       f'--beir={trained["folder"]}', f'--out_dir={tmp_path / "eval"}'],
      ['scripts/export.py', f'--model_dir={trained["model_dir"]}', '--side=document',
       f'--beir={trained["folder"]}', f'--out_dir={tmp_path / "export"}'],
  ]
  for argv in cases:
    proc = subprocess.run([sys.executable] + argv, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    lines = cli_output.error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == (f'error: {trained["model_dir"]} holds a reranker model; '
                        f'{os.path.basename(argv[0])}{" run" if "eval" in argv[0] else ""} '
                        'encodes queries and documents with a dual encoder; rerank a '
                        f'first-stage run with it: scripts/rerank.py '
                        f'--model_dir={trained["model_dir"]}'), lines[0]
  assert sorted(os.listdir(tmp_path)) == []
  assert not os.path.exists(os.path.join(trained['model_dir'], 'eval'))



def test_a_model_directory_from_before_tasks_still_loads():
  # model.json written before data/tasks.py held the lists in a 'lists' entry of the
  # model: the model loads without it, and the entry reads back as the task.
  config = rerankers.RerankerConfig(t5=t5.t5_config('tiny', vocab_size=400),
                                    scoring_token_id=100)
  old = {**rerankers.RerankerModel(config).describe(), 'kind': 'reranker',
         'loss': 'kl_distillation_loss',
         'lists': {'first_stage_run': 'run.trec', 'list_size': 16, 'num_positives': 1,
                   'min_rank': 2, 'max_rank': 50, 'teacher': 'teacher.trec'}}
  model = checkpoints.model_from_description(old)
  assert model.config == config and model.loss is ranking_losses.kl_distillation_loss
  assert not hasattr(model, 'lists')
  assert tasks.from_description(old) == tasks.ListTask(
      first_stage_run='run.trec', list_size=16, min_rank=2, max_rank=50,
      teacher='teacher.trec')
