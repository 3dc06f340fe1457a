"""The ahead-of-time planner (t5dual/planning.py, scripts/plan.py)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5dual import models, optim, partitioning, planning, rerankers, t5

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = t5.T5Config(vocab_size=128, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                   num_layers=2, relative_attention_num_buckets=8, dtype='float32')


def _one_device():
  return partitioning.Partitioner(devices=tuple(jax.devices()[:1]))


@pytest.mark.slow
@pytest.mark.parametrize('remat,microbatches', [('none', 1), ('full', 1), ('none', 4)])
def test_closed_form_bytes_agree_with_the_compiled_memory_analysis(remat, microbatches):
  import dataclasses
  model = models.DualEncoderModel(models.DualEncoderConfig(
      t5=dataclasses.replace(TINY, remat=remat), architecture='sde', projection_dim=16))
  plan = planning.plan_train_step(
      model, optim.adafactor(learning_rate=1e-3), _one_device(), 8,
      {'inputs': 16, 'targets': 32}, grad_strategy='grad_cache' if microbatches > 1 else 'full',
      num_microbatches=microbatches)
  # The step's arguments are the parameters, the Adafactor state, the batch and two int32
  # scalars (bad_step, step): the closed form is exact there.
  assert plan.compiled_arguments == plan.params + plan.opt_state + plan.batch_bytes + 8
  assert plan.params == 4 * sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(model.init_params, jax.random.PRNGKey(0))))
  # Temporaries hold the gradients and the activations, which the closed form estimates
  # from below: it leaves out the loss's [B, B] similarity matrices, the embedding
  # gradient's scatter and XLA's fusion buffers. Stated tolerance: within 1x to 3x.
  estimate = plan.grads + plan.activations
  assert estimate <= plan.compiled_temp <= 3 * estimate, (plan.compiled_temp, estimate)
  assert plan.flops and plan.flops > 0
  assert planning.fits(plan, 1 << 30) and not planning.fits(plan, 1 << 10)


@pytest.mark.slow
def test_grad_cache_holds_one_chunks_activations():
  # Batch 32, 4 chunks of 8: XLA's temporaries shrink with the chunk (the closed form's
  # activations by 4x exactly), the arguments stay the same.
  model = models.DualEncoderModel(models.DualEncoderConfig(t5=TINY, projection_dim=16))
  plans = [planning.plan_train_step(model, optim.adafactor(learning_rate=1e-3), _one_device(),
                                    32, {'inputs': 16, 'targets': 32}, grad_strategy=strategy,
                                    num_microbatches=m)
           for strategy, m in (('full', 1), ('grad_cache', 4))]
  full, cached = plans
  assert cached.activations * 4 == full.activations
  assert cached.compiled_arguments == full.compiled_arguments
  assert cached.compiled_temp < 0.5 * full.compiled_temp, (cached, full)
  assert cached.gradients == 'grad_cache x4' and full.gradients == 'full'


def test_model_flops_count_every_matmul_of_the_encoders():
  # By hand for TINY (16 wide, 2 heads of 8, gated MLP 32, 2 layers): per token and layer
  # q, k, v, o 4 x 16 x 16 and wi_0, wi_1, wo 3 x 16 x 32 multiply-adds, plus QK^T and AV
  # 2 x L x 16; 2 FLOPs each; x3 for forward and backward.
  per_token = lambda length: 2 * 2 * (4 * 16 * 16 + 3 * 16 * 32 + 2 * length * 16)
  model = models.DualEncoderModel(models.DualEncoderConfig(t5=TINY, projection_dim=16))
  assert planning.train_model_flops(model, 8, {'inputs': 16, 'targets': 32}) == 3 * 8 * (
      16 * per_token(16) + 32 * per_token(32))
  reranker = rerankers.RerankerModel(rerankers.RerankerConfig(t5=TINY, scoring_token_id=5),
                                     lists=rerankers.ListsConfig(list_size=4))
  assert planning.train_model_flops(reranker, 2, {'inputs': 12}) == 3 * 2 * 4 * 12 * per_token(12)


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
  return [(f'{arch}, {n} negatives', models.DualEncoderModel(
      models.DualEncoderConfig(t5=TINY, architecture=arch, projection_dim=16)), n)
          for arch in ('sde', 'ade', 'ade_spl') for n in (0, 3)]


def _rerankers(run):
  return [(f'{scorer}{" with a teacher" if teacher else ""}', rerankers.RerankerModel(
      rerankers.RerankerConfig(t5=TINY, scorer=scorer, scoring_token_id=5, yes_token_id=5,
                               no_token_id=6),
      lists=rerankers.ListsConfig(list_size=4, max_rank=20, first_stage_run=run,
                                  teacher=run if teacher else None)), 0)
          for scorer in ('encdec', 'yes_no', 'enc') for teacher in (False, True)]


def test_the_planned_batch_is_the_batch_that_trains(demo_data):
  # Every kind: the planner's batch (the model's batch_spec) has the keys, shapes and
  # dtypes of a real batch of the model's own batcher, hard negatives and teacher
  # scores included; 3 data shards make up the global batch.
  cases = ([(name, model, n, demo_data['pairs'], {'inputs': 8, 'targets': 12})
            for name, model, n in _dual_encoders()] +
           [(name, model, n, f'beir:{demo_data["beir"]}:train', {'inputs': 16})
            for name, model, n in _rerankers(demo_data['run'])])
  for name, model, negatives, source, lengths in cases:
    batcher = model.make_batcher(source, demo_data['tokenizer'], 6, lengths,
                                 num_negatives=negatives)
    local = batcher.batch(1, shard_index=1, num_shards=3)
    real = {k: ((6,) + v.shape[1:], v.dtype) for k, v in local.items()}
    planned = planning.abstract_batch(model, 6, lengths, negatives)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in planned.items()} == real, name
  _, sde, _ = _dual_encoders()[1]
  with_negatives = planning.abstract_batch(sde, 6, {'inputs': 8, 'targets': 12}, 3)
  assert with_negatives['negative_targets'].shape == (6, 3, 12)


@pytest.mark.slow
def test_hard_negatives_are_planned():
  # NUM_NEGATIVES=7 encodes 8 documents per query: the planned batch, activations and
  # FLOPs grow with them (and the compiled step sees the same batch).
  model = models.DualEncoderModel(models.DualEncoderConfig(t5=TINY, projection_dim=16))
  lengths = {'inputs': 16, 'targets': 32}
  opt = optim.adafactor(learning_rate=1e-3)
  plain, hard = (planning.plan_train_step(model, opt, _one_device(), 8, lengths,
                                          num_negatives=n) for n in (0, 7))
  per_token = lambda length: 2 * 2 * (4 * 16 * 16 + 3 * 16 * 32 + 2 * length * 16)
  assert hard.model_flops == 3 * 8 * (16 * per_token(16) + 8 * 32 * per_token(32))
  assert hard.batch_bytes == plain.batch_bytes + 4 * 8 * 7 * (32 + 1)
  assert hard.activations > 4 * plain.activations
  assert hard.compiled_arguments == hard.params + hard.opt_state + hard.batch_bytes + 8


def test_reranker_batch_and_bytes():
  model = rerankers.RerankerModel(rerankers.RerankerConfig(t5=TINY, scoring_token_id=5),
                                  lists=rerankers.ListsConfig(list_size=4))
  spec = planning.abstract_batch(model, 2, {'inputs': 12})
  assert {k: v.shape for k, v in spec.items()} == {
      'inputs': (2, 4, 12), 'labels': (2, 4), 'where': (2, 4)}
  plan = planning.plan_train_step(model, optim.adafactor(learning_rate=1e-3), _one_device(),
                                  2, {'inputs': 12})
  assert plan.compiled_arguments == plan.params + plan.opt_state + plan.batch_bytes + 8


def test_wider_meshes_keep_the_devices_and_split_every_parameter():
  import dataclasses
  eight = partitioning.Partitioner(ici_mesh_shape=(8, 1), devices=tuple(range(8)))
  shapes = lambda ps: [p.mesh_shape for p in ps]
  two_heads = models.DualEncoderModel(models.DualEncoderConfig(t5=TINY, projection_dim=16))
  # 2 heads split over at most 2: (2, 4) and (1, 8) are skipped.
  assert shapes(planning.wider_meshes(eight, two_heads, 16)) == [(4, 2)]
  eight_heads = models.DualEncoderModel(models.DualEncoderConfig(
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


def _plan(args, tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'TF_CPP_MIN_LOG_LEVEL': '3'}
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
      [sys.executable, str(REPO / 'scripts' / 'plan.py'), '--gin_file=gin/models/sde.gin',
       '--gin_file=gin/sizes/tiny.gin', '--gin_file=configs/runs/finetune.gin',
       f'--write={tmp_path / "plan.md"}'] + args,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


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


@pytest.mark.tpu_backend
@pytest.mark.multiprocess
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason="libtpu not installed (pip install -e '.[tpu]')")
def test_tiny_model_compiles_for_a_tpu_topology(tmp_path):
  result = _plan(['--topology=v5e:2x2', '--batch=16',
                  '--gin.partitioning.Partitioner.num_partitions=2'], tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  table = (tmp_path / 'plan.md').read_text()
  assert 'v5e:2x2' in table and 'HBM per device: 16.00 GiB' in table
  row = next(line for line in table.splitlines() if line.startswith('| train |'))
  assert '| (2, 2) |' in row and '| yes |' in row, row
