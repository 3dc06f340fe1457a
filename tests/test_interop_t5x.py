"""T5X checkpoints: the real t5x_retrieval fixture, v3 / v2 / orbax layouts, mapping, sharding."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
import tensorstore as ts

from t5dual import dual_encoders, t5
from t5dual.interop import t5x, trees
import tolerances  # tests/helpers
from tree_utils import random_params as _random_params  # tests/helpers

FIXTURE = 'fixtures/t5x_retrieval_de_t5_tiny/checkpoint_1000'
TINY = t5.T5Config(vocab_size=64, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=12, num_layers=2,
                   relative_attention_num_buckets=8, dtype='float32')



def _assert_trees_equal(a, b):
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _raw_msgpack(path):
  """The msgpack file decoded without t5dual (ndarrays left as ExtType)."""
  with open(path, 'rb') as f:
    return msgpack.unpackb(f.read(), raw=False)


def _ext_array(ext):
  shape, dtype, buf = msgpack.unpackb(ext.data, raw=True)
  return np.frombuffer(buf, np.dtype(dtype.decode())).reshape(shape)


# --------------------------------------------------------------------------- the real fixture

def _fixture_ids(shared_dir):
  """Three texts tokenized with the standard T5 vocabulary the fixture was trained with."""
  from t5dual.vocab import Tokenizer
  texts = ['The quick brown fox jumps over the lazy dog.', 'what is a dual encoder?',
           'T5X checkpoints store large arrays in TensorStore.']
  return Tokenizer(str(shared_dir / 'vocab/t5_spiece.model')).encode(texts, 24)


def test_real_t5x_retrieval_checkpoint_loads_completely(shared_dir):
  path = shared_dir / FIXTURE
  params, config, report = t5x.load_dual_encoder(str(path), dtype='float32')
  assert config.architecture == 'sde' and config.projection_dim == 768
  assert config.t5.mlp_activations == ('relu',)  # T5 1.0
  assert (config.t5.vocab_size, config.t5.emb_dim, config.t5.num_heads, config.t5.head_dim,
          config.t5.mlp_dim, config.t5.num_layers) == (32128, 4, 2, 2, 8, 2)
  assert config.t5.relative_attention_num_buckets == 4  # from the shapes, not the README
  # Every t5dual parameter comes from the checkpoint; only optimizer state is left out.
  assert report.initialised == []
  assert len(report.mapped) == len(trees.flatten(params)) == 20
  assert report.skipped and all(s.startswith('state/') for s in report.skipped)

  # Values against an independent read: zarr with TensorStore, inline with plain msgpack.
  zarr = ts.open({'driver': 'zarr', 'kvstore': {
      'driver': 'file', 'path': str(path / 'target.token_embedder.embedding')}}).result()
  np.testing.assert_array_equal(params['token_embedder']['embedding'], zarr.read().result())
  raw = _raw_msgpack(path / 'checkpoint')['optimizer']['target']
  np.testing.assert_array_equal(params['projection_layer']['kernel'],
                                _ext_array(raw['projection_layer']['kernel']))
  np.testing.assert_array_equal(params['encoder']['relpos_bias']['rel_embedding'],
                                _ext_array(raw['encoder']['relpos_bias']['rel_embedding']))

  # ADE: the same pretrained encoder and projection in both towers, encoding alike.
  ade, ade_config, ade_report = t5x.load_dual_encoder(str(path), architecture='ade',
                                                      dtype='float32')
  assert ade_report.initialised == []
  for side in ('left_tower', 'right_tower'):
    _assert_trees_equal(ade[side], params)
  ids = _fixture_ids(shared_dir)
  emb = np.asarray(dual_encoders.DualEncoderModel(config).encode(params, jnp.asarray(ids)))
  assert emb.shape == (3, 768)
  # Normalising sums 768 squares: |norm - 1| <= eps * 768.
  tolerances.assert_close(np.linalg.norm(emb.astype(np.float64), axis=-1), 1.0, magnitude=1.0,
                          width=768)
  # Different texts differ by more than float32 error (as bounded below).
  assert np.abs(emb[0] - emb[1]).max() > tolerances.tolerance(np.abs(emb).max(), depth=5,
                                                              width=768, both_sides=True)
  ade_model = dual_encoders.DualEncoderModel(ade_config)
  for side in ('left', 'right'):
    # Two float32 programs: 2 layers (4 residual blocks) + head, widest reduction the 768-wide
    # normalisation.
    tolerances.assert_close(ade_model.encode(ade, jnp.asarray(ids), side), emb,
                            magnitude=np.abs(emb).max(), depth=5, width=768, both_sides=True)


@pytest.mark.torch
def test_real_t5x_retrieval_checkpoint_encodes_like_transformers(shared_dir):
  """t5dual's embeddings = transformers' T5 1.0 encoder + mean pool + projection + L2 norm."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from t5dual.interop import hf
  params, config, _ = t5x.load_dual_encoder(str(shared_dir / FIXTURE), dtype='float32')
  ids = _fixture_ids(shared_dir)
  emb = np.asarray(dual_encoders.DualEncoderModel(config).encode(params, jnp.asarray(ids)))

  hf_cfg = transformers.T5Config(**hf.hf_config_dict(config.t5))
  ref_model = transformers.T5EncoderModel(hf_cfg).eval()
  ref_model.load_state_dict({k: torch.tensor(v) for k, v in
                             hf.encoder_to_hf(params, config.t5).items()})
  with torch.no_grad():  # float64 reference: only t5dual's float32 rounding counts
    hidden = ref_model.double()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0)
                                ).last_hidden_state.numpy()
  mask = (ids != 0)[..., None]
  pooled = (hidden * mask).sum(1) / mask.sum(1)
  ref = pooled @ np.asarray(params['projection_layer']['kernel'], np.float64)
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  # 2 layers (4 residual blocks) + head; the widest reduction is the 768-wide normalisation.
  tolerances.assert_close(emb, ref, magnitude=np.abs(ref).max(), depth=5, width=768)


# --------------------------------------------------------------------------- writing and layouts

def test_version3_checkpoint_round_trips(tmp_path):
  config = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
  params = _random_params(config)
  opt = {'encoder': {'encoder_norm': {'scale': {'v': np.arange(8, dtype=np.float32)}}}}
  written = t5x.write_checkpoint(str(tmp_path / 'run/checkpoint_7'), params, step=7,
                                 optimizer_state=opt, tensorstore_min_bytes=256)
  assert os.listdir(tmp_path / 'run') == ['checkpoint_7']  # temporary directory renamed
  with pytest.raises(FileExistsError):
    t5x.write_checkpoint(written, params)

  # The T5X layout, read without t5dual.
  raw = _raw_msgpack(tmp_path / 'run/checkpoint_7/checkpoint')
  assert raw['version'] == 3
  target = raw['optimizer']['target']
  spec = target['token_embedder']['embedding']
  assert spec['driver'] == 'zarr'
  assert spec['kvstore'] == {'driver': 'file', 'path': 'target.token_embedder.embedding'}
  assert isinstance(target['encoder']['encoder_norm']['scale'], msgpack.ExtType)  # inline
  with open(tmp_path / 'run/checkpoint_7/target.token_embedder.embedding/.zarray') as f:
    assert json.load(f)['compressor']['id'] == 'gzip'

  # Paths are relative: the checkpoint still loads after being moved.
  moved = tmp_path / 'moved'
  moved.mkdir()
  shutil.move(str(tmp_path / 'run/checkpoint_7'), str(moved / 'checkpoint_7'))
  ckpt = t5x.open_checkpoint(str(moved / 'checkpoint_7'))
  assert (ckpt.layout, ckpt.version, ckpt.step) == ('msgpack', 3, 7)
  _assert_trees_equal(t5x.load_tree(str(moved / 'checkpoint_7/checkpoint')), params)
  tree, rest = t5x.load_tree(str(moved / 'checkpoint_7'), include_optimizer_state=True)
  _assert_trees_equal(rest['state']['param_states'], opt)
  assert int(rest['state']['step']) == 7

  # A directory of checkpoints: the latest step is taken.
  t5x.write_checkpoint(str(moved / 'checkpoint_3'), _random_params(config, seed=3), step=3)
  loaded, loaded_config, report = t5x.load_dual_encoder(str(moved), dtype='float32')
  _assert_trees_equal(loaded, params)
  assert loaded_config == config
  assert report.initialised == []
  assert sorted(report.skipped) == ['state/param_states/encoder/encoder_norm/scale/v',
                                    'state/step']


def test_bfloat16_native_in_version3_and_as_uint16_in_version2(tmp_path):
  values = np.linspace(-2, 2, 24, dtype=np.float32).reshape(4, 6).astype(ml_dtypes.bfloat16)
  t5x.write_checkpoint(str(tmp_path / 'v3'), {'w': {'kernel': values}}, tensorstore_min_bytes=1)
  leaf = t5x.open_checkpoint(str(tmp_path / 'v3')).target['w']['kernel']
  assert leaf.dtype == ml_dtypes.bfloat16 and leaf.value is None
  np.testing.assert_array_equal(leaf.numpy(), values)

  # Format version 2 stored bfloat16 bits as uint16 (kvstore driver 'gfile', as in the fixture).
  v2 = tmp_path / 'v2'
  ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': str(v2 / 'target.w.kernel')},
           'metadata': {'shape': [4, 6], 'chunks': [2, 6], 'dtype': '<u2',
                        'compressor': {'id': 'gzip'}}},
          create=True).result().write(values.view(np.uint16)).result()
  spec = {'driver': 'zarr', 'kvstore': {'driver': 'gfile', 'path': 'target.w.kernel'},
          'metadata': {'shape': [4, 6], 'chunks': [2, 6], 'dtype': '<u2'}}
  with open(v2 / 'checkpoint', 'wb') as f:
    f.write(msgpack.packb({'version': 2, 'optimizer': {'target': {'w': {'kernel': spec}}}}))
  leaf = t5x.open_checkpoint(str(v2)).target['w']['kernel']
  assert leaf.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(leaf.numpy(), values)
  np.testing.assert_array_equal(leaf.numpy(np.float32), values.astype(np.float32))


def test_orbax_layout(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  config = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
  params = _random_params(config)
  state = {'step': np.int32(5), 'param_states': {'projection_layer': {'kernel': {
      'v': np.ones((8, 6), np.float32)}}}}
  ocp.PyTreeCheckpointer().save(tmp_path / 'checkpoint_5/state',
                                {'target': params, 'state': state})
  ckpt = t5x.open_checkpoint(str(tmp_path / 'checkpoint_5'))
  assert (ckpt.layout, ckpt.step) == ('orbax', 5)
  _assert_trees_equal(t5x.load_tree(str(tmp_path)), params)
  loaded, _, report = t5x.load_dual_encoder(str(tmp_path / 'checkpoint_5/state'), config)
  _assert_trees_equal(loaded, params)
  assert sorted(report.skipped) == ['state/param_states/projection_layer/kernel/v', 'state/step']
  _, rest = t5x.load_tree(str(tmp_path), include_optimizer_state=True)
  np.testing.assert_array_equal(rest['state']['param_states']['projection_layer']['kernel']['v'],
                                state['param_states']['projection_layer']['kernel']['v'])


# --------------------------------------------------------------------------- mapping

def test_encoder_decoder_checkpoint_fills_every_architecture(tmp_path):
  sde_config = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
  encoder = {k: v for k, v in _random_params(sde_config).items() if k != 'projection_layer'}
  rng = np.random.default_rng(1)
  decoder = {'decoder_norm': {'scale': rng.normal(size=8).astype(np.float32)},
             'layers_0': {'self_attention': {'query': {'kernel': rng.normal(size=(8, 8))}}},
             'logits_dense': {'kernel': rng.normal(size=(8, 64)).astype(np.float32)}}
  t5x.write_checkpoint(str(tmp_path / 'checkpoint_1'), {**encoder, 'decoder': decoder}, step=1)
  whole = t5x.load_tree(str(tmp_path / 'checkpoint_1'))
  _assert_trees_equal(whole['decoder'], decoder)

  for arch in ('sde', 'ade', 'ade_spl'):
    config = dual_encoders.DualEncoderConfig(t5=TINY, architecture=arch, projection_dim=6)
    init = _random_params(config, seed=5)
    params, _, report = t5x.load_dual_encoder(str(tmp_path / 'checkpoint_1'), config,
                                              init_params=init)
    assert sorted(s for s in report.skipped if s.startswith('decoder/')) == [
        'decoder/decoder_norm/scale', 'decoder/layers_0/self_attention/query/kernel',
        'decoder/logits_dense/kernel']
    projections = [p for p in trees.flatten(params) if 'projection_layer' in p]
    assert sorted(report.initialised) == sorted(projections)
    towers = [params] if arch == 'sde' else [params['left_tower'], params['right_tower']]
    for tower in towers:
      _assert_trees_equal({k: tower[k] for k in ('token_embedder', 'encoder')}, encoder)
    for p in projections:  # absent from the checkpoint: taken from init_params
      np.testing.assert_array_equal(trees.flatten(params)[p], trees.flatten(init)[p])


def test_mismatches_are_errors_naming_the_parameter(tmp_path):
  config = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
  t5x.write_checkpoint(str(tmp_path / 'c'), _random_params(config))
  wider = dual_encoders.DualEncoderConfig(t5=t5.T5Config(**{**TINY.__dict__, 'mlp_dim': 16}),
                                   projection_dim=6)
  with pytest.raises(ValueError, match=r'encoder/layers_1/mlp/wi_0/kernel .*checkpoint \[8, 12\], '
                     r't5dual model \[8, 16\]'):
    t5x.load_dual_encoder(str(tmp_path / 'c'), wider)
  shallower = dual_encoders.DualEncoderConfig(t5=t5.T5Config(**{**TINY.__dict__, 'num_layers': 1}),
                                       projection_dim=6)
  with pytest.raises(ValueError, match='encoder/layers_1/attention/key/kernel has no counterpart'):
    t5x.load_dual_encoder(str(tmp_path / 'c'), shallower)
  with pytest.raises(FileNotFoundError, match='no T5X checkpoint'):
    t5x.open_checkpoint(str(tmp_path / 'nothing_here'))


# --------------------------------------------------------------------------- sharded reads

SHARDED_SCRIPT = textwrap.dedent('''
  import os, sys
  import jax, numpy as np
  import orbax.checkpoint as ocp
  from t5dual import dual_encoders, partitioning, t5
  from t5dual.interop import lazy_arrays, t5x, trees
  assert jax.device_count() == 4
  cfg = dual_encoders.DualEncoderConfig(t5=t5.T5Config(vocab_size=64, emb_dim=8, num_heads=2,
      head_dim=4, mlp_dim=12, num_layers=1, relative_attention_num_buckets=8), projection_dim=6)
  model = dual_encoders.DualEncoderModel(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        jax.eval_shape(model.init_params, jax.random.PRNGKey(0)))
  root = sys.argv[1]
  t5x.write_checkpoint(root + '/msgpack', params, tensorstore_min_bytes=1)
  ocp.PyTreeCheckpointer().save(root + '/orbax/state', {'target': params})
  mesh = partitioning.Partitioner(num_partitions=2).mesh
  shardings = partitioning.param_shardings(model.logical_axes(), mesh)
  reads = []
  original = lazy_arrays.read_slice
  def counting(array, index):
    out = original(array, index)
    reads.append((array.name, out.shape))
    return out
  lazy_arrays.read_slice = counting
  for layout, given in (('msgpack', mesh), ('orbax', shardings)):
    reads.clear()
    loaded, _, report = t5x.load_dual_encoder(root + '/' + layout, cfg, shardings=given)
    for path, leaf in trees.flatten(loaded).items():
      want = trees.flatten(shardings)[path]
      assert isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(want, leaf.ndim), path
      np.testing.assert_array_equal(np.asarray(leaf), trees.flatten(params)[path], err_msg=path)
    emb = [shape for name, shape in reads if name.endswith('token_embedder/embedding')]
    # vocab is split over 'model' (2): each read is half the table, once per distinct shard.
    assert emb == [(32, 8), (32, 8)], (layout, emb)
  print('SHARDED-OK')
''')


@pytest.mark.multiprocess
def test_sharded_read_reads_only_each_devices_slice(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'SHARDED-OK' in result.stdout
