"""t5dual's T5 decoder and encoder-decoder against Hugging Face transformers (PyTorch CPU).

The reference runs in float64, so the differences measured are t5dual's own
float32 rounding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import flax.linen as nn  # noqa: E402

from hf_t5 import (VARIANTS, float32_tolerance, hf_logits, padded_ids, t5dual_config,  # noqa: E402
                   t5dual_params, tiny_hf)  # tests/helpers
from t5dual import t5  # noqa: E402
from t5dual.interop import trees  # noqa: E402


@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.slow
def test_decoder_logits_match_transformers_over_many_steps(variant):
  cfg, model = tiny_hf(variant)
  rng = np.random.default_rng(0)
  ids = padded_ids(rng, 4, 30, cfg.vocab_size)
  # Teacher forcing: start token, then arbitrary targets (25 steps > max_distance).
  decoder_ids = np.concatenate([np.zeros((4, 1), np.int64),
                                rng.integers(1, cfg.vocab_size, size=(4, 24))], axis=1)
  ref = hf_logits(model, ids, decoder_ids)

  config = t5dual_config(cfg)
  got = np.asarray(t5.EncoderDecoder(config).apply(
      {'params': t5dual_params(model)}, jnp.asarray(ids), jnp.asarray(decoder_ids)))
  assert got.shape == ref.shape == (4, 25, cfg.vocab_size)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=0, atol=float32_tolerance(ref))

  # HF in float32 is within the same bound: the bound is float32's, not t5dual's slack.
  with torch.no_grad():
    hf32 = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0),
                 decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
  np.testing.assert_allclose(hf32, ref, rtol=0, atol=float32_tolerance(ref))


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_selected_vocab_ids_are_columns_of_the_full_logits(variant):
  cfg, model = tiny_hf(variant, seed=1)
  ids = padded_ids(np.random.default_rng(1), 3, 12, cfg.vocab_size)
  decoder_ids = np.zeros((3, 2), np.int32)
  module, params = t5.EncoderDecoder(t5dual_config(cfg)), {'params': t5dual_params(model)}
  full = np.asarray(module.apply(params, ids, decoder_ids))
  picked = [cfg.vocab_size - 1, 5, 5]
  part = np.asarray(module.apply(params, ids, decoder_ids, vocab_ids=np.array(picked)))
  np.testing.assert_allclose(part, full[..., picked], rtol=0,
                             atol=float32_tolerance(full))


@pytest.mark.slow
def test_later_decoder_inputs_do_not_change_earlier_logits():
  cfg, model = tiny_hf('t5.1.1', seed=2)
  ids = padded_ids(np.random.default_rng(2), 2, 10, cfg.vocab_size)
  module, params = t5.EncoderDecoder(t5dual_config(cfg)), {'params': t5dual_params(model)}
  a = np.asarray(module.apply(params, ids, np.array([[0, 5, 6, 7], [0, 9, 0, 0]])))
  b = np.asarray(module.apply(params, ids, np.array([[0, 5, 11, 12], [0, 9, 3, 4]])))
  np.testing.assert_array_equal(a[:, :2], b[:, :2])
  assert np.abs(a[:, 2:] - b[:, 2:]).max() > 1e-3


@pytest.mark.slow
def test_attention_kernels_agree():
  cfg, model = tiny_hf('t5.1.1', seed=3)
  ids = padded_ids(np.random.default_rng(3), 3, 12, cfg.vocab_size)
  decoder_ids = np.array([[0, 4, 5], [0, 6, 7], [0, 1, 2]])
  params = {'params': t5dual_params(model)}
  xla = np.asarray(t5.EncoderDecoder(t5dual_config(cfg)).apply(params, ids, decoder_ids))
  jax_nn = np.asarray(t5.EncoderDecoder(t5dual_config(cfg, attention='jax_nn')).apply(
      params, ids, decoder_ids))
  np.testing.assert_allclose(jax_nn, xla, rtol=0, atol=float32_tolerance(xla))


@pytest.mark.slow
def test_remat_changes_nothing():
  cfg, model = tiny_hf('t5.1.1', seed=3)
  ids = padded_ids(np.random.default_rng(3), 2, 9, cfg.vocab_size)
  decoder_ids = np.array([[0, 4, 5], [0, 6, 7]])
  params = t5dual_params(model)

  def loss(p, remat):
    module = t5.EncoderDecoder(t5dual_config(cfg, remat=remat))
    return jnp.sum(module.apply({'params': p}, ids, decoder_ids) ** 2)
  plain = jax.grad(loss)(params, 'none')
  remat = jax.grad(loss)(params, 'full')
  # Same maths; XLA may fuse the recomputation differently, hence float32 rounding.
  for k, v in trees.flatten(plain).items():
    np.testing.assert_allclose(trees.flatten(remat)[k], v, rtol=0, atol=float32_tolerance(v),
                               err_msg=k)


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_parameter_tree_is_the_t5x_tree_of_the_hf_model(variant):
  cfg, model = tiny_hf(variant)
  shapes = jax.eval_shape(t5.EncoderDecoder(t5dual_config(cfg)).init, jax.random.PRNGKey(0),
                          jnp.ones((1, 5), jnp.int32), jnp.zeros((1, 1), jnp.int32))
  ours = {k: v.shape for k, v in trees.flatten(nn.unbox(shapes['params'])).items()}
  theirs = {k: v.shape for k, v in trees.flatten(t5dual_params(model)).items()}
  assert ours == theirs
  assert ('decoder/logits_dense/kernel' in ours) == (variant == 't5.1.1')


# T5X's logical axes, by the last two path components of a parameter.
EXPECTED_AXES = {
    'embedding': ('vocab', 'embed'),
    'rel_embedding': ('heads', 'relpos_buckets'),
    'scale': ('embed',),
    'query/kernel': ('embed', 'joined_kv'), 'key/kernel': ('embed', 'joined_kv'),
    'value/kernel': ('embed', 'joined_kv'), 'out/kernel': ('joined_kv', 'embed'),
    'wi/kernel': ('embed', 'mlp'), 'wi_0/kernel': ('embed', 'mlp'),
    'wi_1/kernel': ('embed', 'mlp'), 'wo/kernel': ('mlp', 'embed'),
    'logits_dense/kernel': ('embed', 'vocab'),
}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_every_parameter_has_t5x_logical_axes(variant):
  cfg, _ = tiny_hf(variant)
  boxed = jax.eval_shape(t5.EncoderDecoder(t5dual_config(cfg)).init, jax.random.PRNGKey(0),
                         jnp.ones((1, 5), jnp.int32), jnp.zeros((1, 1), jnp.int32))['params']
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  decoder_params = 0
  for path, leaf in leaves:
    name = '/'.join(p.key for p in path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f'{name} has no logical axes'
    key = next(k for k in EXPECTED_AXES if name.endswith('/' + k))
    assert tuple(leaf.names) == EXPECTED_AXES[key], name
    assert len(leaf.names) == leaf.value.ndim, name
    decoder_params += name.startswith('decoder/')
  # 3 layers x (3 norms + 8 attention kernels + MLP) + relpos + norm (+ logits_dense).
  mlp = 3 if variant == 't5.1.1' else 2
  assert decoder_params == 3 * (3 + 8 + mlp) + 2 + (variant == 't5.1.1')


def test_causal_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-300, 300)[None, :]
  for buckets, distance in ((32, 128), (8, 20)):
    ours = t5.relative_position_bucket(rel, buckets, distance, bidirectional=False)
    theirs = T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=False, num_buckets=buckets,
        max_distance=distance).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_config_round_trips_and_old_fields_still_load():
  config = t5.T5Config(num_layers=3, num_decoder_layers=5, logits_via_embedding=True)
  assert t5.T5Config(**dataclasses.asdict(config)) == config
  assert config.decoder_layers == 5
  # A model.json written before the decoder fields existed.
  old = {k: v for k, v in dataclasses.asdict(t5.T5Config(num_layers=4)).items()
         if k not in ('num_decoder_layers', 'logits_via_embedding')}
  restored = t5.T5Config(**old)
  assert restored.decoder_layers == 4 and not restored.logits_via_embedding
  with pytest.raises(ValueError, match='num_decoder_layers'):
    t5.T5Config(num_decoder_layers=0)
