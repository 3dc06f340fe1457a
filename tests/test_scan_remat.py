"""Named remat policies and scanned layers change memory, not maths.

Each policy's loss and gradients are compared with no rematerialisation, and
scanned stacks with the unrolled T5X layout (parameters converted by
`layer_layout`), on an encoder-decoder, an SDE dual encoder and an
encoder-decoder reranker. The float32 bound is `float32_tolerance`: the same
float32 maths in another order.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5dual import dual_encoders, layer_layout, rerankers, t5
from t5dual.interop import trees
import tolerances  # tests/helpers


def float32_tolerance(ref):
  """Two float32 programs of the same maths in another order (rematerialised, scanned):
  tolerances.py's rule with both sides rounding, for the small models here (at most
  3 + 3 layers: 14 stages forward, doubled for gradients; reductions up to 64 wide)."""
  return tolerances.tolerance(float(np.abs(ref).max()), depth=28, width=64, both_sides=True)
from tree_utils import random_params  # tests/helpers

VOCAB = 50


def _config(**overrides):
  return t5.t5_config('tiny', vocab_size=VOCAB, dtype='float32', **overrides)


def _ids(seed, batch, length):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, VOCAB, size=(batch, length)).astype(np.int32)
  ids[1, length // 2:] = t5.PAD_ID
  return ids


IDS = _ids(0, 3, 11)
DECODER_IDS = np.concatenate([np.zeros((3, 1), np.int32), _ids(1, 3, 4)[:, 1:]], axis=1)


def _encdec_loss_and_grads(config, params):
  module = t5.EncoderDecoder(config)
  loss = lambda p: jnp.sum(module.apply({'params': p}, IDS, DECODER_IDS) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close(got, want):
  """Loss and gradient trees equal within float32 rounding, leaf by leaf."""
  got_flat, want_flat = trees.flatten(got), trees.flatten(want)
  assert set(got_flat) == set(want_flat)
  for name, ref in want_flat.items():
    np.testing.assert_allclose(got_flat[name], ref, rtol=0, atol=float32_tolerance(ref),
                               err_msg=name)


@pytest.fixture(scope='module')
def encdec_reference():
  """(params, (loss, grads)) of a 1+1-layer encoder-decoder without remat."""
  config = _config(num_layers=1)
  params = nn.unbox(jax.jit(t5.EncoderDecoder(config).init)(jax.random.PRNGKey(0), IDS,
                                                            DECODER_IDS)['params'])
  return params, _encdec_loss_and_grads(config, params)


def test_unknown_remat_policy_names_the_field_and_the_choices():
  with pytest.raises(ValueError, match=r"T5Config.remat must be one of \[.*'dots'.*\], got "
                                       r"'everything'"):
    _config(remat='everything')


@pytest.mark.parametrize('policy', [  # the first pays the reference's compile: 16 s recorded
    pytest.param(p, marks=pytest.mark.slow) if p == 'full' else p
    for p in t5.REMAT_POLICIES if p != 'none'])
def test_every_remat_policy_keeps_loss_and_gradients(policy, encdec_reference):
  params, (loss, grads) = encdec_reference
  got_loss, got_grads = _encdec_loss_and_grads(_config(num_layers=1, remat=policy), params)
  # The gradients reach the encoder through the decoder's cross-attention.
  assert np.abs(grads['encoder']['layers_0']['mlp']['wo']['kernel']).max() > 0
  _assert_close({'loss': got_loss, 'grads': got_grads}, {'loss': loss, 'grads': grads})


@pytest.mark.parametrize('policy, names', [
    ('full', set()),
    ('save_qkv_proj', {t5.QUERY_PROJ, t5.KEY_PROJ, t5.VALUE_PROJ}),
    ('save_attention_out', {t5.ATTENTION_OUT}),
    ('save_mlp_hidden', {t5.MLP_HIDDEN}),
    ('save_projections', {t5.QUERY_PROJ, t5.KEY_PROJ, t5.VALUE_PROJ, t5.ATTENTION_OUT,
                          t5.MLP_HIDDEN}),
])
def test_named_policies_keep_exactly_their_tagged_values(policy, names, encdec_reference,
                                                        capsys):
  params, _ = encdec_reference
  module = t5.EncoderDecoder(_config(num_layers=1, remat=policy))
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      lambda p: jnp.sum(module.apply({'params': p}, IDS, DECODER_IDS)), params)
  saved = re.findall(r"named '(\w+)'", capsys.readouterr().out)
  assert set(saved) == names
  # Each tag once per use: attention in the encoder layer and (self + cross) in the
  # decoder layer, the MLP in both.
  uses = {t5.QUERY_PROJ: 3, t5.KEY_PROJ: 3, t5.VALUE_PROJ: 3, t5.ATTENTION_OUT: 3,
          t5.MLP_HIDDEN: 2}
  assert len(saved) == sum(uses[n] for n in names)


def _sde(config):
  return dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=config, projection_dim=12))


@pytest.mark.slow
def test_scanned_sde_dual_encoder_equals_unrolled():
  # Scanned with a named policy rematerialised inside the scan; unrolled without remat.
  unrolled = _sde(_config())
  scanned = _sde(_config(remat='save_attention_out', scan_layers=True))
  params = random_params(unrolled.config)
  batch = {'inputs': _ids(2, 4, 9), 'targets': _ids(3, 4, 13)}
  step = lambda model: jax.jit(jax.value_and_grad(
      lambda p: model.loss_fn(p, batch, None)[0]))
  loss, grads = step(unrolled)(params)
  scanned_loss, scanned_grads = step(scanned)(layer_layout.unrolled_to_scan(params))
  assert 'layers' in scanned_grads['encoder'] and 'layers_0' not in scanned_grads['encoder']
  _assert_close({'loss': scanned_loss, 'grads': layer_layout.scan_to_unrolled(scanned_grads)},
                {'loss': loss, 'grads': grads})
  # Dropout inside the scanned, rematerialised layers: a different, finite loss.
  dropped = _sde(_config(remat='save_attention_out', scan_layers=True, dropout_rate=0.3))
  noisy = jax.jit(lambda p, rng: dropped.loss_fn(p, batch, rng)[0])(
      layer_layout.unrolled_to_scan(params), jax.random.PRNGKey(1))
  assert np.isfinite(noisy) and abs(float(noisy) - float(loss)) > 1e-4


@pytest.mark.slow
def test_scanned_encdec_reranker_equals_unrolled():
  config = rerankers.RerankerConfig(t5=_config(num_decoder_layers=3), scorer='encdec',
                                    scoring_token_id=7)
  scanned_config = dataclasses.replace(
      config, t5=dataclasses.replace(config.t5, scan_layers=True, remat='full'))
  params = rerankers.init_params(config, jax.random.PRNGKey(3))
  ids = _ids(4, 6, 10).reshape(2, 3, 10)

  def scores_loss_and_grads(cfg, p):
    module = rerankers.scorer_module(cfg)
    scores = lambda p: module.apply({'params': p}, ids)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(scores(p) ** 2)))(p)
    return {'scores': jax.jit(scores)(p), 'loss': loss, 'grads': grads}

  want = scores_loss_and_grads(config, params)
  got = scores_loss_and_grads(scanned_config, layer_layout.unrolled_to_scan(params))
  assert got['grads']['decoder']['layers']['mlp']['wo']['kernel'].shape[0] == 3
  got['grads'] = layer_layout.scan_to_unrolled(got['grads'])
  _assert_close(got, want)


def _abstract_and_axes(model_fn, config):
  """(shapes, logical axes) of the parameters of `model_fn(config)`, flattened."""
  model = model_fn(config)
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  return shapes, trees.flatten(model.logical_axes())


MODELS = {
    'ade': lambda c: dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
        t5=c, architecture='ade', projection_dim=12)),
    'encdec_reranker': lambda c: rerankers.RerankerModel(rerankers.RerankerConfig(
        t5=dataclasses.replace(c, num_decoder_layers=3), scoring_token_id=7)),
}


@pytest.mark.parametrize('kind', sorted(MODELS))
def test_scanned_tree_is_the_stacked_t5x_tree_with_layers_axis_first(kind):
  shapes, axes = _abstract_and_axes(MODELS[kind], _config())
  scanned_shapes, scanned_axes = _abstract_and_axes(MODELS[kind], _config(scan_layers=True))
  # The scanned model's tree is exactly the converted T5X tree (names, shapes, dtypes).
  assert trees.flatten(scanned_shapes) == trees.flatten(
      layer_layout.unrolled_to_scan(shapes))
  assert trees.flatten(layer_layout.scan_to_unrolled(scanned_shapes)) == trees.flatten(shapes)
  stacked = 0
  for name, spec in scanned_axes.items():
    if '/layers/' in name:
      stacked += 1
      assert tuple(spec) == ('layers',) + tuple(axes[name.replace('/layers/', '/layers_0/')])
    else:
      assert spec == axes[name], name
  assert stacked > 0


def _assert_bitwise_equal(got, want):
  got_flat, want_flat = trees.flatten(got), trees.flatten(want)
  assert set(got_flat) == set(want_flat)
  for name, value in want_flat.items():
    assert np.asarray(got_flat[name]).dtype == np.asarray(value).dtype, name
    np.testing.assert_array_equal(got_flat[name], value, err_msg=name)


def test_layout_round_trips_are_bitwise_exact():
  ade = random_params(dual_encoders.DualEncoderConfig(t5=_config(), architecture='ade',
                                               projection_dim=12), seed=5)
  reranker = rerankers.init_params(rerankers.RerankerConfig(
      t5=_config(num_layers=3, num_decoder_layers=2), scoring_token_id=7), jax.random.PRNGKey(5))
  for tree in (ade, reranker):
    scanned = layer_layout.unrolled_to_scan(tree)
    _assert_bitwise_equal(layer_layout.scan_to_unrolled(scanned), tree)
    _assert_bitwise_equal(layer_layout.unrolled_to_scan(layer_layout.scan_to_unrolled(scanned)),
                          scanned)
  scanned = layer_layout.unrolled_to_scan(ade)
  assert set(scanned['left_tower']['encoder']) == {'layers', 'relpos_bias', 'encoder_norm'}
  np.testing.assert_array_equal(scanned['right_tower']['encoder']['layers']['mlp']['wo']
                                ['kernel'][1],
                                ade['right_tower']['encoder']['layers_1']['mlp']['wo']['kernel'])
  # Encoder and decoder stacks of different depths each keep their own count.
  assert layer_layout.unrolled_to_scan(reranker)['encoder']['layers']['mlp']['wo'][
      'kernel'].shape[0] == 3
  assert layer_layout.unrolled_to_scan(reranker)['decoder']['layers']['mlp']['wo'][
      'kernel'].shape[0] == 2


def test_layout_errors_name_the_stack():
  layer = lambda d: {'mlp': {'wo': {'kernel': np.zeros((d, 4), np.float32)}}}
  with pytest.raises(ValueError, match=r'encoder/layers_\{i\} must be numbered 0..1, found '
                                       r'\[0, 2\]'):
    layer_layout.unrolled_to_scan({'encoder': {'layers_0': layer(3), 'layers_2': layer(3)}})
  with pytest.raises(ValueError, match='encoder/layers_1 has other parameters or shapes'):
    layer_layout.unrolled_to_scan({'encoder': {'layers_0': layer(3), 'layers_1': layer(5)}})
  with pytest.raises(ValueError, match='one layout'):
    layer_layout.scan_to_unrolled({'encoder': {'layers': layer(3), 'layers_0': layer(3)}})
  with pytest.raises(ValueError, match='encoder/layers: .*leading'):
    layer_layout.scan_to_unrolled({'encoder': {'layers': {'a': np.zeros((2, 3)),
                                                          'b': np.zeros((3, 3))}}})


@pytest.mark.parametrize('scan_layers', [False, True])
def test_activations_carry_logical_constraints_only_under_rules(scan_layers):
  module = t5.EncoderDecoder(_config(scan_layers=scan_layers))
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), IDS,
                                   DECODER_IDS)['params'])
  lower = lambda: jax.jit(lambda p: module.apply({'params': p}, IDS, DECODER_IDS)).lower(
      shapes).as_text().count('sharding_constraint')
  assert lower() == 0
  rules = [('batch', 'data'), ('length', None), ('embed', None), ('heads', 'model'),
           ('kv', None), ('mlp', 'model'), ('layers', None)]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ('data', 'model'))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    count = lower()
  # Encoder: embeddings + per layer q, k, v, attention heads, attention out, MLP
  # hidden, MLP out, layer out. Decoder: embeddings, encoder output + per layer
  # two attentions (5 each), MLP (2), layer out. A scan traces one layer per stack.
  encoder_layers, decoder_layers = (1, 1) if scan_layers else (2, 2)
  assert count == 1 + 8 * encoder_layers + 2 + 13 * decoder_layers
