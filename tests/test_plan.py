"""The ahead-of-time planner (t5dual/planning.py, scripts/plan.py) without compiling a step:
model FLOPs, planned batches, meshes, errors and the search. The compiled steps are in
test_plan_compile.py."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from t5dual import dual_encoders, partitioning, planning, rerankers
from t5dual.data import tasks
from plan_setup import TINY  # tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_model_flops_count_every_matmul_of_the_encoders():
  # By hand for TINY (16 wide, 2 heads of 8, gated MLP 32, 2 layers): per token and layer
  # q, k, v, o 4 x 16 x 16 and wi_0, wi_1, wo 3 x 16 x 32 multiply-adds, plus QK^T and AV
  # 2 x L x 16; 2 FLOPs each; x3 for forward and backward.
  per_token = lambda length: 2 * 2 * (4 * 16 * 16 + 3 * 16 * 32 + 2 * length * 16)
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=16))
  pairs = tasks.PairTask().batch_spec(8, {'inputs': 16, 'targets': 32})
  assert planning.train_model_flops(model, pairs) == 3 * 8 * (
      16 * per_token(16) + 32 * per_token(32))
  reranker = rerankers.RerankerModel(rerankers.RerankerConfig(t5=TINY, scoring_token_id=5))
  lists = tasks.ListTask(list_size=4).batch_spec(2, {'inputs': 12})
  assert planning.train_model_flops(reranker, lists) == 3 * 2 * 4 * 12 * per_token(12)


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory, demo_beir):
  """A demo BEIR folder with a BM25 run over its training split, a JSONL of pairs with hard
  negatives, and a tokenizer."""
  import json
  from t5dual import bm25, retrieval, vocab
  folder = tmp_path_factory.mktemp('plan_data')
  data, spm = demo_beir(60, 12, 100)
  run = str(folder / 'bm25.trec')
  retrieval.write_trec_run(run, bm25.beir_run(data, 'train', k=20))
  pairs = folder / 'pairs.jsonl'
  pairs.write_text(''.join(json.dumps({'query': f'q {i}', 'positive': f'p {i}',
                                       'negatives': [f'n {i} a', f'n {i} b']}) + '\n'
                           for i in range(12)))
  return {'beir': data, 'run': run, 'pairs': f'jsonl:{pairs}', 'tokenizer': vocab.Tokenizer(spm)}


def _dual_encoders():
  return [(f'{arch}, {n} negatives', dual_encoders.DualEncoderModel(
      dual_encoders.DualEncoderConfig(t5=TINY, architecture=arch, projection_dim=16)),
           tasks.PairTask(num_negatives=n))
          for arch in ('sde', 'ade', 'ade_spl') for n in (0, 3)]


def _rerankers(run):
  from t5dual import ranking_losses
  return [(f'{scorer}{" with a teacher" if teacher else ""}', rerankers.RerankerModel(
      rerankers.RerankerConfig(t5=TINY, scorer=scorer, scoring_token_id=5, yes_token_id=5,
                               no_token_id=6),
      ranking_losses.kl_distillation_loss if teacher else ranking_losses.softmax_loss),
           tasks.ListTask(list_size=4, max_rank=20, first_stage_run=run,
                          teacher=run if teacher else None))
          for scorer in ('encdec', 'yes_no', 'enc') for teacher in (False, True)]


def test_the_planned_batch_is_the_batch_that_trains(demo_data):
  # Every kind: the planner's batch (the task's batch_spec, which the trainer compiles
  # for) has the keys, shapes and dtypes of a real batch of the task's batcher, hard
  # negatives and teacher scores included, and the model takes it; 3 data shards make
  # up the global batch.
  from t5dual import model_api
  cases = ([(name, model, task, demo_data['pairs'], {'inputs': 8, 'targets': 12})
            for name, model, task in _dual_encoders()] +
           [(name, model, task, f'beir:{demo_data["beir"]}:train', {'inputs': 16})
            for name, model, task in _rerankers(demo_data['run'])])
  for name, model, task, source, lengths in cases:
    batcher = task.make_batcher(source, demo_data['tokenizer'], 6, lengths,
                                template=getattr(model, 'template', None))
    local = batcher.batch(1, shard_index=1, num_shards=3)
    real = {k: ((6,) + v.shape[1:], v.dtype) for k, v in local.items()}
    planned = task.batch_spec(6, lengths)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in planned.items()} == real, name
    assert batcher.batch_spec() == planned, name  # what trainer.train is given by tests
    model_api.check_batch_spec(model, planned)
  _, sde, task = _dual_encoders()[1]
  with_negatives = task.batch_spec(6, {'inputs': 8, 'targets': 12})
  assert with_negatives['negative_targets'].shape == (6, 3, 12)


@pytest.mark.slow
def test_wider_meshes_keep_the_devices_and_split_every_parameter():
  import dataclasses
  eight = partitioning.Partitioner(ici_mesh_shape=(8, 1), devices=tuple(range(8)))
  shapes = lambda ps: [p.mesh_shape for p in ps]
  two_heads = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=16))
  # 2 heads split over at most 2: (2, 4) and (1, 8) are skipped.
  assert shapes(planning.wider_meshes(eight, two_heads, 16)) == [(4, 2)]
  eight_heads = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=dataclasses.replace(TINY, num_heads=8), projection_dim=16))
  assert shapes(planning.wider_meshes(eight, eight_heads, 16)) == [(4, 2), (2, 4)]
  assert shapes(planning.wider_meshes(eight, eight_heads, 16, limit=3)) == [
      (4, 2), (2, 4), (1, 8)]
  # The data axis must still divide the batch: 6 splits over 2 and 1, not over 4.
  assert shapes(planning.wider_meshes(eight, eight_heads, 6, limit=3)) == [(2, 4), (1, 8)]


def test_batch_sizes_to_try_split_over_data():
  assert planning.smaller_batches(512, 64) == [256, 128, 64]
  assert planning.smaller_batches(48, 16) == []


def test_unknown_topology_is_one_line():
  with pytest.raises(planning.PlanError, match='expected GEN:AxBxC'):
    planning.target_devices('v9:2x2')
  with pytest.raises(planning.PlanError, match='xla_force_host_platform_device_count=512'):
    planning.target_devices('cpu:512')


def test_without_the_run_file_is_one_line_and_help_names_gin_file(tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'TF_CPP_MIN_LOG_LEVEL': '3'}
  result = subprocess.run(
      [sys.executable, str(REPO / 'scripts' / 'plan.py'), '--gin_file=gin/models/sde.gin',
       '--gin_file=gin/sizes/tiny.gin', '--topology=cpu:1'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'configs/runs/finetune.gin' in lines[0], result.stderr
  usage = subprocess.run([sys.executable, str(REPO / 'scripts' / 'plan.py'), '--help'],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert usage.returncode == 0 and '--gin_file=FILE' in usage.stdout, usage.stdout


# --------------------------------------------------------------------------- the search

def _search(fits_when, hbm=100, batch=16, **kwargs):
  """planning.search over 8 abstract devices with fake memory figures: a candidate needs
  50 bytes if fits_when(candidate) is True, 200 if False; a string is a compile error."""
  import dataclasses
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=dataclasses.replace(TINY, num_heads=8, remat='none'), projection_dim=16))
  eight = partitioning.Partitioner(ici_mesh_shape=(8, 1), devices=tuple(range(8)))

  def plan(c):
    verdict = fits_when(c)
    if isinstance(verdict, str):
      return planning.StepPlan('train', c.batch_size, error=verdict)
    return planning.StepPlan('train', c.batch_size, activations=50 if verdict else 200)
  end, tried = planning.search(planning.Candidate(model, eight, batch), plan, hbm, **kwargs)
  settings = lambda c: (c.model.config.t5.remat, c.partitioner.mesh_shape, c.batch_size,
                        c.grad_strategy, c.num_microbatches)
  if end is not tried[-1][0]:  # the search stepped back from its last try
    return [settings(c) for c, _ in tried] + ['back to', settings(end)]
  return [settings(c) for c, _ in tried]


def test_the_search_stops_at_the_first_step_that_fits():
  assert _search(lambda c: True) == [('none', (8, 1), 16, 'full', 1)]
  assert _search(lambda c: c.model.config.t5.remat == 'full') == [
      ('none', (8, 1), 16, 'full', 1), ('full', (8, 1), 16, 'full', 1)]
  # Without an HBM limit nothing is known not to fit: nothing else is tried.
  assert _search(lambda c: False, hbm=None) == [('none', (8, 1), 16, 'full', 1)]


def test_the_search_goes_from_cheapest_to_smaller_batches():
  assert _search(lambda c: False, chunked_strategy='accumulate') == [
      ('none', (8, 1), 16, 'full', 1), ('full', (8, 1), 16, 'full', 1),
      # wider model-parallel meshes on the same 8 devices (max_meshes 2)
      ('full', (4, 2), 16, 'full', 1), ('full', (2, 4), 16, 'full', 1),
      # more microbatches of the 8 rows per device, the same gradient
      ('full', (2, 4), 16, 'accumulate', 2), ('full', (2, 4), 16, 'accumulate', 4),
      ('full', (2, 4), 16, 'accumulate', 8),
      # halved batches, with as many microbatches as each still splits into
      ('full', (2, 4), 8, 'accumulate', 4), ('full', (2, 4), 4, 'accumulate', 2),
      ('full', (2, 4), 2, 'full', 1)]
  # Microbatches with GradCache for contrastive models; the first that fits ends it.
  tried = _search(lambda c: c.num_microbatches == 4)
  assert tried[-2:] == [('full', (2, 4), 16, 'grad_cache', 2),
                        ('full', (2, 4), 16, 'grad_cache', 4)]


def test_a_mesh_that_does_not_compile_for_another_reason_is_left():
  # The (4, 2) mesh fails to compile (not for memory): the search goes on from (8, 1), 2
  # rows per device; running out of memory is a finding that keeps the mesh.
  def verdict(c):
    if c.partitioner.mesh_shape == (4, 2):
      return 'INTERNAL: no such collective'
    return False
  assert _search(verdict, max_meshes=1) == [
      ('none', (8, 1), 16, 'full', 1), ('full', (8, 1), 16, 'full', 1),
      ('full', (4, 2), 16, 'full', 1), ('full', (8, 1), 16, 'grad_cache', 2),
      ('full', (8, 1), 8, 'full', 1)]
  # Nothing left to try after the failed mesh (one row per device): the search ends back
  # on (8, 1), where the encode step is then planned.
  assert _search(verdict, max_meshes=1, batch=8) == [
      ('none', (8, 1), 8, 'full', 1), ('full', (8, 1), 8, 'full', 1),
      ('full', (4, 2), 8, 'full', 1), 'back to', ('full', (8, 1), 8, 'full', 1)]
  oom = _search(lambda c: 'RESOURCE_EXHAUSTED: out of memory' if c.num_microbatches == 1
                else True, max_meshes=1)
  assert oom[-2:] == [('full', (4, 2), 16, 'full', 1), ('full', (4, 2), 16, 'grad_cache', 2)]
