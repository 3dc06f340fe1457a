"""sentence-transformers GTR-style folders in and out (tiny models and vocabulary built here)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('sentence_transformers')
from sentence_transformers import SentenceTransformer  # noqa: E402

from t5dual import dual_encoders, t5  # noqa: E402
from t5dual.sides import Side  # noqa: E402
from t5dual.interop import sentence_transformers as st  # noqa: E402
from t5dual.interop import trees  # noqa: E402
from t5dual.vocab import Tokenizer, train_sentencepiece  # noqa: E402
import file_modes  # tests/helpers
import tolerances  # tests/helpers
from tree_utils import random_params as _random_params  # tests/helpers

TEXTS = ['what is a dual encoder?', 'Dual encoders embed queries and documents separately.',
         'The quick brown fox jumps over the lazy dog, twice!', 'T5', 'Ünïcode and   spaces']
CORPUS = TEXTS * 3 + [f'sentence {i} about retrieval, ranking and the {i}th document'
                      for i in range(60)]
TINY = t5.T5Config(vocab_size=256, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                   num_layers=2, relative_attention_num_buckets=8, dtype='float32')
# float32 error of these unit embeddings: 2 layers (4 residual blocks) plus pooling and
# projection; the longest reduction is attention over at most 40 tokens.
EMBEDDING = dict(magnitude=1.0, depth=5, width=40)


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
  return train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp('spm') / 'sp'), vocab_size=120)


def _st_classes():
  from sentence_transformers.base.modules.dense import Dense
  from sentence_transformers.base.modules.normalize import Normalize
  from sentence_transformers.base.modules.transformer import Transformer
  from sentence_transformers.sentence_transformer.modules.pooling import Pooling
  return Transformer, Pooling, Dense, Normalize


def _gtr_folder(tmp_path, spm):
  """A tiny GTR: T5EncoderModel + mean Pooling + Dense(no bias, Identity) + Normalize."""
  Transformer, Pooling, Dense, Normalize = _st_classes()
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=256, d_model=16, d_kv=8, d_ff=24, num_layers=2,
                              num_heads=2, relative_attention_num_buckets=8,
                              feed_forward_proj='gated-gelu', dropout_rate=0.0)
  encoder = transformers.T5EncoderModel(cfg)
  with torch.no_grad():
    for name, p in encoder.named_parameters():
      if 'layer_norm' in name:
        p.uniform_(0.5, 1.5)
  hf_dir = tmp_path / 'hf'
  encoder.save_pretrained(hf_dir)
  shutil.copyfile(spm, hf_dir / 'spiece.model')
  transformers.T5Tokenizer.from_pretrained(hf_dir, extra_ids=100).save_pretrained(hf_dir)
  dense = Dense(16, 12, bias=False, activation_function=torch.nn.Identity(),
                init_weight=torch.randn(12, 16))
  model = SentenceTransformer(modules=[Transformer(str(hf_dir), max_seq_length=32),
                                       Pooling(16, 'mean'), dense, Normalize()], device='cpu')
  model.save(str(tmp_path / 'gtr'))
  shutil.copyfile(spm, tmp_path / 'gtr/spiece.model')  # as in the GTR folders on the Hub
  return tmp_path / 'gtr'



def test_gtr_folder_converts_in(tmp_path, spm):
  folder = _gtr_folder(tmp_path, spm)
  # float64 reference: only t5dual's float32 rounding counts.
  reference = SentenceTransformer(str(folder), device='cpu').double().encode(TEXTS)

  params, config, report = st.load_dual_encoder(str(folder), dtype='float32')
  assert config.architecture == 'sde' and config.projection_dim == 12
  assert report.initialised == [] and report.notes == []
  assert st.find_vocab(str(folder)) == str(folder / 'spiece.model')
  length = st.read_folder(str(folder)).max_seq_length
  assert length == 32
  ids = Tokenizer(st.find_vocab(str(folder))).encode(TEXTS, length)
  ours = np.asarray(dual_encoders.DualEncoderModel(config).encode(params, jnp.asarray(ids)))
  tolerances.assert_close(ours, reference, **EMBEDDING)

  # The layout of GTR folders written by sentence-transformers 2.x loads the same.
  legacy = tmp_path / 'legacy'
  shutil.copytree(folder, legacy)
  with open(legacy / 'modules.json') as f:
    modules = json.load(f)
  for m, kind in zip(modules, ['Transformer', 'Pooling', 'Dense', 'Normalize']):
    m['type'] = f'sentence_transformers.models.{kind}'
  with open(legacy / 'modules.json', 'w') as f:
    json.dump(modules, f)
  with open(legacy / '1_Pooling/config.json', 'w') as f:
    json.dump({'word_embedding_dimension': 16, 'pooling_mode_cls_token': False,
               'pooling_mode_mean_tokens': True, 'pooling_mode_max_tokens': False}, f)
  same, _, _ = st.load_dual_encoder(str(legacy), dtype='float32')
  for k, v in trees.flatten(params).items():
    np.testing.assert_array_equal(trees.flatten(same)[k], v)

  # What t5dual cannot represent is refused, naming the module.
  with open(legacy / '1_Pooling/config.json', 'w') as f:
    json.dump({'word_embedding_dimension': 16, 'pooling_mode_cls_token': True}, f)
  with pytest.raises(ValueError, match=r"Pooling \('cls',\) is not mean pooling"):
    st.load_dual_encoder(str(legacy))
  with open(folder / '2_Dense/config.json') as f:
    dense = json.load(f)
  with open(folder / '2_Dense/config.json', 'w') as f:
    json.dump({**dense, 'activation_function': 'torch.nn.modules.activation.Tanh'}, f)
  with pytest.raises(ValueError, match='Dense module .*2_Dense applies .*Tanh'):
    st.load_dual_encoder(str(folder))


@pytest.mark.parametrize('architecture', ['sde', 'ade'])
def test_export_encodes_like_t5dual(tmp_path, spm, architecture):
  config = dual_encoders.DualEncoderConfig(t5=TINY, architecture=architecture, projection_dim=12)
  params = _random_params(config, seed=1)
  with file_modes.umask(0o027):
    folders = st.save_sentence_transformers(str(tmp_path / 'out'), params, config, spm,
                                            {Side.QUERY: 24, 'right': 40})  # any side name
  assert file_modes.wrong_modes(str(tmp_path / 'out'), 0o027) == []  # safetensors writes 0600
  dual = dual_encoders.DualEncoderModel(config)
  tok = Tokenizer(spm)
  # An SDE's one tower encodes documents too: it keeps the longer length.
  lengths = [40] if architecture == 'sde' else [24, 40]
  for side, folder, length in zip(Side, folders, lengths):
    exported = SentenceTransformer(folder, device='cpu').double()  # float64 reference
    assert exported.max_seq_length == length
    ours = np.asarray(dual.encode(params, jnp.asarray(tok.encode(TEXTS, length)), side.tower))
    tolerances.assert_close(ours, exported.encode(TEXTS), **EMBEDDING)
  if architecture == 'sde':  # and back, exactly
    again, again_config, report = st.load_dual_encoder(folders[0], dtype='float32')
    assert again_config == config and report.initialised == []
    for k, v in trees.flatten(params).items():
      np.testing.assert_array_equal(trees.flatten(again)[k], v, err_msg=k)
  else:
    assert folders == [str(tmp_path / 'out/query'), str(tmp_path / 'out/document')]
