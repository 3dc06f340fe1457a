"""Multi-stage fine-tuning (t5dual/multistage.py, configs/runs/two_stage_rerank.gin) without
running a chain: the gin checks of stage scopes, a record that names other stages, and the
queries a stage's teacher scores. The chains that run are in test_multistage_chain.py."""

import json

import gin
import pytest

from t5dual import cli, gin_utils, multistage
from t5dual.data import lists as lists_lib
from t5dual.data import tasks
from rerank_chain import CHAIN_FILES, DEMO_DATA, MAX_RANK  # tests/helpers
import rerank_chain  # tests/helpers


@pytest.fixture(scope='module')
def demo_data(demo_beir):
  return demo_beir(*DEMO_DATA)


# --------------------------------------------------------------------------- gin and checks

@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _parse(model_dir, *extra, files=CHAIN_FILES):
  bindings = rerank_chain.bindings(model_dir, '/nonexistent', '/nonexistent.model')
  gin_utils.parse_gin(files, bindings + list(extra))
  return list(extra)


def test_stage_scoped_bindings_that_take_effect_pass(clean_gin, tmp_path):
  bindings = _parse(tmp_path, 'distill/tasks.ListTask.list_size = 6',
                    'distill/train_lib.run.batch_size = 8', 'CONTRASTIVE_STEPS = 3',
                    'contrastive/trainer.TrainerConfig.save_every = 3')
  gin_utils.check_bindings_used(bindings, multistage.run_chain)


@pytest.mark.parametrize('binding,message', [
    # A misspelt stage scope.
    ('distil/train_lib.run.learning_rate = 1e-3',
     r'uses distil/train_lib.run \(did you mean distill/train_lib.run or '),
    # Both stages set their own: the unscoped binding and its macro would change nothing.
    ('train_lib.run.learning_rate = 0.1',
     r'uses train_lib.run.learning_rate \(overridden by contrastive/train_lib.run.'
     r'learning_rate, distill/train_lib.run.learning_rate\)'),
    ('TRAIN_STEPS = 5', r'nothing .* uses TRAIN_STEPS'),
    # gin macros are not scoped.
    ('distill/LOSS_FN = @ranking_losses.lce_loss',
     r'uses distill/LOSS_FN .*bind the scoped configurable instead'),
])
def test_stage_scoped_bindings_that_change_nothing_are_refused(clean_gin, tmp_path, binding,
                                                               message):
  bindings = _parse(tmp_path, binding)
  with pytest.raises(cli.ConfigError, match=message):
    gin_utils.check_bindings_used(bindings, multistage.run_chain)


def test_a_scoped_binding_in_a_file_that_no_stage_sees_is_refused(clean_gin, tmp_path):
  # Building the model from the %MODEL macro would put it outside every stage's scope,
  # so the stages' own losses would silently not apply.
  extra = tmp_path / 'macro_model.gin'
  extra.write_text('from __gin__ import dynamic_registration\n'
                   'from t5dual import train_lib\n'
                   'train_lib.run.model = %MODEL\n')
  _parse(tmp_path, files=CHAIN_FILES + [str(extra)])
  with pytest.raises(cli.ConfigError, match=r'`contrastive/rerankers.RerankerModel.loss_fn`'):
    gin_utils.check_bindings_used([], multistage.run_chain)


def test_the_reverse_chain_distils_from_a_teacher_file_first(clean_gin, tmp_path):
  files = CHAIN_FILES[:-1] + ['configs/runs/two_stage_rerank_reverse.gin']
  _parse(tmp_path, files=files)
  with pytest.raises(cli.ConfigError, match=r'^TEACHER must be set'):
    gin_utils.check_bindings_used([], multistage.run_chain)
  gin.clear_config()
  _parse(tmp_path, "TEACHER = '/data/teacher.trec'", files=files)
  gin_utils.check_bindings_used([], multistage.run_chain)
  stages = gin.query_parameter('multistage.run_chain.stages')
  assert [s.scopes for s in stages] == [['distill'], ['contrastive']]


@pytest.mark.parametrize('binding,message', [
    ('DISTILL_LEARNING_RATE = -1.0',
     r'^DISTILL_LEARNING_RATE \(distill/train_lib.run.learning_rate\): must be a positive'),
    ('distill/rerankers.RerankerModel.loss_fn = @ranking_losses.softmax_loss',
     r"stage 2 'distill' learns from the previous stage, but its loss softmax_loss does not "
     r'use teacher scores'),
    ('contrastive/multistage.Stage.previous_stage_teacher = True',
     r"stage 1 'contrastive' sets previous_stage_teacher, but has no previous stage"),
    # Found when gin builds the stage's model, before BM25 or MODEL_DIR (no writer.lock).
    ('LIST_SIZE = 1', r'^LIST_SIZE \(data.tasks.ListTask.list_size\): must be in \[2, 100\]'),
    ('MIN_RANK = 9', r'^MAX_RANK \(data.tasks.ListTask.max_rank\): must be >= min_rank 9'),
    ('contrastive/tasks.ListTask.teacher = "/data/t.trec"',
     r"^contrastive/data.tasks.ListTask.teacher: is '/data/t.trec', but the loss lce_loss "
     r'does not use teacher scores'),
])
def test_a_bad_stage_stops_the_chain_before_any_stage_trains(clean_gin, tmp_path, binding,
                                                             message):
  model_dir = tmp_path / 'run'
  _parse(model_dir, binding)
  with pytest.raises(cli.ConfigError, match=message):
    gin_utils.call_configured(multistage.run_chain, run_config=gin_utils.operative_config)
  assert not (model_dir / 'stages').exists()
  assert not model_dir.exists()  # nothing written, no writer.lock left behind


def test_stages_cannot_change_once_recorded(tmp_path):
  def never(**kwargs):
    raise AssertionError('nothing may train')
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  (model_dir / multistage.RECORD).write_text(json.dumps({'final_model_dir': None, 'stages': [
      {'index': 1, 'name': 'contrastive', 'dir': 'stages/1-contrastive', 'status': 'complete',
       'step': 5}]}))
  stages = [multistage.Stage('distill', never), multistage.Stage('contrastive', never)]
  with pytest.raises(cli.ConfigError, match=r"records stage 1 as 'contrastive' but the "
                     r"configuration names it 'distill'"):
    multistage.run_chain(str(model_dir), stages)
  with pytest.raises(cli.ConfigError, match=r'stage names must differ; repeated: a'):
    multistage.run_chain(str(model_dir), [multistage.Stage('a', never)] * 2)
  with pytest.raises(cli.ConfigError, match=r'multistage.Stage.name: must be letters'):
    multistage.Stage('', never)


# --------------------------------------------------------------------------- teacher

def test_the_teacher_scores_only_the_queries_the_stage_visits(demo_data):
  data, _ = demo_data
  lists = tasks.ListTask(list_size=4, max_rank=MAX_RANK)
  everything, kept, total = multistage.training_candidates(data, 'train', lists)
  assert kept == total == len(everything)
  some, kept, total = multistage.training_candidates(data, 'train', lists, batch_size=4,
                                                     train_steps=5, seed=3)
  assert kept == len(some) == 20 < total
  plain = lists_lib.load_lists(data, 'train', _bm25(data), max_rank=MAX_RANK)
  batcher = lists_lib.ListBatcher(plain, None, 4, list_size=4, seed=3)
  visited = {plain.query_ids[i] for s in range(5) for i in batcher.list_indices(s)}
  assert set(some) == visited
  for qid, docs in some.items():  # positives, then the window's negatives
    i = plain.query_ids.index(qid)
    assert docs == [plain.doc_ids[r] for r, _ in plain.positives[i]] + [
        plain.doc_ids[r] for r in plain.negatives[i]]
  # As many steps as lists, or more: every query.
  assert multistage.training_candidates(data, 'train', lists, batch_size=4,
                                        train_steps=total)[1] == total


def _bm25(data):
  from t5dual import bm25
  return bm25.beir_run(data, 'train', k=MAX_RANK)




def test_a_taught_stage_from_a_store_is_one_line(tmp_path):
  """Teacher scoring reads the candidates' texts, which a store does not keep."""
  from t5dual.data import sources
  with pytest.raises(sources.DataError, match=r"^store:/nowhere: a stage taught by the "
                     r"previous one scores .*not a prepared store$") as e:
    multistage.with_previous_stage_teacher(tasks.ListTask(), 'store:/nowhere',
                                           str(tmp_path / 'stage1'),
                                           str(tmp_path / 'teacher.trec'))
  assert '\n' not in str(e.value)
