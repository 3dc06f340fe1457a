"""INITIAL_CHECKPOINT_PATH: training starts from converted Hugging Face weights."""

import os

import flax
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from t5dual import checkpoints, models, optim, trainer, vocab  # noqa: E402
from t5dual.data import demo, pipeline, sources  # noqa: E402
from t5dual.interop import hf, load_initial_params  # noqa: E402


def test_training_starts_from_hf_checkpoint(tmp_path):
  data = str(tmp_path / 'data')
  demo.write_demo_beir(data, num_docs=100, num_concepts=30)
  spm = vocab.train_sentencepiece(demo.demo_texts(data), str(tmp_path / 'spm'), 200)
  torch.manual_seed(0)
  hf_cfg = transformers.T5Config(vocab_size=200, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                 num_heads=4, feed_forward_proj='gated-gelu')
  hf_dir = str(tmp_path / 'hf')
  transformers.T5EncoderModel(hf_cfg).save_pretrained(hf_dir)

  config = models.DualEncoderConfig(t5=hf.t5_config_from_hf(hf_cfg, dtype='float32'),
                                    architecture='ade_spl', projection_dim=8)
  model = models.DualEncoderModel(config)
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
                initial)
  _, params, step, _, _ = checkpoints.restore_for_inference(model_dir)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), initial)
