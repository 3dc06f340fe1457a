"""Hugging Face T5 checkpoints in and out (tiny random models built here, float32 parity)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from t5dual import dual_encoders, t5  # noqa: E402
from t5dual.sides import Side  # noqa: E402
from t5dual.interop import hf, t5x, trees  # noqa: E402
import file_modes  # tests/helpers
import tolerances  # tests/helpers
from tree_utils import random_params as _random_params  # tests/helpers

TINY = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24, num_layers=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   dtype='float32')
# float32 error of these tiny encoders: 2 layers of 2 residual blocks, the longest reduction
# attention over 30 tokens. Hidden states leave a final RMS norm with scales <= 1.5 over 16
# features: |h| <= 1.5 * 4.
HIDDEN = dict(magnitude=1.5 * 4, depth=4, width=30)
# Embeddings are unit vectors; pooling and projection add one stage.
EMBEDDING = dict(magnitude=1.0, depth=5, width=30)


def _hf_config(feed_forward_proj, untied=None, **kw):
  cfg = transformers.T5Config(
      vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=3,
      num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj=feed_forward_proj, dropout_rate=0.0, **kw)
  if untied is not None:  # transformers 5 forces tie_word_embeddings=True in __post_init__
    cfg.tie_word_embeddings = cfg.scale_decoder_outputs = not untied
  return cfg


def _randomise_norms(model, seed):
  """Random layer-norm scales; one token embedding, as in real T5 checkpoints."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.uniform_(0.5, 1.5)
    for stack in (getattr(model, 'encoder', None), getattr(model, 'decoder', None)):
      if stack is not None:  # untied transformers-5 models embed each stack separately
        stack.embed_tokens.weight.copy_(model.shared.weight)
  return model.eval()


def _ids(seed=0, batch=3, length=30):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, 64, size=(batch, length))
  ids[1, 17:] = 0
  ids[2, 5:] = 0
  return ids



def _hf_hidden(folder, ids, dtype):
  """transformers' T5EncoderModel of `folder`, run in `dtype`: last hidden state as numpy."""
  model = transformers.T5EncoderModel.from_pretrained(folder, dtype=dtype).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0)
                 ).last_hidden_state.numpy()


def _pool_project(hidden, ids, kernel):
  mask = (ids != 0)[..., None]
  out = ((hidden * mask).sum(1) / mask.sum(1)) @ np.asarray(kernel, np.float64)
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


def _t5dual_hidden(tower, config, ids):
  x = t5.Embed(config.vocab_size, config.emb_dim).apply(
      {'params': tower['token_embedder']}, jnp.asarray(ids))
  return np.asarray(t5.Encoder(config).apply({'params': tower['encoder']}, x,
                                             jnp.asarray(ids != 0)))


# --------------------------------------------------------------------------- in

@pytest.mark.parametrize('proj', ['gated-gelu', 'relu'])
@pytest.mark.slow
def test_t5_encoder_model_converts_in(tmp_path, proj):
  model = _randomise_norms(transformers.T5EncoderModel(_hf_config(proj)), seed=1)
  model.save_pretrained(tmp_path)
  ids = _ids()
  with torch.no_grad():  # float64 reference: only t5dual's float32 rounding counts
    ref_hidden = model.double()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0)
                                ).last_hidden_state.numpy()

  params, config, report = hf.load_dual_encoder(str(tmp_path), dtype='float32', seed=3)
  assert config.t5.relative_attention_max_distance == 20  # from config.json
  assert report.initialised == ['projection_layer/kernel']  # T5 has no projection
  tolerances.assert_close(_t5dual_hidden(params, config.t5, ids), ref_hidden, **HIDDEN)
  emb = np.asarray(dual_encoders.DualEncoderModel(config).encode(params, jnp.asarray(ids)))
  tolerances.assert_close(
      emb, _pool_project(ref_hidden, ids, params['projection_layer']['kernel']), **EMBEDDING)

  # A bare .safetensors file (config.json next to it) gives the same params.
  same, _, _ = hf.load_dual_encoder(str(tmp_path / 'model.safetensors'), dtype='float32', seed=3)
  for k, v in trees.flatten(params).items():
    np.testing.assert_array_equal(trees.flatten(same)[k], v)


@pytest.mark.slow
def test_t5_for_conditional_generation_encoder_converts_in(tmp_path):
  model = _randomise_norms(transformers.T5ForConditionalGeneration(
      _hf_config('gated-gelu', untied=True)), seed=2)
  model.save_pretrained(tmp_path)
  ids = _ids(1)
  with torch.no_grad():
    ref_hidden = model.double().encoder(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0)
    ).last_hidden_state.numpy()
  params, config, report = hf.load_dual_encoder(str(tmp_path), architecture='ade',
                                                dtype='float32')
  assert any(s.startswith('decoder/layers_2/') for s in report.skipped)
  assert 'decoder/logits_dense/kernel' in report.skipped
  for side in ('left_tower', 'right_tower'):
    tolerances.assert_close(_t5dual_hidden(params[side], config.t5, ids), ref_hidden, **HIDDEN)


# --------------------------------------------------------------------------- whole trees

@pytest.mark.parametrize('untied', [True, False], ids=['t5.1.1', 't5.1.0'])
def test_encoder_decoder_round_trips_through_t5x_names(tmp_path, untied):
  cfg = _hf_config('gated-gelu' if untied else 'relu', untied=untied)
  model = _randomise_norms(transformers.T5ForConditionalGeneration(cfg), seed=4)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  tree = hf.t5x_tree_from_hf(state, cfg.to_dict())

  layer = tree['decoder']['layers_2']
  assert sorted(layer) == sorted(['pre_self_attention_layer_norm', 'self_attention',
                                  'pre_cross_attention_layer_norm', 'encoder_decoder_attention',
                                  'pre_mlp_layer_norm', 'mlp'])
  assert sorted(tree['decoder']) == sorted(
      ['decoder_norm', 'relpos_bias', 'layers_0', 'layers_1', 'layers_2'] +
      (['logits_dense'] if untied else []))
  np.testing.assert_array_equal(layer['encoder_decoder_attention']['key']['kernel'],
                                state['decoder.block.2.layer.1.EncDecAttention.k.weight'].T)
  if untied:
    np.testing.assert_array_equal(tree['decoder']['logits_dense']['kernel'],
                                  state['lm_head.weight'].T)

  back = hf.hf_from_t5x_tree(tree)
  assert sorted(back) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)

  # Through a T5X checkpoint on disk and out to a T5ForConditionalGeneration folder.
  t5x.write_checkpoint(str(tmp_path / 'checkpoint_0'), tree)
  restored = t5x.load_tree(str(tmp_path / 'checkpoint_0'))
  hf.save_encoder_decoder(str(tmp_path / 'hf'), restored, relative_attention_max_distance=20)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'hf').eval()
  ids, dec = torch.tensor(_ids(2)), torch.tensor(_ids(3, length=7))
  with torch.no_grad():  # both in float64: a wrongly mapped weight is all that could differ
    want = model.double()(input_ids=ids, attention_mask=ids != 0, decoder_input_ids=dec
                          ).logits.numpy()
    got = reloaded.double()(input_ids=ids, attention_mask=ids != 0, decoder_input_ids=dec
                            ).logits.numpy()
  # Residual blocks: 2 per encoder layer, 3 per decoder layer (self, cross attention, MLP).
  tolerances.assert_close(got, want, magnitude=np.abs(want).max(), depth=2 * 2 + 3 * 3, width=30,
                          dtype=np.float64, both_sides=True)


def test_unknown_hf_parameters_are_errors():
  model = transformers.T5EncoderModel(_hf_config('relu'))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  state['encoder.block.0.layer.0.SelfAttention.extra.weight'] = np.zeros(2, np.float32)
  with pytest.raises(ValueError, match='SelfAttention.extra.weight'):
    hf.t5x_tree_from_hf(state)


# --------------------------------------------------------------------------- out

@pytest.mark.parametrize('architecture', ['sde', 'ade_spl'])
def test_export_loads_back_in_transformers(tmp_path, architecture):
  config = dual_encoders.DualEncoderConfig(t5=TINY, architecture=architecture, projection_dim=12)
  params = _random_params(config)
  with file_modes.umask(0o027):
    folders = hf.save_t5_encoders(str(tmp_path), params, config)
  assert file_modes.wrong_modes(str(tmp_path), 0o027) == []  # safetensors writes 0600
  sides = [Side.QUERY] if architecture == 'sde' else [Side.QUERY, Side.DOCUMENT]
  assert folders == ([str(tmp_path)] if architecture == 'sde' else
                     [str(tmp_path / 'query'), str(tmp_path / 'document')])
  ids = _ids(5)
  dual = dual_encoders.DualEncoderModel(config)
  for side, folder in zip(sides, folders):
    with open(os.path.join(folder, 'config.json')) as f:
      assert json.load(f)['architectures'] == ['T5EncoderModel']
    hidden = _hf_hidden(folder, ids, torch.float64)  # only t5dual's float32 rounding counts
    tower = dual_encoders.tower_params(params, architecture, side)
    tolerances.assert_close(_t5dual_hidden(tower, TINY, ids), hidden, **HIDDEN)
    from safetensors.numpy import load_file
    weight = load_file(os.path.join(folder, hf.PROJECTION_FILE))[hf.PROJECTION_KEY]
    tolerances.assert_close(dual.encode(params, jnp.asarray(ids), side.tower),
                            _pool_project(hidden, ids, weight.T), **EMBEDDING)
    # And back into t5dual, exactly.
    sde = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=12)
    again, _, report = hf.load_dual_encoder(folder, sde)
    assert report.initialised == [] and report.skipped == []
    for k, v in trees.flatten(tower).items():
      np.testing.assert_array_equal(trees.flatten(again)[k], v, err_msg=k)


def test_a_sharded_safetensors_folder_reads_as_the_whole_one(tmp_path):
  """model.safetensors.index.json and its shards: the eager and the lazy state dicts hold
  the same arrays as the single-file folder."""
  model = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4))
  model.save_pretrained(tmp_path / 'whole')
  model.save_pretrained(tmp_path / 'sharded', max_shard_size='8KB')
  assert os.path.exists(tmp_path / 'sharded' / hf.HF_INDEX)
  assert len(set(json.load(open(tmp_path / 'sharded' / hf.HF_INDEX))['weight_map'].values())) > 1
  whole = hf.load_state_dict(str(tmp_path / 'whole'))
  for state in (hf.load_state_dict(str(tmp_path / 'sharded')),
                {k: v.numpy() for k, v in hf.lazy_state_dict(str(tmp_path / 'sharded')).items()}):
    assert set(state) == set(whole)
    for name, value in whole.items():
      np.testing.assert_array_equal(state[name], value, err_msg=name)
