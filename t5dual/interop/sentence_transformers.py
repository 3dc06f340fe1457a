"""sentence-transformers folders (GTR / sentence-T5 style) in and out.

Such a folder lists its modules in modules.json; t5dual maps them as

  Transformer  T5EncoderModel saved at the root     <-> token_embedder/, encoder/
  Pooling      mean over non-padding tokens        <-> t5dual's mean pooling
  Dense        no bias, Identity activation        <-> projection_layer/kernel (= weight.T)
  Normalize                                        <-> t5dual's L2 normalisation

Anything else (CLS or max pooling, a Dense with bias or tanh, extra modules) has
no t5dual counterpart and is refused with an error naming the module. Reading
needs only numpy and safetensors (torch for pytorch_model.bin files); writing
builds the SentenceTransformer in PyTorch and lets it save itself, so the folder
layout is exactly what the installed sentence-transformers writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Mapping, Optional

import numpy as np
from safetensors.numpy import load_file

from t5dual import dual_encoders, t5
from t5dual.interop import hf, mapping

MODULES_JSON = 'modules.json'
IDENTITY = 'torch.nn.modules.linear.Identity'


@dataclasses.dataclass
class StFolder:
  """What a GTR-style folder holds, validated against what t5dual can represent."""

  path: str
  transformer_dir: str                 # the T5EncoderModel folder
  max_seq_length: Optional[int]
  dense_weight: Optional[np.ndarray]   # [out, in] (torch.nn.Linear layout), None without Dense
  normalize: bool
  notes: list


def is_st_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODULES_JSON))


def _json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _pooling_modes(config: dict) -> tuple:
  """Pooling modes of a Pooling config, new ('pooling_mode') or legacy ('pooling_mode_*_tokens')."""
  if 'pooling_mode' in config:
    mode = config['pooling_mode']
    return (mode,) if isinstance(mode, str) else tuple(mode)
  legacy = {'pooling_mode_cls_token': 'cls', 'pooling_mode_max_tokens': 'max',
            'pooling_mode_mean_tokens': 'mean', 'pooling_mode_mean_sqrt_len_tokens':
            'mean_sqrt_len_tokens', 'pooling_mode_weightedmean_tokens': 'weightedmean',
            'pooling_mode_lasttoken': 'lasttoken'}
  return tuple(m for k, m in legacy.items() if config.get(k)) or ('mean',)


def _dense_weight(module_dir: str, config: dict) -> np.ndarray:
  where = f'Dense module {module_dir}'
  if config.get('bias', True):
    raise ValueError(f'{where} has a bias; t5dual projections have none')
  if config.get('activation_function', IDENTITY) != IDENTITY:
    raise ValueError(f'{where} applies {config["activation_function"]}; t5dual projections '
                     'are linear (torch.nn.Identity)')
  if config.get('use_residual'):
    raise ValueError(f'{where} has a residual connection; t5dual projections do not')
  if os.path.exists(os.path.join(module_dir, 'model.safetensors')):
    state = load_file(os.path.join(module_dir, 'model.safetensors'))
  elif os.path.exists(os.path.join(module_dir, 'pytorch_model.bin')):
    state = hf.load_state_dict(os.path.join(module_dir, 'pytorch_model.bin'))
  else:
    raise FileNotFoundError(f'{where}: no model.safetensors or pytorch_model.bin')
  weight = np.asarray(state['linear.weight'], np.float32)
  expected = (config['out_features'], config['in_features'])
  if weight.shape != expected:
    raise ValueError(f'{where}: linear.weight has shape {list(weight.shape)}, its config says '
                     f'{list(expected)}')
  return weight


def read_folder(path: str) -> StFolder:
  """Parses and validates a sentence-transformers folder (without loading the T5 weights)."""
  modules = _json(os.path.join(path, MODULES_JSON))
  if not modules:
    raise FileNotFoundError(f'{path} has no {MODULES_JSON}: not a sentence-transformers folder')
  kinds = [m['type'].rsplit('.', 1)[-1] for m in sorted(modules, key=lambda m: m['idx'])]
  dirs = [os.path.join(path, m['path']) for m in sorted(modules, key=lambda m: m['idx'])]
  unsupported = [k for k in kinds if k not in ('Transformer', 'Pooling', 'Dense', 'Normalize')]
  pattern_ok = (kinds[:2] == ['Transformer', 'Pooling'] and kinds.count('Dense') <= 1 and
                kinds[2:] in ([], ['Dense'], ['Normalize'], ['Dense', 'Normalize']))
  if unsupported or not pattern_ok:
    raise ValueError(f'{path}: modules {kinds} are not Transformer, mean Pooling, optional Dense, '
                     'optional Normalize; t5dual cannot represent this model')
  notes = []
  bert = _json(os.path.join(dirs[0], 'sentence_bert_config.json'))
  if bert.get('transformer_task', 'feature-extraction') != 'feature-extraction':
    raise ValueError(f'{path}: Transformer task {bert["transformer_task"]!r} is not '
                     'feature-extraction')
  if bert.get('do_lower_case'):
    notes.append('the Transformer lower-cases its input; t5dual tokenizes text as given')
  max_len = bert.get('max_seq_length')
  if max_len is None:
    tok_max = _json(os.path.join(dirs[0], 'tokenizer_config.json')).get('model_max_length')
    max_len = tok_max if isinstance(tok_max, int) and tok_max < 10**6 else None
  modes = _pooling_modes(_json(os.path.join(dirs[1], 'config.json')))
  if modes != ('mean',):
    raise ValueError(f'{path}: Pooling {modes} is not mean pooling, the only pooling t5dual has')
  dense = None
  if 'Dense' in kinds:
    i = kinds.index('Dense')
    dense = _dense_weight(dirs[i], _json(os.path.join(dirs[i], 'config.json')))
  else:
    notes.append('no Dense module: the t5dual projection is the identity')
  normalize = 'Normalize' in kinds
  if not normalize:
    notes.append('no Normalize module: t5dual L2-normalises its embeddings (cosine scores '
                 'are unchanged, dot products are not)')
  return StFolder(path, dirs[0], max_len, dense, normalize, notes)


def find_vocab(path: str) -> Optional[str]:
  """The SentencePiece model (spiece.model) of a folder, if it has one."""
  for folder in (path, read_folder(path).transformer_dir if is_st_folder(path) else path):
    candidate = os.path.join(folder, 'spiece.model')
    if os.path.exists(candidate):
      return candidate
  return None


def load_dual_encoder(path: str, config: Optional[dual_encoders.DualEncoderConfig] = None, *,
                      architecture: str = 'sde', **kwargs):
  """t5dual params of a GTR / sentence-T5 folder: (params, config, report).

  By default an SDE; other architectures get the same encoder and projection
  in both towers. Other arguments as in `mapping.dual_encoder_from_tree`.
  """
  folder = read_folder(path)
  tree, hf_config = hf.load_tree(folder.transformer_dir, lazy=True)
  tree.pop('decoder', None)
  emb = tree['token_embedder']['embedding'].shape[1]
  kernel = np.eye(emb, dtype=np.float32) if folder.dense_weight is None else folder.dense_weight.T
  tree['projection_layer'] = {'kernel': kernel}
  t5_config = hf.t5_config_from_hf(hf_config) if hf_config and config is None else None
  params, config, report = mapping.dual_encoder_from_tree(
      tree, config, architecture=architecture, t5_config=t5_config, **kwargs)
  report.notes += folder.notes
  return params, config, report


# --------------------------------------------------------------------------- export

def _st_classes():
  try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling
  except ImportError:
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
  from sentence_transformers import SentenceTransformer
  return SentenceTransformer, Transformer, Pooling, Dense, Normalize


def save_tower(folder: str, tower: Mapping, t5_config: t5.T5Config, spm_path: str,
               max_seq_length: Optional[int] = None) -> str:
  """Writes one tower ({token_embedder, encoder, projection_layer}) as a GTR-style folder."""
  import torch
  SentenceTransformer, Transformer, Pooling, Dense, Normalize = _st_classes()
  if not spm_path or not os.path.exists(spm_path):
    raise FileNotFoundError(f'SentencePiece model {spm_path!r} not found; the folder needs a '
                            'tokenizer')
  kernel = np.asarray(tower['projection_layer']['kernel'], np.float32)  # [emb, proj]
  with tempfile.TemporaryDirectory() as tmp:
    encoder = {'token_embedder': tower['token_embedder'], 'encoder': tower['encoder']}
    hf.save_encoder(tmp, encoder, t5_config, spm_path, max_seq_length)
    transformer = Transformer(tmp, max_seq_length=max_seq_length)
    dense = Dense(kernel.shape[0], kernel.shape[1], bias=False,
                  activation_function=torch.nn.Identity(),
                  init_weight=torch.tensor(np.ascontiguousarray(kernel.T)))
    model = SentenceTransformer(
        modules=[transformer, Pooling(kernel.shape[0], 'mean'), dense, Normalize()],
        device='cpu')
    model.save(folder)
  hf.follow_umask(folder)
  shutil.copyfile(spm_path, os.path.join(folder, 'spiece.model'))
  return folder


def save_sentence_transformers(folder: str, params: Mapping, config: dual_encoders.DualEncoderConfig,
                               spm_path: str, max_lengths: Optional[Mapping] = None) -> list[str]:
  """sentence-transformers folders of a t5dual dual encoder (`save_tower` for each tower).

  `folder` for an SDE; ADE / ADE-SPL towers go to folder/query (for queries) and
  folder/document, ADE-SPL's shared projection into both (`mapping.save_towers`,
  which also says what max_lengths holds). Returns the folders written.
  """
  return mapping.save_towers(
      folder, params, config.architecture,
      lambda target, tower, length: save_tower(target, tower, config.t5, spm_path, length),
      max_lengths)
