"""Attention kernels (t5dual/attention.py ATTENTION_FNS): the relative position bias, the
padding and causality reach every kernel apart, so cuDNN's fused attention can take them.
Each kernel against a float64 NumPy reference; whole models across kernels are in
test_attention_xla_parity.py.

cuDNN itself needs a GPU; on CPU its exact call (`seq_length_attention`: padding as key
lengths, the bias broadcast over the batch) runs through jax's XLA implementation."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5dual import cli, dual_encoders, rerankers, t5
from t5dual import attention as attention_lib
import tolerances  # tests/helpers
import cli_output  # tests/helpers

B, L, H, D = 4, 10, 2, 8
LENGTHS = np.array([10, 7, 1, 0])  # full, padded, one token, all padding


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(B, L, H, D)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(1, H, L, L)).astype(np.float32)
  kv_mask = np.arange(L)[None, :] < LENGTHS[:, None]
  return q, k, v, bias, kv_mask


def numpy_attention(q, k, v, bias, kv_mask, causal):
  """float64 reference: softmax over the allowed keys of q.k + bias (no scaling, as T5)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k)
  if bias is not None:
    logits = logits + bias
  allowed = np.ones(logits.shape, bool)
  if kv_mask is not None:
    allowed &= kv_mask[:, None, None, :]
  if causal:
    allowed &= np.tril(np.ones((L, L), bool))[None, None]
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', weights, v)


KERNELS = {
    'xla': attention_lib.xla_attention,
    'jax_nn': attention_lib.jax_nn_attention,
    'seq_lengths': functools.partial(attention_lib.seq_length_attention, implementation='xla'),
    'cudnn': attention_lib.cudnn_attention,  # float32 inputs: its XLA fallback
}


@pytest.mark.parametrize('kernel', sorted(KERNELS))
@pytest.mark.parametrize('causal,with_bias,with_mask', [
    (False, True, True), (True, True, False), (True, True, True), (False, False, True)])
def test_kernels_match_numpy(kernel, causal, with_bias, with_mask):
  q, k, v, bias, kv_mask = _inputs()
  bias = bias if with_bias else None
  kv_mask = kv_mask if with_mask else None
  got = np.asarray(KERNELS[kernel](q, k, v, bias, kv_mask, causal))
  want = numpy_attention(q, k, v, bias, kv_mask, causal)
  assert np.isfinite(got).all()
  # Rows with a real key; a row with none (LENGTHS 0) is padding, only required finite.
  rows = LENGTHS > 0 if with_mask else np.ones(B, bool)
  # Logits of size <= |q||k| + |bias| (~ 3 sqrt(8) + 3) over 8 products, a softmax over 10
  # keys, a weighted sum of 10 values of size <= 4.
  tolerances.assert_close(got[rows], want[rows], magnitude=12, depth=3, width=10)


def test_kernel_gradients_agree():
  q, k, v, bias, kv_mask = _inputs(1)
  keep = jnp.asarray(LENGTHS > 0)[:, None, None, None]

  def loss(fn, q, k, v, bias):  # padding rows left out, as pooling leaves them out
    return jnp.sum(jnp.where(keep, fn(q, k, v, bias, kv_mask, False), 0.0) ** 2)
  grads = {name: jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3))(q, k, v, bias)
           for name, fn in KERNELS.items()}
  for name, g in grads.items():
    for got, want, what in zip(g, grads['xla'], 'qkvb'):
      tolerances.assert_close(got, want, magnitude=np.abs(want).max(), depth=6, width=10,
                              both_sides=True, err_msg=f'{name} d{what}')


def test_cudnn_takes_only_the_shapes_it_supports():
  x = lambda length, dtype=jnp.bfloat16, d=64: jnp.zeros((2, length, 4, d), dtype)
  bias = jnp.zeros((1, 4, 64, 64), jnp.bfloat16)
  cudnn_shapes_ok = attention_lib.cudnn_shapes_ok
  assert cudnn_shapes_ok(x(64), x(64), bias)
  assert not cudnn_shapes_ok(x(64, jnp.float32), x(64, jnp.float32), bias)
  assert not cudnn_shapes_ok(x(64, d=12), x(64, d=12), bias)    # head_dim % 8
  assert not cudnn_shapes_ok(x(64, d=256), x(64, d=256), bias)  # head_dim > 128
  assert not cudnn_shapes_ok(x(1), x(1), bias)                  # odd length, training
  assert not cudnn_shapes_ok(x(1), x(64), None)                 # ... with no bias too
  assert cudnn_shapes_ok(x(1), x(64), None, training=False)     # inference: any length
  assert cudnn_shapes_ok(x(1), x(1), bias, training=False)


# ----------------------------------------------------------------- cuDNN routing vs jax's checks

@pytest.fixture
def jax_cudnn_checks(monkeypatch):
  """jax's own cuDNN checks (fused_attention_stablehlo.check_is_flash_attention, reached
  through jax.nn.dot_product_attention(implementation='cudnn') under eval_shape, so with the
  arguments jax itself gives them) with only "is there a GPU" answered: cuDNN 9.8 on an Ampere
  (sm_80) or a Hopper (sm_90) GPU. Returns accepts(query, key, bias, kv_lengths, causal,
  training, capability) -> True or jax's message."""
  fused = pytest.importorskip('jax._src.cudnn.fused_attention_stablehlo')
  gpu = {'capability': (9, 0)}
  monkeypatch.setattr(fused, 'check_cudnn_version', lambda: 90800)
  monkeypatch.setattr(fused, 'check_compute_capability',
                      lambda c: gpu['capability'] >= tuple(map(int, c.split('.'))))
  monkeypatch.setattr(fused, 'is_cuda_compute_capability_equal',
                      lambda c: gpu['capability'] == tuple(map(int, c.split('.'))))

  def accepts(query, key, bias, kv_lengths, causal, training, capability=(9, 0)):
    gpu['capability'] = capability
    bias = None if bias is None else jax.ShapeDtypeStruct(bias.shape, query.dtype)
    lengths =  jax.ShapeDtypeStruct(query.shape[:1], jnp.int32) if kv_lengths else None

    def attend(q, k, v, b, n):
      out = jax.nn.dot_product_attention(q, k, v, bias=b, key_value_seq_lengths=n,
                                         is_causal=causal, scale=1.0, implementation='cudnn')
      return jnp.sum(out.astype(jnp.float32))
    fn = jax.grad(attend, argnums=(0, 1, 2)) if training else attend
    try:
      jax.eval_shape(fn, query, key, key, bias, lengths)
    except NotImplementedError as e:
      return str(e)
    return True
  return accepts


def _cudnn_calls(monkeypatch):
  """Every call the models make to the 'cudnn' kernel, as shapes (the call itself runs
  jax_nn_attention: there is no cuDNN here)."""
  calls = set()

  def record(q, k, v, bias=None, kv_mask=None, causal=False, training=True):
    spec = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
    calls.add((spec(q), spec(k), spec(bias), kv_mask is not None, causal, training))
    return attention_lib.jax_nn_attention(q, k, v, bias, kv_mask, causal)
  monkeypatch.setitem(attention_lib.ATTENTION_FNS, 'cudnn', record)
  return calls


def _trace_models(lengths):
  """Traces (eval_shape) what runs with attention='cudnn': the train steps (dropout key given,
  as the trainer does) and inference of a dual encoder and of every reranker scorer, at
  `lengths` (query, document / reranker input); head_dim 64 as every T5.1.1 size."""
  cfg = t5.t5_config('tiny', head_dim=64, dtype='bfloat16', attention='cudnn')
  rng = jax.random.PRNGKey(0)
  q_len, d_len = lengths
  dual = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=cfg, projection_dim=16))
  batch = {'inputs': jnp.ones((4, q_len), jnp.int32), 'targets': jnp.ones((4, d_len), jnp.int32),
           'query_ids': jnp.arange(4), 'doc_ids': jnp.arange(4)}
  traced = [(dual, batch)]
  for scorer in ('encdec', 'enc', 'yes_no'):
    reranker = rerankers.RerankerModel(
        rerankers.RerankerConfig(t5=cfg, scorer=scorer, input_length=d_len))
    traced.append((reranker, {'inputs': jnp.ones((2, 2, d_len), jnp.int32),
                              'labels': jnp.zeros((2, 2), jnp.float32),
                              'where': jnp.ones((2, 2), bool)}))
  for model, batch in traced:
    params = jax.eval_shape(model.init_params, rng)
    jax.eval_shape(jax.grad(lambda p: model.loss_fn(p, batch, rng)[0]), params)  # training
    if model is dual:
      jax.eval_shape(lambda p: model.encode(p, batch['targets'], 'right'), params)
    else:
      jax.eval_shape(model.score, params, batch['inputs'])


# The lengths of the benchmark (W1 64/256, W3 512), the defaults, and odd ones a user may set.
@pytest.mark.parametrize('lengths', [(64, 256), (64, 512), (33, 127)])
def test_cudnn_routing_agrees_with_jax_checks(monkeypatch, jax_cudnn_checks, lengths):
  calls = _cudnn_calls(monkeypatch)
  _trace_models(lengths)
  shapes = {(q.shape[1], k.shape[1], training) for q, k, *_, training in calls}
  # The reranker's one-step decoder is among them, in training and in inference.
  assert (1, lengths[1], True) in shapes and (1, lengths[1], False) in shapes, shapes
  assert (1, 1, True) in shapes, shapes
  for q, k, bias, has_mask, causal, training in sorted(calls, key=str):
    ours = attention_lib.cudnn_shapes_ok(q, k, bias, training)
    for capability in ((8, 0), (9, 0)):
      theirs = jax_cudnn_checks(q, k, bias, has_mask, causal, training, capability)
      assert ours == (theirs is True), (q.shape, k.shape, training, capability, theirs)


def test_cudnn_routing_is_never_wider_than_jax(jax_cudnn_checks):
  """Where t5dual sends a shape to cuDNN, jax accepts it, for any length and head dim."""
  for lq, lk, d, training in [(lq, lk, d, t) for lq in (1, 2, 7, 64) for lk in (1, 8, 9, 512)
                              for d in (12, 64, 128, 256) for t in (False, True)]:
    q = jax.ShapeDtypeStruct((2, lq, 4, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, lk, 4, d), jnp.bfloat16)
    if attention_lib.cudnn_shapes_ok(q, k, None, training):
      for capability in ((8, 0), (9, 0)):
        assert jax_cudnn_checks(q, k, None, True, False, training, capability) is True


def test_rankt5_encdec_train_step_traces_with_cudnn(monkeypatch, jax_cudnn_checks):
  """W3 (RankT5-EncDec, 512 tokens) with the real 'cudnn' kernel: jax's checks run on every
  attention of the train step (before: NotImplementedError, Q 1, KV 512)."""
  monkeypatch.setattr(attention_lib, 'cudnn_unavailable', lambda: None)  # a Hopper GPU, as far as jax asks
  cfg = t5.t5_config('tiny', head_dim=64, dtype='bfloat16', attention='cudnn')
  model = rerankers.RerankerModel(rerankers.RerankerConfig(t5=cfg, scorer='encdec',
                                                           input_length=512))
  batch = {'inputs': jnp.ones((2, 2, 512), jnp.int32), 'labels': jnp.zeros((2, 2), jnp.float32),
           'where': jnp.ones((2, 2), bool)}
  rng = jax.random.PRNGKey(0)
  params = jax.eval_shape(model.init_params, rng)
  grads = jax.eval_shape(jax.grad(lambda p: model.loss_fn(p, batch, rng)[0]), params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_cudnn_without_cudnn_is_one_line():
  """attention='cudnn' where JAX has no cuDNN (this CPU): a ConfigError naming the setting."""
  assert attention_lib.cudnn_unavailable() == "JAX's backend is 'cpu', not a CUDA GPU"
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=t5.t5_config('tiny', vocab_size=50, dtype='bfloat16', attention='cudnn'),
      projection_dim=12))
  with pytest.raises(cli.ConfigError) as raised:
    model.init_params(jax.random.PRNGKey(0))
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith("T5Config.attention 'cudnn' needs cuDNN, which this process lacks "
                            "(JAX's backend is 'cpu', not a CUDA GPU): set "
                            "t5.t5_config.attention = 'xla'"), message


@pytest.mark.parametrize('config,message', [
    (dict(attention='flash'), r"^T5Config.attention must be one of \['cudnn', 'jax_nn', 'xla'\]"),
    (dict(attention='cudnn', dtype='float32'),
     r"^T5Config.attention 'cudnn' needs dtype one of \('bfloat16', 'float16'\)"),
    # The fused kernel has no dropout: refused rather than silently running XLA in training.
    (dict(attention='cudnn', dropout_rate=0.1),
     r"^T5Config.attention 'cudnn' has no attention dropout, but dropout_rate is 0.1: set "
     r"DROPOUT_RATE = 0.0 \(t5.t5_config.dropout_rate\) or t5.t5_config.attention = 'xla'$"),
])
def test_unknown_or_unsupported_attention_is_named(config, message):
  with pytest.raises(ValueError, match=message):
    t5.t5_config('tiny', **config)


@pytest.mark.parametrize('bindings,message', [
    # The gin default DROPOUT_RATE (0.1) with cuDNN: refused, naming both keys.
    ([], "error: gin configuration of t5_config: T5Config.attention 'cudnn' has no attention "
         "dropout, but dropout_rate is 0.1: set DROPOUT_RATE = 0.0 "
         "(t5.t5_config.dropout_rate) or t5.t5_config.attention = 'xla'"),
    # Without dropout, on this machine without cuDNN: one line, before anything is written.
    (['--gin.DROPOUT_RATE=0.0'],
     "error: T5Config.attention 'cudnn' needs cuDNN, which this process lacks (JAX's backend "
     "is 'cpu', not a CUDA GPU): set t5.t5_config.attention = 'xla'"),
])
def test_train_script_refuses_cudnn_it_cannot_run(tmp_path, bindings, message):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  model_dir = tmp_path / 'model'
  result = subprocess.run(
      [sys.executable, os.path.join(repo, 'scripts', 'train.py'),
       '--gin_file=gin/models/sde.gin', '--gin_file=gin/sizes/tiny.gin',
       '--gin_file=configs/runs/finetune.gin', "--gin.t5.t5_config.attention='cudnn'",
       f"--gin.MODEL_DIR='{model_dir}'", f"--gin.MIXTURE_OR_TASK_NAME='jsonl:{tmp_path}/x'",
       f"--gin.VOCABULARY_PATH='{tmp_path}/spm.model'"] + bindings,
      cwd=repo, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': repo})
  assert result.returncode == 2, result.stderr[-3000:]
  lines = cli_output.error_lines(result.stderr)
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-3000:]
  assert not model_dir.exists()
