"""INITIAL_CHECKPOINT_PATH: training starts from converted weights, read straight into the
train state's layout; a checkpoint that does not fit is one line before anything is written."""

import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from t5dual import checkpoints, dual_encoders, optim, t5, train_lib, trainer, vocab
from t5dual.data import pipeline, sources, tasks
from t5dual.interop import hf, load_initial_params, t5x

HELPERS = pathlib.Path(__file__).resolve().parent / 'helpers'


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_format_restores_into_a_model_parallel_layout(tmp_path):
  # One process with 8 CPU devices, mesh (2, 4): T5X, Hugging Face and t5dual directories,
  # into scanned and unrolled dual encoders and rerankers (sharded_restore.py lists the
  # cases). Each parameter equals the unsharded load exactly (the same bytes, fresh ones
  # from the same jitted init), carries the layout's sharding, and every device holds
  # exactly its shard of it.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'PYTHONPATH': str(HELPERS.parent.parent), 'TF_CPP_MIN_LOG_LEVEL': '3'}
  result = subprocess.run([sys.executable, str(HELPERS / 'sharded_restore.py'), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(ln for ln in result.stdout.splitlines() if ln.startswith('RESULT '))
  cases = json.loads(line[len('RESULT '):])
  assert len(cases) == 12
  for case in cases:
    assert case['same_keys'] and case['split'] > 0, case
    assert (case['unequal'], case['misplaced'], case['wrong_shards']) == ([], [], []), case


def test_a_checkpoint_of_another_shape_is_one_line_before_anything_is_written(tmp_path):
  small = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=4, mlp_dim=32,
                      num_layers=2, relative_attention_num_buckets=8, dtype='float32')
  wide = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=t5.T5Config(**{**small.__dict__, 'mlp_dim': 48}), projection_dim=8))
  narrow = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=small, projection_dim=8))
  ckpt = t5x.write_checkpoint(str(tmp_path / 'checkpoint_1'), jax.tree.map(
      np.asarray, narrow.init_params(jax.random.PRNGKey(0))))
  model_dir = tmp_path / 'run'
  with pytest.raises(trainer.ParameterError) as e:
    train_lib.run(str(model_dir), wide, f'beir:{tmp_path}/no-data', str(tmp_path / 'none.model'),
                  task=tasks.PairTask(), batch_size=2, task_feature_lengths={'inputs': 8, 'targets': 8},
                  train_steps=1, initial_checkpoint_path=ckpt)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'train_lib.run.initial_checkpoint_path: {ckpt}: shape mismatch '
                            'for encoder/layers_0/mlp/wi_0/kernel'), message
  assert '[16, 32]' in message and '[16, 48]' in message and 'more)' in message
  assert not model_dir.exists()  # the data was never read, nothing was written
  with pytest.raises(trainer.ParameterError, match=r'^train_lib.run.initial_checkpoint_path: '
                     r'no T5X checkpoint at \S+/missing [^\n]*$'):
    train_lib.run(str(model_dir), wide, f'beir:{tmp_path}/no-data', str(tmp_path / 'none.model'),
                  task=tasks.PairTask(), batch_size=2, task_feature_lengths={'inputs': 8, 'targets': 8},
                  train_steps=1, initial_checkpoint_path=str(tmp_path / 'missing'))
  assert not model_dir.exists()


@pytest.mark.slow
@pytest.mark.torch
def test_training_starts_from_hf_checkpoint(tmp_path, demo_beir):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  data, spm = demo_beir(100, 30, 200)
  torch.manual_seed(0)
  hf_cfg = transformers.T5Config(vocab_size=200, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                 num_heads=4, feed_forward_proj='gated-gelu')
  hf_dir = str(tmp_path / 'hf')
  transformers.T5EncoderModel(hf_cfg).save_pretrained(hf_dir)

  config = dual_encoders.DualEncoderConfig(t5=hf.t5_config_from_hf(hf_cfg, dtype='float32'),
                                    architecture='ade_spl', projection_dim=8)
  model = dual_encoders.DualEncoderModel(config)
  initial = load_initial_params(hf_dir, model)
  flat = {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(initial).items()}
  state = hf.load_state_dict(hf_dir)
  for side in ('left_tower', 'right_tower'):  # the same encoder in both ADE towers
    np.testing.assert_array_equal(flat[f'{side}/token_embedder/embedding'],
                                  state['shared.weight'])
    np.testing.assert_array_equal(flat[f'{side}/encoder/layers_1/mlp/wo/kernel'],
                                  state['encoder.block.1.layer.1.DenseReluDense.wo.weight'].T)

  batcher = pipeline.PairBatcher(sources.load_examples(f'beir:{data}:train'),
                                 vocab.Tokenizer(spm), 8, {'inputs': 8, 'targets': 8})
  model_dir = str(tmp_path / 'run')
  zero = optim.learning_rate_schedule(0.0, 2)  # no update: the saved params are the initial
  trainer.train(model, batcher, optim.adafactor(zero), model_dir,
                trainer.TrainerConfig(total_steps=2, progress_bar=False, tensorboard=False),
                zero, checkpoints.model_description(model, spm, batcher.feature_lengths),
                initial, batch_spec=batcher.batch_spec())
  restored = checkpoints.restore_for_inference(model_dir)
  assert restored.step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), initial)
