"""Dual-encoder architectures, pooling, logical axes, model sizes and the optimizer."""

import dataclasses
import math
import pathlib

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5dual import dual_encoders, gin_utils, optim, t5
from t5dual.sides import Side
import tolerances  # tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _model(arch, **loss):
  cfg = dual_encoders.DualEncoderConfig(t5=t5.t5_config('tiny', vocab_size=50, dtype='float32'),
                                 architecture=arch, projection_dim=12)
  return dual_encoders.DualEncoderModel(cfg, dual_encoders.LossConfig(**loss))


def _flat(tree):
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _ids(seed=0, batch=4, length=9):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, 50, size=(batch, length)).astype(np.int32)
  ids[1, 5:] = 0
  return ids


def test_parameter_names_are_t5x():
  names = set(_flat(_model('sde').init_params(jax.random.PRNGKey(0))))
  assert {'token_embedder/embedding', 'encoder/relpos_bias/rel_embedding',
          'encoder/layers_0/attention/query/kernel', 'encoder/layers_1/mlp/wi_0/kernel',
          'encoder/layers_1/mlp/wi_1/kernel', 'encoder/layers_1/mlp/wo/kernel',
          'encoder/layers_0/pre_attention_layer_norm/scale',
          'encoder/layers_0/pre_mlp_layer_norm/scale', 'encoder/encoder_norm/scale',
          'projection_layer/kernel'} <= names


@pytest.mark.parametrize('arch', dual_encoders.ARCHITECTURES)
def test_every_parameter_has_logical_axes(arch):
  model = _model(arch)
  params = _flat(model.init_params(jax.random.PRNGKey(0)))
  axes = _flat(model.logical_axes())
  assert set(axes) == set(params)
  for name, spec in axes.items():
    assert len(spec) == params[name].ndim, name
    assert all(isinstance(a, str) for a in spec), name


@pytest.mark.parametrize('arch', dual_encoders.ARCHITECTURES)
def test_layout_table_reproduces_the_parameter_tree(arch):
  """dual_encoders.tower_paths, which interop reads, against the tree the Flax module builds."""
  params = _model(arch).init_params(jax.random.PRNGKey(0))
  # An SDE's tree is exactly one tower: {token_embedder, encoder, projection_layer}.
  one_tower = sorted(_flat(_model('sde').init_params(jax.random.PRNGKey(0))))
  found = set()
  for side in Side:
    paths = dual_encoders.tower_paths(arch, side)
    assert sorted(paths) == sorted(dual_encoders.TOWER_PARTS)
    tower = dual_encoders.tower_params(params, arch, side)
    assert sorted(_flat(tower)) == one_tower
    for part, path in paths.items():
      found |= {f'{path}/{k}' for k in _flat(tower[part])}
  assert found == set(_flat(params))  # every parameter, and nothing else
  shared = {part for part in dual_encoders.TOWER_PARTS
            if dual_encoders.tower_paths(arch, 'query')[part] == dual_encoders.tower_paths(arch, 'right')[part]}
  assert shared == {'sde': set(dual_encoders.TOWER_PARTS), 'ade': set(),
                    'ade_spl': {'projection_layer'}}[arch]
  with pytest.raises(ValueError, match="architecture must be one of"):
    dual_encoders.tower_paths('dual', Side.QUERY)


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _gin_model(files, bindings=()):
  gin.clear_config()
  gin_utils.parse_gin(files, list(bindings))
  return gin.get_configurable(dual_encoders.DualEncoderModel)()


@pytest.mark.usefixtures('clean_gin')
def test_model_gin_files_share_one_file_and_differ_in_the_architecture(tmp_path, monkeypatch):
  shared = _gin_model(['gin/models/dual_encoder.gin'])
  for arch in dual_encoders.ARCHITECTURES:
    text = (REPO / 'gin/models' / f'{arch}.gin').read_text()
    assert "include 'gin/models/dual_encoder.gin'" in text
    model = _gin_model([f'gin/models/{arch}.gin', 'gin/sizes/tiny.gin'])
    assert model.config.architecture == arch
    assert model.config.t5 == t5.t5_config('tiny', vocab_size=32128, dropout_rate=0.1,
                                           dtype='bfloat16')
    assert dataclasses.replace(_gin_model([f'gin/models/{arch}.gin']).config,
                               architecture='sde') == shared.config
    assert model.loss == shared.loss
  # The include resolves through gin_utils' search paths from any working directory.
  monkeypatch.chdir(tmp_path)
  assert _gin_model([str(REPO / 'gin/models/ade.gin')]).config.architecture == 'ade'


def test_sde_shares_everything():
  model = _model('sde')
  params = model.init_params(jax.random.PRNGKey(0))
  ids = _ids()
  np.testing.assert_array_equal(model.encode(params, ids, 'left'),
                                model.encode(params, ids, 'right'))


def test_ade_towers_are_independent():
  model = _model('ade')
  params = model.init_params(jax.random.PRNGKey(0))
  flat = _flat(params)
  assert not any(k.startswith('projection_layer') for k in flat)
  assert {k.split('/')[0] for k in flat} == {'left_tower', 'right_tower'}
  assert 'left_tower/projection_layer/kernel' in flat
  ids = _ids()
  # The towers differ by more than float32 error (unit vectors, 2 layers of 2 residual blocks +
  # head, MLP 128 wide).
  gap = np.abs(model.encode(params, ids, 'left') - model.encode(params, ids, 'right')).max()
  assert gap > tolerances.tolerance(1.0, depth=5, width=128, both_sides=True)


@pytest.mark.slow
def test_ade_spl_shares_exactly_the_projection():
  model = _model('ade_spl')
  params = model.init_params(jax.random.PRNGKey(0))
  flat = _flat(params)
  shared = [k for k in flat if not k.startswith(('left_tower/', 'right_tower/'))]
  assert shared == ['projection_layer/kernel']
  assert not any('projection' in k for k in flat if k.startswith(('left_tower', 'right_tower')))
  # The shared projection's gradient collects contributions of both towers.
  ids = _ids()
  def grad_of(side):
    f = lambda p: jnp.sum(model.encode(p, ids, side)[:, 0])
    return _flat(jax.grad(f)(params))
  left, right = grad_of('left'), grad_of('right')
  assert np.abs(left['projection_layer/kernel']).sum() > 0
  assert np.abs(right['projection_layer/kernel']).sum() > 0
  assert np.abs(left['right_tower/encoder/encoder_norm/scale']).sum() == 0
  assert np.abs(right['left_tower/encoder/encoder_norm/scale']).sum() == 0


def test_embeddings_are_normalised_and_ignore_padding():
  model = _model('sde')
  params = model.init_params(jax.random.PRNGKey(1))
  ids = _ids(length=8)
  ids[:, 6:] = 0
  padded = np.concatenate([ids, np.zeros((4, 10), np.int32)], axis=1)
  a, b = model.encode(params, ids), model.encode(params, padded)
  # Normalising sums 12 squares.
  tolerances.assert_close(np.linalg.norm(np.asarray(a, np.float64), axis=-1), 1.0,
                          magnitude=1.0, width=12)
  # Two float32 programs on unit vectors: 2 layers (4 residual blocks) + head, widest reduction
  # the 128-wide MLP.
  tolerances.assert_close(a, b, magnitude=1.0, depth=5, width=128, both_sides=True)


def test_mean_pool_against_numpy():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  want = np.stack([h[i][mask[i]].astype(np.float64).mean(0) for i in range(3)])
  # A sum of at most 5 values, then one division.
  tolerances.assert_close(dual_encoders.mean_pool(h, mask), want, magnitude=np.abs(h).max(), depth=2,
                          width=5)


# T5.1.1 encoder parameter counts from the published dimensions, written out.
def _expected_encoder_params(d, heads, kv, ff, layers, vocab=32128, buckets=32):
  attn = 4 * d * heads * kv
  mlp = 3 * d * ff
  return vocab * d + heads * buckets + layers * (attn + mlp + 2 * d) + d


@pytest.mark.parametrize('size', list(t5.SIZES))
def test_sizes_build_with_eval_shape(size):
  cfg = dual_encoders.DualEncoderConfig(t5=t5.t5_config(size), projection_dim=768)
  model = dual_encoders.DualEncoderModel(cfg)
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  s = t5.SIZES[size]
  want = _expected_encoder_params(s['emb_dim'], s['num_heads'], s['head_dim'], s['mlp_dim'],
                                  s['num_layers']) + s['emb_dim'] * 768
  assert total == want
  if size == 'base':
    assert 109e6 < total < 112e6  # T5.1.1-base encoder is ~110M with its embedding


def test_adafactor_matches_reference_update():
  """Two Adafactor steps on a factored [256, 128] kernel vs the paper's formulas (T5X settings)."""
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(256, 128)).astype(np.float32) * 0.05
  grads = [rng.normal(size=w0.shape).astype(np.float32) for _ in range(2)]
  lr = 1e-3
  tx = optim.adafactor(lr)
  params, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
  for g in grads:
    upd, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, upd)

  w = w0.astype(np.float64)
  vr = np.zeros(256)
  vc = np.zeros(128)
  for t, g in enumerate(grads, 1):
    g = g.astype(np.float64)
    beta2 = 1.0 - t ** -0.8
    g2 = g * g + 1e-30
    vr = beta2 * vr + (1 - beta2) * g2.mean(1)
    vc = beta2 * vc + (1 - beta2) * g2.mean(0)
    v = np.outer(vr / vr.mean(), vc)
    u = g / np.sqrt(v)
    u = u / max(1.0, np.sqrt(np.mean(u * u)))          # update clipping at RMS 1
    scale = max(1e-3, np.sqrt(np.mean(w * w)))          # parameter scale, epsilon2 = 1e-3
    w = w - lr * scale * u
  # Two float32 subtractions from w, plus the error of the updates: their statistics are means
  # over up to 256 * 128 entries, through about four stages (moments, rsqrt, clipping, scale).
  np.testing.assert_allclose(
      np.asarray(params), w, rtol=0,
      atol=tolerances.tolerance(np.abs(w).max(), depth=2) +
      tolerances.tolerance(np.abs(w - w0).max(), depth=4, width=256 * 128))


def test_schedule_warmup_then_linear_decay_to_zero():
  s = optim.learning_rate_schedule(1e-3, total_steps=100, warmup_steps=10)
  np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10)), float(s(55)),
                              float(s(100))], [0, 5e-4, 1e-3, 5e-4, 0],
                             atol=tolerances.tolerance(1e-3, depth=3))  # a few float32 ops


@pytest.mark.slow
@pytest.mark.parametrize('variant', [dict(remat='full'), dict(attention='jax_nn')])
def test_remat_and_attention_variants_match_default(variant):
  ids = _ids(seed=3)
  batch = {'inputs': ids, 'targets': _ids(seed=4)}
  results = []
  for overrides in ({}, variant):
    cfg = dual_encoders.DualEncoderConfig(
        t5=t5.t5_config('tiny', vocab_size=50, dtype='float32', **overrides), projection_dim=12)
    model = dual_encoders.DualEncoderModel(cfg)
    params = model.init_params(jax.random.PRNGKey(0))
    loss, grads = jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
    results.append((loss, grads))
  # Two float32 programs: logits up to 1/temperature through 2 layers (4 residual blocks), head
  # and loss, widest reduction the 128-wide MLP; gradients through the same stages backwards.
  tolerances.assert_close(results[1][0], results[0][0], magnitude=1 / 0.01, depth=6, width=128,
                          both_sides=True)
  jax.tree.map(lambda a, b: tolerances.assert_close(a, b, magnitude=np.abs(b).max(), depth=12,
                                                    width=128, both_sides=True),
               results[1][1], results[0][1])
