"""Hugging Face T5 <-> t5dual parameter mapping, and HF checkpoint files in and out.

HF stores Linear weights as [out, in]; T5X/t5dual kernels are [in, out].
HF's relative attention bias lives in block 0 as [buckets, heads]; T5X keeps one
`encoder/relpos_bias/rel_embedding` of shape [heads, buckets].

Whole models go through T5X-named trees (`t5x_tree_from_hf` / `hf_from_t5x_tree`):
T5EncoderModel and T5ForConditionalGeneration (decoder/layers_i/{pre_self_attention_layer_norm,
self_attention, pre_cross_attention_layer_norm, encoder_decoder_attention,
pre_mlp_layer_norm, mlp}, decoder/decoder_norm, decoder/relpos_bias and, for untied
T5.1.1 heads, decoder/logits_dense). Folders are written with safetensors and a
config.json that transformers reads; a tower's projection goes to projection.safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Mapping, Optional

import numpy as np
from safetensors.numpy import load_file, save_file

from t5dual import t5
from t5dual.interop import mapping, trees
from t5dual.interop.lazy_arrays import LazyArray, safetensors_arrays, transpose


def t5_config_from_hf(hf_config, **overrides) -> t5.T5Config:
  """T5Config from a `transformers.T5Config` (or its dict)."""
  get = (lambda k: hf_config[k]) if isinstance(hf_config, Mapping) else (
      lambda k: getattr(hf_config, k))
  proj = get('feed_forward_proj')
  if proj in ('gated-gelu',):
    acts = ('gelu', 'linear')
  elif proj == 'relu':
    acts = ('relu',)
  else:
    raise ValueError(f'unsupported feed_forward_proj {proj!r} (gated-gelu or relu)')
  return t5.T5Config(
      vocab_size=get('vocab_size'), emb_dim=get('d_model'), num_heads=get('num_heads'),
      head_dim=get('d_kv'), mlp_dim=get('d_ff'), num_layers=get('num_layers'),
      mlp_activations=acts,
      relative_attention_num_buckets=get('relative_attention_num_buckets'),
      relative_attention_max_distance=get('relative_attention_max_distance'),
      layer_norm_epsilon=get('layer_norm_epsilon'), **overrides)


def _mlp_names(config: t5.T5Config) -> list[str]:
  return ['wi'] if len(config.mlp_activations) == 1 else [
      f'wi_{i}' for i in range(len(config.mlp_activations))]


def _float32(leaf):
  """A state-dict entry as float32 numpy; a LazyArray stays lazy (cast when it is read)."""
  return leaf if isinstance(leaf, LazyArray) else np.asarray(leaf, np.float32)


def _numpy(leaf) -> np.ndarray:
  return leaf.numpy(np.float32) if isinstance(leaf, LazyArray) else np.asarray(leaf, np.float32)


def encoder_from_hf(state: Mapping[str, np.ndarray], config: t5.T5Config,
                    prefix: str = 'encoder.') -> dict:
  """{'token_embedder': ..., 'encoder': ...} from an HF T5 state dict (numpy arrays, or
  LazyArrays: the tree's leaves then read their values on demand)."""
  def get(name):
    if name not in state:
      raise KeyError(f'Hugging Face checkpoint has no parameter {name!r}')
    return _float32(state[name])

  emb_key = 'shared.weight' if 'shared.weight' in state else prefix + 'embed_tokens.weight'
  encoder = {
      'relpos_bias': {'rel_embedding': transpose(get(
          prefix + 'block.0.layer.0.SelfAttention.relative_attention_bias.weight'))},
      'encoder_norm': {'scale': get(prefix + 'final_layer_norm.weight')},
  }
  for i in range(config.num_layers):
    blk = f'{prefix}block.{i}.layer.'
    attn = {n: {'kernel': transpose(get(f'{blk}0.SelfAttention.{h}.weight'))}
            for n, h in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))}
    mlp = {n: {'kernel': transpose(get(f'{blk}1.DenseReluDense.{n}.weight'))}
           for n in _mlp_names(config) + ['wo']}
    encoder[f'layers_{i}'] = {
        'pre_attention_layer_norm': {'scale': get(f'{blk}0.layer_norm.weight')},
        'attention': attn,
        'pre_mlp_layer_norm': {'scale': get(f'{blk}1.layer_norm.weight')},
        'mlp': mlp,
    }
  return {'token_embedder': {'embedding': get(emb_key)}, 'encoder': encoder}


def encoder_to_hf(params: Mapping, config: t5.T5Config, prefix: str = 'encoder.') -> dict:
  """Inverse of `encoder_from_hf`: HF T5 encoder state dict (numpy, [out, in] weights)."""
  enc = params['encoder']
  out = {'shared.weight': np.asarray(params['token_embedder']['embedding'])}
  out[prefix + 'embed_tokens.weight'] = out['shared.weight']
  out[prefix + 'block.0.layer.0.SelfAttention.relative_attention_bias.weight'] = np.asarray(
      enc['relpos_bias']['rel_embedding']).T
  out[prefix + 'final_layer_norm.weight'] = np.asarray(enc['encoder_norm']['scale'])
  for i in range(config.num_layers):
    layer = enc[f'layers_{i}']
    blk = f'{prefix}block.{i}.layer.'
    out[f'{blk}0.layer_norm.weight'] = np.asarray(layer['pre_attention_layer_norm']['scale'])
    out[f'{blk}1.layer_norm.weight'] = np.asarray(layer['pre_mlp_layer_norm']['scale'])
    for n, h in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o')):
      out[f'{blk}0.SelfAttention.{h}.weight'] = np.asarray(layer['attention'][n]['kernel']).T
    for n in _mlp_names(config) + ['wo']:
      out[f'{blk}1.DenseReluDense.{n}.weight'] = np.asarray(layer['mlp'][n]['kernel']).T
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


# --------------------------------------------------------------------------- files

HF_WEIGHTS = 'model.safetensors'
HF_INDEX = 'model.safetensors.index.json'
HF_CONFIG = 'config.json'
# The projection of an exported tower, in torch.nn.Linear layout [out, in].
PROJECTION_FILE = 'projection.safetensors'
PROJECTION_KEY = 'linear.weight'


def _torch_load(path: str) -> dict:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{path} is a PyTorch pickle; reading it needs torch (or convert it to '
                      'safetensors)', name='torch') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items()}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Numpy state dict of a Hugging Face checkpoint.

  `path` is a .safetensors file, or a folder with model.safetensors, a sharded
  model.safetensors.index.json, or (read with torch) pytorch_model.bin.
  """
  if os.path.isfile(path):
    return _torch_load(path) if path.endswith('.bin') else dict(load_file(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no Hugging Face checkpoint at {path}')
  files = _safetensors_files(path)
  if files:
    state = {}
    for name in files:
      state.update(load_file(name))
    return state
  if os.path.exists(os.path.join(path, 'pytorch_model.bin')):
    return _torch_load(os.path.join(path, 'pytorch_model.bin'))
  raise FileNotFoundError(f'{path} has no {HF_WEIGHTS}, {HF_INDEX} or pytorch_model.bin')


def load_hf_config(path: str) -> Optional[dict]:
  """config.json of a checkpoint folder (or the folder of a weights file), if there is one."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  config = os.path.join(folder, HF_CONFIG)
  if not os.path.exists(config):
    return None
  with open(config) as f:
    return json.load(f)


def is_hf_checkpoint(path: str) -> bool:
  if os.path.isfile(path):
    return path.endswith(('.safetensors', '.bin'))
  return any(os.path.exists(os.path.join(path, n))
             for n in (HF_WEIGHTS, HF_INDEX, 'pytorch_model.bin'))


# --------------------------------------------------------------------------- whole T5 trees

def _decoder_table(num_layers: int, mlp: list[str], prefix: str = 'decoder.'
                   ) -> list[tuple[str, str, bool]]:
  """(T5X path under decoder/, HF key, transposed) for every decoder parameter."""
  table = [('relpos_bias/rel_embedding',
            f'{prefix}block.0.layer.0.SelfAttention.relative_attention_bias.weight', True),
           ('decoder_norm/scale', f'{prefix}final_layer_norm.weight', False)]
  for i in range(num_layers):
    blk = f'{prefix}block.{i}.layer.'
    pre = f'layers_{i}/'
    table += [(f'{pre}pre_self_attention_layer_norm/scale', f'{blk}0.layer_norm.weight', False),
              (f'{pre}pre_cross_attention_layer_norm/scale', f'{blk}1.layer_norm.weight', False),
              (f'{pre}pre_mlp_layer_norm/scale', f'{blk}2.layer_norm.weight', False)]
    for n, h in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o')):
      table += [(f'{pre}self_attention/{n}/kernel', f'{blk}0.SelfAttention.{h}.weight', True),
                (f'{pre}encoder_decoder_attention/{n}/kernel', f'{blk}1.EncDecAttention.{h}.weight',
                 True)]
    table += [(f'{pre}mlp/{n}/kernel', f'{blk}2.DenseReluDense.{n}.weight', True)
              for n in mlp + ['wo']]
  return table


def _count_blocks(keys, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r'block\.(\d+)\.')
  found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
  return max(found) + 1 if found else 0


def _scales_decoder_output(hf_config: Optional[Mapping]) -> bool:
  """Whether the decoder output is scaled by d_model**-0.5 before the logits (T5 1.0)."""
  hf_config = hf_config or {}
  return bool(hf_config.get('scale_decoder_outputs', hf_config.get('tie_word_embeddings', True)))


def encoder_from_hf_tree(state: Mapping[str, np.ndarray]) -> dict:
  """Like `encoder_from_hf`, with the layer count and MLP type read from the keys.

  The embedding is the one the encoder uses: encoder.embed_tokens.weight when the
  file has it (transformers 5 unties it from shared.weight in untied configs).
  """
  if 'encoder.embed_tokens.weight' in state:
    state = {k: v for k, v in state.items() if k != 'shared.weight'}
  return encoder_from_hf(state, _layout_config(state))


def _layout_config(state: Mapping[str, np.ndarray]) -> t5.T5Config:
  """A T5Config with the encoder's layer count and MLP type (all `encoder_*_hf` need)."""
  gated = any('DenseReluDense.wi_0.' in k for k in state)
  return t5.T5Config(num_layers=_count_blocks(state, 'encoder.'),
                     mlp_activations=('gelu', 'linear') if gated else ('relu',))


def t5x_tree_from_hf(state: Mapping[str, np.ndarray], hf_config: Optional[Mapping] = None
                     ) -> dict:
  """T5X-named tree of an HF T5EncoderModel or T5ForConditionalGeneration state dict.

  {token_embedder, encoder} plus, for an encoder-decoder, decoder/{layers_i/...,
  decoder_norm, relpos_bias} and decoder/logits_dense when the LM head is not the
  shared embedding on the d_model**-0.5-scaled output (T5 1.0's tied head; the
  config's scale_decoder_outputs, else tie_word_embeddings, says which). Raises
  ValueError on keys it does not know.
  """
  tree = encoder_from_hf_tree(state)
  # The keys the encoder took (encoder_to_hf of empty stand-ins: nothing is read).
  stand_ins = trees.unflatten({k: np.zeros((0,) * len(v.shape), np.float32)
                               for k, v in trees.flatten(tree).items()})
  used = set(encoder_to_hf(stand_ins, _layout_config(state)))
  n_dec = _count_blocks(state, 'decoder.')
  if n_dec:
    shared = tree['token_embedder']['embedding']
    shared_values = _numpy(shared) if any(
        k in state for k in ('shared.weight', 'decoder.embed_tokens.weight')) else None
    for key in ('shared.weight', 'decoder.embed_tokens.weight'):
      if key in state and not np.array_equal(_numpy(state[key]), shared_values):
        raise ValueError(f'{key} differs from the encoder embedding; T5X encoder-decoders '
                         'share one token_embedder')
    mlp = ['wi_0', 'wi_1'] if any('DenseReluDense.wi_0.' in k for k in state) else ['wi']
    decoder = {}
    for path, key, transposed in _decoder_table(n_dec, mlp):
      if key not in state:
        raise KeyError(f'Hugging Face checkpoint has no parameter {key!r}')
      value = _float32(state[key])
      decoder[path] = transpose(value) if transposed else value
      used.add(key)
    used.add('decoder.embed_tokens.weight')
    head = None if 'lm_head.weight' not in state else _float32(state['lm_head.weight'])
    scaled = _scales_decoder_output(hf_config)
    if not scaled:  # T5.1.1: a separate head on the unscaled decoder output
      decoder['logits_dense/kernel'] = transpose(shared if head is None else head)
    elif head is not None and not np.array_equal(_numpy(head), _numpy(shared)):
      # An untied head on the scaled output: fold d_model**-0.5 into logits_dense.
      decoder['logits_dense/kernel'] = (_numpy(head) * shared.shape[1] ** -0.5).T
    used.add('lm_head.weight')
    tree['decoder'] = trees.unflatten(decoder)
  unknown = sorted(set(state) - used)
  if unknown:
    raise ValueError(f'unrecognised Hugging Face T5 parameters: {unknown[:10]}'
                     f'{" ..." if len(unknown) > 10 else ""}')
  return tree


def hf_from_t5x_tree(tree: Mapping) -> dict[str, np.ndarray]:
  """Inverse of `t5x_tree_from_hf`: the full HF state dict (tied copies included)."""
  config = mapping.infer_t5_config({'token_embedder': tree['token_embedder'],
                                    'encoder': tree['encoder']})
  state = encoder_to_hf(tree, config)
  if 'decoder' in tree:
    dec = trees.flatten(tree['decoder'])
    n_dec = len({p.split('/')[0] for p in dec if p.startswith('layers_')})
    for path, key, transposed in _decoder_table(n_dec, _mlp_names(config)):
      if path not in dec:
        raise KeyError(f'T5X tree has no parameter decoder/{path}')
      value = np.asarray(dec[path], np.float32)
      state[key] = np.ascontiguousarray(value.T if transposed else value)
    state['decoder.embed_tokens.weight'] = state['shared.weight']
    head = dec.get('logits_dense/kernel')
    state['lm_head.weight'] = (state['shared.weight'] if head is None else
                               np.ascontiguousarray(np.asarray(head, np.float32).T))
  return state


# --------------------------------------------------------------------------- writing folders

def hf_config_dict(config: t5.T5Config, architecture: str = 'T5EncoderModel',
                   num_decoder_layers: Optional[int] = None,
                   untied_head: Optional[bool] = None) -> dict:
  """config.json contents for a transformers T5 model of `config`.

  untied_head: whether the LM head is separate from the shared embedding and sees
  the unscaled decoder output (T5.1.1) or not (T5 1.0); by default True for a
  gated-GELU encoder-decoder. An encoder alone is written tied: it has no head and
  its embed_tokens then follows shared.weight.
  """
  gated = len(config.mlp_activations) == 2
  if config.mlp_activations not in (('gelu', 'linear'), ('relu',)):
    raise ValueError(f'no transformers feed_forward_proj for {config.mlp_activations}')
  untied = (gated and architecture != 'T5EncoderModel') if untied_head is None else untied_head
  return {
      'architectures': [architecture], 'model_type': 't5',
      'vocab_size': config.vocab_size, 'd_model': config.emb_dim, 'd_kv': config.head_dim,
      'd_ff': config.mlp_dim, 'num_layers': config.num_layers,
      'num_decoder_layers': num_decoder_layers or config.num_layers,
      'num_heads': config.num_heads,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'dropout_rate': config.dropout_rate, 'layer_norm_epsilon': config.layer_norm_epsilon,
      'initializer_factor': 1.0, 'feed_forward_proj': 'gated-gelu' if gated else 'relu',
      'is_encoder_decoder': architecture != 'T5EncoderModel',
      'tie_word_embeddings': not untied, 'scale_decoder_outputs': not untied,
      'pad_token_id': 0, 'eos_token_id': 1, 'decoder_start_token_id': 0, 'use_cache': True,
  }


def _new_file_mode() -> int:
  """The mode `open()` gives a new file: 0o666 less the process umask."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def follow_umask(folder: str) -> None:
  """Gives the .safetensors files under `folder` the usual mode of new files.

  safetensors writes through a temporary file (Rust's tempfile: mode 0600) renamed
  into place, so its files, and those transformers and sentence-transformers
  write with it, would otherwise be readable by their owner only.
  """
  mode = _new_file_mode()
  for root, _, files in os.walk(folder):
    for name in files:
      if name.endswith('.safetensors'):
        os.chmod(os.path.join(root, name), mode)


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """safetensors' save_file (PyTorch's 'pt' format tag), with the usual file mode."""
  save_file(dict(tensors), path, metadata={'format': 'pt'})
  os.chmod(path, _new_file_mode())


def _save(folder: str, state: Mapping[str, np.ndarray], hf_config: dict) -> None:
  os.makedirs(folder, exist_ok=True)
  # Tied copies are left out, as transformers does; untied models keep every copy,
  # since transformers versions differ in what they re-tie when one is missing.
  tied = ({'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', 'lm_head.weight'}
          if hf_config['tie_word_embeddings'] else set())
  save_safetensors(os.path.join(folder, HF_WEIGHTS),
                   {k: np.ascontiguousarray(v) for k, v in state.items() if k not in tied})
  with open(os.path.join(folder, HF_CONFIG), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)


def write_tokenizer(folder: str, spm_path: str, vocab_size: int,
                    extra_ids: Optional[int] = None, max_length: Optional[int] = None) -> None:
  """spiece.model plus transformers' T5Tokenizer files in `folder`.

  extra_ids (T5's 100 sentinels) defaults to 100 when the embedding has room for
  them after the SentencePiece pieces, else 0; it does not change the ids of text.
  """
  import sentencepiece as spm
  os.makedirs(folder, exist_ok=True)
  target = os.path.join(folder, 'spiece.model')
  if os.path.abspath(spm_path) != os.path.abspath(target):
    shutil.copyfile(spm_path, target)
  pieces = spm.SentencePieceProcessor(model_file=spm_path).get_piece_size()
  if extra_ids is None:
    extra_ids = 100 if pieces + 100 <= vocab_size else 0
  from transformers import T5Tokenizer
  kwargs = {'model_max_length': max_length} if max_length else {}
  T5Tokenizer.from_pretrained(folder, extra_ids=extra_ids, **kwargs).save_pretrained(folder)


def save_encoder(folder: str, tower: Mapping, config: t5.T5Config,
                 spm_path: Optional[str] = None, max_length: Optional[int] = None) -> str:
  """A transformers T5EncoderModel folder of {token_embedder, encoder} (+ projection file).

  A `projection_layer` is written to projection.safetensors ('linear.weight',
  [projection_dim, emb_dim]) next to the model, and read back by `load_dual_encoder`.
  """
  state = encoder_to_hf(tower, config)
  _save(folder, state, hf_config_dict(config, 'T5EncoderModel'))
  if 'projection_layer' in tower:
    kernel = np.asarray(tower['projection_layer']['kernel'], np.float32)
    save_safetensors(os.path.join(folder, PROJECTION_FILE),
                     {PROJECTION_KEY: np.ascontiguousarray(kernel.T)})
  if spm_path:
    write_tokenizer(folder, spm_path, config.vocab_size, max_length=max_length)
  return folder


def save_encoder_decoder(folder: str, tree: Mapping, spm_path: Optional[str] = None,
                         **config_overrides) -> str:
  """A transformers T5ForConditionalGeneration folder of a T5X-named encoder-decoder tree.

  T5X trees do not record relative_attention_max_distance, layer_norm_epsilon or
  dropout: pass them as T5Config overrides if they differ from the defaults.
  """
  config = mapping.infer_t5_config(tree, **config_overrides)
  n_dec = len([k for k in tree['decoder'] if k.startswith('layers_')])
  hf_config = hf_config_dict(config, 'T5ForConditionalGeneration', n_dec,
                             untied_head='logits_dense' in tree['decoder'])
  _save(folder, hf_from_t5x_tree(tree), hf_config)
  if spm_path:
    write_tokenizer(folder, spm_path, config.vocab_size)
  return folder


def save_t5_encoders(folder: str, params: Mapping, config, spm_path: Optional[str] = None,
                     max_lengths: Optional[Mapping] = None) -> list[str]:
  """T5EncoderModel folders of a t5dual dual encoder (`save_encoder` for each tower).

  `folder` for an SDE; ADE / ADE-SPL towers go to folder/query and
  folder/document, ADE-SPL's shared projection into both (`mapping.save_towers`,
  which also says what max_lengths holds). Returns the folders written.
  """
  return mapping.save_towers(
      folder, params, config.architecture,
      lambda target, tower, length: save_encoder(target, tower, config.t5, spm_path, length),
      max_lengths)


# --------------------------------------------------------------------------- loading into t5dual

def lazy_state_dict(path: str) -> dict:
  """`load_state_dict`, with safetensors entries as LazyArrays: only the header is read
  now, and later each entry's regions as they are asked for (a device its shard). A
  PyTorch pickle is read whole."""
  if os.path.isfile(path) and path.endswith('.safetensors'):
    return safetensors_arrays(path)
  files = _safetensors_files(path) if os.path.isdir(path) else []
  if files:
    state = {}
    for name in files:
      state.update(safetensors_arrays(name))
    return state
  return load_state_dict(path)


def _safetensors_files(folder: str) -> list[str]:
  """The safetensors files of a checkpoint folder: model.safetensors, or the shards its
  model.safetensors.index.json names; [] when it has neither."""
  if os.path.exists(os.path.join(folder, HF_WEIGHTS)):
    return [os.path.join(folder, HF_WEIGHTS)]
  if os.path.exists(os.path.join(folder, HF_INDEX)):
    with open(os.path.join(folder, HF_INDEX)) as f:
      return [os.path.join(folder, name)
              for name in sorted(set(json.load(f)['weight_map'].values()))]
  return []


def load_tree(path: str, lazy: bool = False) -> tuple[dict, Optional[dict]]:
  """(T5X-named tree, config.json) of an HF checkpoint, with t5dual's projection file if any.

  lazy: leaves are LazyArrays read on demand (`lazy_state_dict`), for loaders that
  place each parameter onto its devices; otherwise numpy arrays.
  """
  state = lazy_state_dict(path) if lazy else load_state_dict(path)
  tree = t5x_tree_from_hf(state, load_hf_config(path))
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  projection = os.path.join(folder, PROJECTION_FILE)
  if os.path.exists(projection):
    weight = load_file(projection)[PROJECTION_KEY]
    tree['projection_layer'] = {'kernel': np.asarray(weight, np.float32).T}
  return tree, load_hf_config(path)


def load_dual_encoder(path: str, config=None, *, architecture: str = 'sde', **kwargs):
  """t5dual params from an HF T5 checkpoint (file or folder): (params, config, report).

  The encoder of a T5EncoderModel or T5ForConditionalGeneration (its decoder is
  reported as skipped) goes into every tower; the projection comes from
  projection.safetensors when present, else is freshly initialised. The T5
  config comes from config.json (from the shapes without one). Other arguments,
  including T5Config overrides such as dtype='float32', as in
  `mapping.dual_encoder_from_tree`.
  """
  tree, hf_config = load_tree(path, lazy=True)
  t5_config = t5_config_from_hf(hf_config) if hf_config and config is None else None
  return mapping.dual_encoder_from_tree(tree, config, architecture=architecture,
                                    t5_config=t5_config, **kwargs)
