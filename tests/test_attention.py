"""Attention kernels (t5dual/t5.py ATTENTION_FNS): the relative position bias, the padding and
causality reach every kernel apart, so cuDNN's fused attention can take them. Each kernel
against a float64 NumPy reference, and whole models across kernels.

cuDNN itself needs a GPU; on CPU its exact call (`seq_length_attention`: padding as key
lengths, the bias broadcast over the batch) runs through jax's XLA implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5dual import models, rerankers, t5
import tolerances  # tests/helpers

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
    'xla': t5.xla_attention,
    'jax_nn': t5.jax_nn_attention,
    'seq_lengths': functools.partial(t5.seq_length_attention, implementation='xla'),
    'cudnn': t5.cudnn_attention,  # float32 inputs: its XLA fallback
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
  assert t5.cudnn_shapes_ok(x(64), x(64), bias)
  assert not t5.cudnn_shapes_ok(x(64, jnp.float32), x(64, jnp.float32), bias)
  assert not t5.cudnn_shapes_ok(x(64, d=12), x(64, d=12), bias)    # head_dim % 8
  assert not t5.cudnn_shapes_ok(x(64, d=256), x(64, d=256), bias)  # head_dim > 128
  assert not t5.cudnn_shapes_ok(x(1), x(1), bias)                  # odd length with a bias
  assert t5.cudnn_shapes_ok(x(1), x(64), None)                     # cross-attention: no bias


@pytest.mark.parametrize('config,message', [
    (dict(attention='flash'), r"^T5Config.attention must be one of \['cudnn', 'jax_nn', 'xla'\]"),
    (dict(attention='cudnn', dtype='float32'),
     r"^T5Config.attention 'cudnn' needs dtype one of \('bfloat16', 'float16'\)"),
])
def test_unknown_or_unsupported_attention_is_named(config, message):
  with pytest.raises(ValueError, match=message):
    t5.t5_config('tiny', **config)


@pytest.fixture
def seq_lengths_attention(monkeypatch):
  """'seq_lengths': cuDNN's call with XLA underneath, selectable in T5Config."""
  monkeypatch.setitem(t5.ATTENTION_FNS, 'seq_lengths', KERNELS['seq_lengths'])
  return 'seq_lengths'


def _ids(seed, batch=5, length=12, vocab=50):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
  for row, n in enumerate([12, 9, 4, 1, 0][:batch]):
    ids[row, n:] = 0
  return ids


@pytest.mark.parametrize('attention', ['jax_nn', 'seq_lengths'])
def test_dual_encoder_embeddings_and_gradients_match_xla(seq_lengths_attention, attention):
  batch = {'inputs': _ids(0)[:4], 'targets': _ids(1)[:4]}
  ids = _ids(2)  # with an all-padding row
  out = []
  for name in ('xla', attention):
    model = models.DualEncoderModel(models.DualEncoderConfig(
        t5=t5.t5_config('tiny', vocab_size=50, dtype='float32', attention=name),
        projection_dim=12))
    params = model.init_params(jax.random.PRNGKey(0))
    loss, grads = jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
    out.append((np.asarray(model.encode(params, ids, 'left')), loss, grads))
  (emb, loss, grads), (emb2, loss2, grads2) = out
  assert np.isfinite(emb2).all()
  # Unit embeddings through 2 layers (4 residual blocks) and the head, over 12 tokens and the
  # 128-wide MLP; the all-padding row (index 4) has no tokens to pool and is only finite.
  tolerances.assert_close(emb2[:4], emb[:4], magnitude=1, depth=6, width=128, both_sides=True)
  tolerances.assert_close(loss2, loss, magnitude=1 / 0.01, depth=6, width=128, both_sides=True)
  jax.tree.map(lambda a, b: tolerances.assert_close(a, b, magnitude=np.abs(b).max(), depth=12,
                                                    width=128, both_sides=True), grads2, grads)


@pytest.mark.parametrize('attention', ['jax_nn', 'seq_lengths'])
def test_rankt5_encdec_scores_match_xla(seq_lengths_attention, attention):
  # The decoder's one step: causal self-attention with a bias, cross-attention with padding.
  ids = _ids(3)[:4].reshape(2, 2, 12)
  scores = []
  for name in ('xla', attention):
    model = rerankers.RerankerModel(rerankers.RerankerConfig(
        t5=t5.t5_config('tiny', vocab_size=50, dtype='float32', attention=name),
        scorer='encdec', scoring_token_id=7))
    params = model.init_params(jax.random.PRNGKey(1))
    scores.append(np.asarray(model.score(params, ids)))
  # Logits of the 50-token head (size < 10) after 2 encoder and 2 decoder layers.
  tolerances.assert_close(scores[1], scores[0], magnitude=10, depth=12, width=128,
                          both_sides=True)
