"""t5dual's T5 encoder against Hugging Face transformers (PyTorch CPU, float32)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from t5dual import t5
from t5dual.interop import hf
import tolerances  # tests/helpers


def _tiny_hf(feed_forward_proj, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
      vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      feed_forward_proj=feed_forward_proj, dropout_rate=0.0, layer_norm_epsilon=1e-6)
  model = transformers.T5EncoderModel(cfg).eval()
  # Random layer-norm scales so that a transposed or skipped norm cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.uniform_(0.5, 1.5)
  return cfg, model


def _ids(rng, batch, length, vocab):
  ids = rng.integers(2, vocab, size=(batch, length))
  lengths = rng.integers(1, length + 1, size=batch)
  lengths[0] = length
  ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
  return ids


@pytest.mark.parametrize('proj', ['gated-gelu', 'relu'])
def test_encoder_matches_transformers(proj):
  cfg, model = _tiny_hf(proj)
  # Length 150 > max_distance 128 exercises the log-spaced and clipped buckets.
  ids = _ids(np.random.default_rng(0), 4, 150, cfg.vocab_size)
  with torch.no_grad():  # float64 reference: only t5dual's float32 rounding counts
    ref = model.double()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0)
                         ).last_hidden_state.numpy()

  config = hf.t5_config_from_hf(cfg, dtype='float32')
  params = hf.encoder_from_hf({k: v.float().numpy() for k, v in model.state_dict().items()},
                              config)
  emb = t5.Embed(config.vocab_size, config.emb_dim, 'float32')
  x = emb.apply({'params': params['token_embedder']}, jnp.asarray(ids))
  out = t5.Encoder(config).apply({'params': params['encoder']}, x, jnp.asarray(ids != 0))
  out = np.asarray(out)
  # Padding positions included: HF computes them the same way.
  # Final RMS norm with scales <= 1.5 over 32 features; 3 layers of 2 residual blocks; the
  # longest reduction is attention over 150 tokens.
  tolerances.assert_close(out, ref, magnitude=1.5 * np.sqrt(32), depth=6, width=150)


def test_relative_position_bucket_matches_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-300, 300)[None, :]
  ours = t5.relative_position_bucket(rel, 32, 128)
  theirs = T5Attention._relative_position_bucket(
      torch.tensor(rel), bidirectional=True, num_buckets=32, max_distance=128).numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_hf_round_trip_keys_and_values():
  cfg, model = _tiny_hf('gated-gelu', seed=1)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  config = hf.t5_config_from_hf(cfg)
  back = hf.encoder_to_hf(hf.encoder_from_hf(state, config), config)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k])


def test_bfloat16_activations_close_to_float32():
  cfg, model = _tiny_hf('gated-gelu')
  ids = _ids(np.random.default_rng(1), 2, 40, cfg.vocab_size)
  outs = []
  for dtype in ('float32', 'bfloat16'):
    config = hf.t5_config_from_hf(cfg, dtype=dtype)
    params = hf.encoder_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, config)
    x = t5.Embed(config.vocab_size, config.emb_dim, dtype).apply(
        {'params': params['token_embedder']}, jnp.asarray(ids))
    outs.append(np.asarray(t5.Encoder(config).apply(
        {'params': params['encoder']}, x, jnp.asarray(ids != 0)), np.float32))
  mask = ids != 0
  rel = np.abs(outs[0] - outs[1])[mask].mean() / np.abs(outs[0])[mask].mean()
  # Relative error: each of the 6 residual blocks rounds its activations to bfloat16 (sums
  # accumulate in float32); float32's own error is negligible beside it.
  assert rel < tolerances.tolerance(1.0, depth=6, dtype=jnp.bfloat16)
