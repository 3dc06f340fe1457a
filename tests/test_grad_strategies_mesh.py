"""Gradient strategies on a sharded mesh (t5dual/gradients.py): GradCache gives the full-batch
gradient of a contrastive loss and microbatch accumulation that of a reranker's, and the
trainer's own GradCache step matches the reference. The settings that cannot work, named
before anything runs, are in test_grad_strategies.py.

The 8-device cases run in one subprocess (helpers/grad_strategies.py): JAX's device count
is fixed at start."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'helpers'))
import tolerances  # noqa: E402

# Every test reads the results of the module's 8-device subprocess.
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# helpers/grad_strategies.py: batch 16, 2 hard negatives each, 8-token queries, 12-token
# documents, a 1-layer T5 (2 residual blocks) 32 wide with a 64-wide MLP.
BATCH, DOC_TOKENS = 16, 3 * 12


@pytest.fixture(scope='module')
def results():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'helpers', 'grad_strategies.py')],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  line = next(ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


def _gradient_tolerance(r):
  # Two float32 programs (the chunks add the batch's contributions in another order): a
  # parameter's gradient sums over every token of the batch (BATCH x DOC_TOKENS terms for
  # the document tower), through the forward and backward of 2 blocks, head and loss.
  return tolerances.tolerance(r['grad_scale'], depth=2 * 4, width=BATCH * DOC_TOKENS,
                              both_sides=True)


# The contrastive loss: logits of unit vectors up to 1 / temperature = 100 through 2 blocks,
# head and loss, the widest reduction the 64-wide MLP.
LOSS_ERROR = dict(magnitude=100, depth=4, width=64, both_sides=True)


def test_grad_cache_equals_the_full_batch_on_a_sharded_mesh(results):
  r = results['grad_cache']
  tolerances.assert_close(r['loss'], r['ref_loss'], **LOSS_ERROR)
  assert max(r['grad_diffs']) <= _gradient_tolerance(r), r
  # Not vacuous: the gradients are far larger than the tolerance.
  assert r['grad_scale'] > 1e3 * _gradient_tolerance(r)


def test_the_trainers_grad_cache_step_matches_the_reference(results):
  r = results['grad_cache_step']
  assert r['bad_step'] == 0 and r['params_moved'] > 0
  assert set(r['metrics']) == set(r['ref_metrics'])
  for name, want in r['ref_metrics'].items():
    if name == 'grad_norm':  # the norm of all gradients: each within the gradient tolerance
      np.testing.assert_allclose(r['metrics'][name], want, rtol=1e-5)
    elif name == 'p_at_1' or name == 'mrr':  # ranks of the same similarities
      np.testing.assert_allclose(r['metrics'][name], want, rtol=1e-6)
    else:
      tolerances.assert_close(r['metrics'][name], want, **LOSS_ERROR, err_msg=name)


def test_grad_cache_with_dropout_is_the_gradient_of_its_chunks(results):
  # Each chunk keeps its own dropout key in both passes: the gradient is exactly that of the
  # loss of the embeddings the first pass computed.
  r = results['grad_cache_dropout']
  tolerances.assert_close(r['loss'], r['ref_loss'], **LOSS_ERROR)
  assert max(r['grad_diffs']) <= _gradient_tolerance(r), r
  # Dropout was on: without it the loss is another.
  assert abs(r['no_dropout_loss'] - r['loss']) > 100 * tolerances.tolerance(**LOSS_ERROR)


def test_accumulation_equals_the_full_batch_for_a_listwise_reranker(results):
  r = results['accumulate']
  # Softmax cross-entropy over 4 documents (size <= log 4 + the score range) averaged over
  # 16 lists; gradients sum over 16 lists x 4 documents x 10 tokens.
  tolerances.assert_close(r['loss'], r['ref_loss'], magnitude=10, depth=4, width=64,
                          both_sides=True)
  tol = tolerances.tolerance(r['grad_scale'], depth=2 * 4, width=BATCH * 4 * 10,
                             both_sides=True)
  assert max(r['grad_diffs']) <= tol, r
  for name, want in r['ref_metrics'].items():
    np.testing.assert_allclose(r['metrics'][name], want, rtol=1e-5, err_msg=name)
