"""Hugging Face T5 <-> t5dual parameter mapping.

HF stores Linear weights as [out, in]; T5X/t5dual kernels are [in, out].
HF's relative attention bias lives in block 0 as [buckets, heads]; T5X keeps one
`encoder/relpos_bias/rel_embedding` of shape [heads, buckets].
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5dual import t5


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


def encoder_from_hf(state: Mapping[str, np.ndarray], config: t5.T5Config,
                    prefix: str = 'encoder.') -> dict:
  """{'token_embedder': ..., 'encoder': ...} from an HF T5 state dict (numpy arrays)."""
  def get(name):
    if name not in state:
      raise KeyError(f'Hugging Face checkpoint has no parameter {name!r}')
    return np.asarray(state[name], dtype=np.float32)

  emb_key = 'shared.weight' if 'shared.weight' in state else prefix + 'embed_tokens.weight'
  encoder = {
      'relpos_bias': {'rel_embedding': get(
          prefix + 'block.0.layer.0.SelfAttention.relative_attention_bias.weight').T},
      'encoder_norm': {'scale': get(prefix + 'final_layer_norm.weight')},
  }
  for i in range(config.num_layers):
    blk = f'{prefix}block.{i}.layer.'
    attn = {n: {'kernel': get(f'{blk}0.SelfAttention.{h}.weight').T}
            for n, h in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))}
    mlp = {n: {'kernel': get(f'{blk}1.DenseReluDense.{n}.weight').T}
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
