"""Whole models across attention kernels (t5dual/attention.py ATTENTION_FNS): a dual encoder's
embeddings, loss and gradients and a RankT5 encoder-decoder's scores with 'jax_nn' and with
cuDNN's call (`seq_length_attention` run through XLA, as on CPU) against 'xla'. The kernels
one by one and cuDNN's routing are in test_attention.py."""

import functools

import jax
import numpy as np
import pytest

from t5dual import dual_encoders, rerankers, t5
from t5dual import attention as attention_lib
import tolerances  # tests/helpers

# Each test initialises, runs and differentiates whole tiny models with two kernels.
pytestmark = pytest.mark.slow


@pytest.fixture
def seq_lengths_attention(monkeypatch):
  """'seq_lengths': cuDNN's call with XLA underneath, selectable in T5Config."""
  monkeypatch.setitem(attention_lib.ATTENTION_FNS, 'seq_lengths', functools.partial(
      attention_lib.seq_length_attention, implementation='xla'))
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
    model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
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
