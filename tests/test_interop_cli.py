"""scripts/convert.py: every direction on a tiny model, reports, and shape-mismatch errors."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5dual import checkpoints, cli, dual_encoders, t5
from t5dual.interop import t5x, trees
from t5dual.vocab import train_sentencepiece
from script_modules import load_script  # tests/helpers
from tree_utils import random_params as _random_params  # tests/helpers

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'convert.py'
TINY = t5.T5Config(vocab_size=128, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=12, num_layers=2,
                   relative_attention_num_buckets=8, dtype='float32')


@pytest.fixture(scope='module')
def convert():
  return load_script('convert')


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
  texts = [f'query {i} about document {i * 7} and the retrieval of passages' for i in range(80)]
  return train_sentencepiece(texts, str(tmp_path_factory.mktemp('spm') / 'sp'), vocab_size=60)



def _assert_params_equal(a, b):
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.slow
@pytest.mark.torch
def test_t5x_to_t5dual_and_back_out(tmp_path, convert, spm, capsys):
  config = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
  params = _random_params(config)
  t5x.write_checkpoint(str(tmp_path / 'checkpoint_9'), params, step=9)

  assert convert.main(['t5x-to-t5dual', str(tmp_path / 'checkpoint_9'), str(tmp_path / 'sde'),
                       '--vocab', spm, '--dtype', 'float32']) == 0
  out = capsys.readouterr().out
  assert f'mapped {len(trees.flatten(params))} parameters:' in out
  assert '  projection_layer/kernel -> projection_layer/kernel [8, 6]' in out
  assert 'skipped 1 checkpoint entries:\n  state/step\n' in out
  assert 'initialised 0 parameters' in out
  restored = checkpoints.restore_for_inference(str(tmp_path / 'sde'))
  assert restored.model.config == config and restored.tokenizer.path == spm
  _assert_params_equal(restored.params, params)

  # Out to T5X, Hugging Face and sentence-transformers, and back in.
  assert convert.main(['t5dual-to-t5x', str(tmp_path / 'sde'), str(tmp_path / 't5x_out')]) == 0
  _assert_params_equal(t5x.load_tree(str(tmp_path / 't5x_out')), params)
  assert convert.main(['t5dual-to-hf', str(tmp_path / 'sde'), str(tmp_path / 'hf')]) == 0
  assert 'projection.safetensors: linear.weight [6, 8]' in capsys.readouterr().out
  assert convert.main(['hf-to-t5dual', str(tmp_path / 'hf'), str(tmp_path / 'from_hf'),
                       '--like', str(tmp_path / 'sde')]) == 0
  _assert_params_equal(checkpoints.restore_for_inference(str(tmp_path / 'from_hf')).params,
                       params)
  assert convert.main(['t5dual-to-st', str(tmp_path / 'sde'), str(tmp_path / 'st')]) == 0
  assert '2_Dense/model.safetensors: linear.weight [6, 8]' in capsys.readouterr().out
  assert convert.main(['st-to-t5dual', str(tmp_path / 'st'), str(tmp_path / 'from_st'),
                       '--dtype', 'float32']) == 0
  from_st = checkpoints.restore_for_inference(str(tmp_path / 'from_st'))
  assert from_st.model.config == config and from_st.feature_lengths['targets'] == 256
  assert from_st.tokenizer.path == str(tmp_path / 'from_st/spiece.model')  # copied
  _assert_params_equal(from_st.params, params)


def test_shape_mismatch_is_an_error_naming_the_parameter(tmp_path, convert, spm):
  config = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
  t5x.write_checkpoint(str(tmp_path / 'ckpt'), _random_params(config))
  wider = dataclasses.replace(config, projection_dim=10)
  checkpoints.write_model_json(str(tmp_path / 'like'), checkpoints.model_description(
      dual_encoders.DualEncoderModel(wider), spm, {'inputs': 8, 'targets': 8}))
  with pytest.raises(cli.UserError, match=r'shape mismatch for projection_layer/kernel.*\[8, 6\]'):
    convert.main(['t5x-to-t5dual', str(tmp_path / 'ckpt'), str(tmp_path / 'out'),
                  '--vocab', spm, '--like', str(tmp_path / 'like')])
  assert not (tmp_path / 'out').exists()


def test_t5x_encoder_decoder_to_hf(tmp_path, convert, capsys):
  rng = np.random.default_rng(0)
  config = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
  tree = {k: v for k, v in _random_params(config).items() if k != 'projection_layer'}
  layer = {'pre_self_attention_layer_norm': {'scale': np.ones(8, np.float32)},
           'pre_cross_attention_layer_norm': {'scale': np.ones(8, np.float32)},
           'pre_mlp_layer_norm': {'scale': np.ones(8, np.float32)},
           'mlp': {n: {'kernel': rng.normal(size=(8, 12) if n != 'wo' else (12, 8))}
                   for n in ('wi_0', 'wi_1', 'wo')}}
  for attn in ('self_attention', 'encoder_decoder_attention'):
    layer[attn] = {n: {'kernel': rng.normal(size=(8, 8))} for n in ('query', 'key', 'value', 'out')}
  tree['decoder'] = {'layers_0': layer, 'decoder_norm': {'scale': np.ones(8, np.float32)},
                     'relpos_bias': {'rel_embedding': rng.normal(size=(2, 8))},
                     'logits_dense': {'kernel': rng.normal(size=(8, 128))}}
  tree = trees.unflatten({k: np.asarray(v, np.float32) for k, v in trees.flatten(tree).items()})
  t5x.write_checkpoint(str(tmp_path / 'checkpoint_2'), tree, step=2)
  assert convert.main(['t5x-to-hf', str(tmp_path / 'checkpoint_2'), str(tmp_path / 'hf')]) == 0
  out = capsys.readouterr().out
  assert 'T5ForConditionalGeneration' in out
  assert 'model.safetensors: lm_head.weight [128, 8]' in out
  assert 'skipped 1 checkpoint entries:\n  state/step' in out
  from t5dual.interop import hf
  back = hf.t5x_tree_from_hf(hf.load_state_dict(str(tmp_path / 'hf')),
                             hf.load_hf_config(str(tmp_path / 'hf')))
  _assert_params_equal(back, tree)


# ------------------------------------------------------------------------ without the torch extra

@pytest.mark.parametrize('missing, command, needs', [
    ('torch', 't5dual-to-st', 'PyTorch and sentence-transformers'),
    ('transformers', 't5dual-to-hf', 'transformers (for the tokenizer files)'),
    ('torch', 'hf-to-t5dual', None),  # a pytorch_model.bin, found while reading
])
def test_missing_torch_extra_is_one_line_saying_what_to_install(tmp_path, convert, spm, missing,
                                                                 command, needs):
  # A package of that name shadows the installed one and fails to import, as if absent.
  fake = tmp_path / 'site' / missing
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text(f'raise ImportError("No module named {missing!r}")\n')
  if command == 'hf-to-t5dual':
    source = tmp_path / 'hf'
    source.mkdir()
    (source / 'pytorch_model.bin').write_bytes(b'not read without torch')
    argv = [command, str(source), str(tmp_path / 'out'), '--vocab', spm]
  else:
    config = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
    convert.save_model_dir(str(tmp_path / 'model'), dual_encoders.DualEncoderModel(config),
                           _random_params(config), spm,
                           {'inputs': 8, 'targets': 8})
    argv = [command, str(tmp_path / 'model'), str(tmp_path / 'out')]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore',
             PYTHONPATH=os.pathsep.join([str(tmp_path / 'site'), str(SCRIPT.parents[1])]))
  result = subprocess.run([sys.executable, str(SCRIPT)] + argv, cwd=SCRIPT.parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr
  # The hint installs into the environment that runs the script (run.sh's .venv, or pip of
  # this very interpreter), never a bare `pip`, which may belong to another Python.
  python, repo = sys.executable, str(SCRIPT.parents[1])
  if os.path.abspath(python).startswith(repo + os.sep):  # .venv/bin/python under run.sh
    python = os.path.relpath(python, repo)
  hint = (f"T5DUAL_EXTRAS=torch bash scripts/run.sh convert ... installs it (or: "
          f"{python} -m pip install -e '.[torch]')")
  if needs:
    assert errors[0].startswith(f'error: {command} needs {needs}: {hint} '
                                f'(import {missing}: '), errors[0]
  else:
    assert 'pytorch_model.bin is a PyTorch pickle' in errors[0], errors[0]
    assert errors[0].endswith(f': {hint}'), errors[0]
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow
@pytest.mark.torch
def test_a_scanned_model_converts_out_and_in_like_an_unrolled_one(tmp_path, convert, spm):
  from t5dual import layer_layout
  from t5dual.interop import load_initial_params
  unrolled_cfg = dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=6)
  scanned_cfg = dual_encoders.DualEncoderConfig(t5=dataclasses.replace(TINY, scan_layers=True),
                                         projection_dim=6)
  params = _random_params(unrolled_cfg)
  scanned = layer_layout.unrolled_to_scan(params)
  lengths = {'inputs': 16, 'targets': 32}
  convert.save_model_dir(str(tmp_path / 'scanned'), dual_encoders.DualEncoderModel(scanned_cfg),
                         scanned, spm, lengths)
  convert.save_model_dir(str(tmp_path / 'unrolled'), dual_encoders.DualEncoderModel(unrolled_cfg),
                         params, spm, lengths)
  assert 'layers' in checkpoints.restore_for_inference(
      str(tmp_path / 'scanned')).params['encoder']

  # Out: the same T5X tree and the same Hugging Face files as the unrolled model.
  assert convert.main(['t5dual-to-t5x', str(tmp_path / 'scanned'), str(tmp_path / 't5x')]) == 0
  _assert_params_equal(t5x.load_tree(str(tmp_path / 't5x')), params)
  for name in ('scanned', 'unrolled'):
    assert convert.main(['t5dual-to-hf', str(tmp_path / name), str(tmp_path / f'hf_{name}')]) == 0
  from safetensors.numpy import load_file
  for f in sorted((tmp_path / 'hf_unrolled').rglob('*.safetensors')):
    want, got = load_file(f), load_file(tmp_path / 'hf_scanned' / f.relative_to(
        tmp_path / 'hf_unrolled'))
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{f.name}: {k}')

  # In: into a scanned model (--like, and as a training run's initial checkpoint).
  assert convert.main(['hf-to-t5dual', str(tmp_path / 'hf_unrolled'), str(tmp_path / 'back'),
                       '--like', str(tmp_path / 'scanned')]) == 0
  back = checkpoints.restore_for_inference(str(tmp_path / 'back'))
  assert back.model.config == scanned_cfg
  _assert_params_equal(back.params, scanned)
  scanned_model = dual_encoders.DualEncoderModel(scanned_cfg)
  for source in ('hf_unrolled', 'unrolled'):
    _assert_params_equal(load_initial_params(str(tmp_path / source), scanned_model), scanned)
  _assert_params_equal(load_initial_params(str(tmp_path / 'scanned'),
                                           dual_encoders.DualEncoderModel(unrolled_cfg)), params)
