"""The ahead-of-time planner compiling train steps (t5dual/planning.py, scripts/plan.py): the
closed-form bytes against XLA's memory analysis, GradCache chunks, hard negatives, a reranker,
and a TPU topology. The arithmetic and the search, which compile nothing, are in test_plan.py."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from t5dual import dual_encoders, optim, partitioning, planning, rerankers
from t5dual.data import tasks
from plan_setup import TINY  # tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every test compiles train steps (10-25 s each on 2 cores).
pytestmark = pytest.mark.slow


def _one_device():
  return partitioning.Partitioner(devices=tuple(jax.devices()[:1]))


@pytest.mark.parametrize('remat,microbatches', [('none', 1), ('full', 1), ('none', 4)])
def test_closed_form_bytes_agree_with_the_compiled_memory_analysis(remat, microbatches):
  import dataclasses
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=dataclasses.replace(TINY, remat=remat), architecture='sde', projection_dim=16))
  plan = planning.plan_train_step(
      model, tasks.PairTask(), optim.adafactor(learning_rate=1e-3), _one_device(), 8,
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


def test_grad_cache_holds_one_chunks_activations():
  # Batch 32, 4 chunks of 8: XLA's temporaries shrink with the chunk (the closed form's
  # activations by 4x exactly), the arguments stay the same.
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=16))
  plans = [planning.plan_train_step(model, tasks.PairTask(), optim.adafactor(learning_rate=1e-3),
                                    _one_device(), 32, {'inputs': 16, 'targets': 32},
                                    grad_strategy=strategy, num_microbatches=m)
           for strategy, m in (('full', 1), ('grad_cache', 4))]
  full, cached = plans
  assert cached.activations * 4 == full.activations
  assert cached.compiled_arguments == full.compiled_arguments
  assert cached.compiled_temp < 0.5 * full.compiled_temp, (cached, full)
  assert cached.gradients == 'grad_cache x4' and full.gradients == 'full'


def test_hard_negatives_are_planned():
  # NUM_NEGATIVES=7 encodes 8 documents per query: the planned batch, activations and
  # FLOPs grow with them (and the compiled step sees the same batch).
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=16))
  lengths = {'inputs': 16, 'targets': 32}
  opt = optim.adafactor(learning_rate=1e-3)
  plain, hard = (planning.plan_train_step(model, tasks.PairTask(num_negatives=n), opt,
                                          _one_device(), 8, lengths) for n in (0, 7))
  per_token = lambda length: 2 * 2 * (4 * 16 * 16 + 3 * 16 * 32 + 2 * length * 16)
  assert hard.model_flops == 3 * 8 * (16 * per_token(16) + 8 * 32 * per_token(32))
  assert hard.batch_bytes == plain.batch_bytes + 4 * 8 * 7 * (32 + 1)
  assert hard.activations > 4 * plain.activations
  assert hard.compiled_arguments == hard.params + hard.opt_state + hard.batch_bytes + 8


def test_reranker_batch_and_bytes():
  model = rerankers.RerankerModel(rerankers.RerankerConfig(t5=TINY, scoring_token_id=5))
  task = tasks.ListTask(list_size=4)
  spec = task.batch_spec(2, {'inputs': 12})
  assert {k: v.shape for k, v in spec.items()} == {
      'inputs': (2, 4, 12), 'labels': (2, 4), 'where': (2, 4)}
  plan = planning.plan_train_step(model, task, optim.adafactor(learning_rate=1e-3),
                                  _one_device(), 2, {'inputs': 12})
  assert plan.compiled_arguments == plan.params + plan.opt_state + plan.batch_bytes + 8


def _plan(args, tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'TF_CPP_MIN_LOG_LEVEL': '3'}
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
      [sys.executable, str(REPO / 'scripts' / 'plan.py'), '--gin_file=gin/models/sde.gin',
       '--gin_file=gin/sizes/tiny.gin', '--gin_file=configs/runs/finetune.gin',
       f'--write={tmp_path / "plan.md"}'] + args,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


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
