"""Reranker checkpoints in and out: T5X and Hugging Face encoder-decoders <-> t5dual rerankers.

The parameter tree of an 'encdec' or 'yes_no' reranker is a T5X encoder-decoder's
(token_embedder/, encoder/, decoder/; see rerankers.py), so loading maps T5X
names to themselves: a T5X checkpoint is read as it is (lazily, each device
reading its own slices when shardings are given), a Hugging Face
T5ForConditionalGeneration goes through `hf.t5x_tree_from_hf` first (T5.1.1's
untied lm_head becomes decoder/logits_dense; T5 1.0's tied, rescaled head none).
An 'enc' reranker takes the encoder of any such checkpoint (or of a t5dual SDE)
and initialises its score_dense head unless the checkpoint has one.

Out: `save_hf` writes an 'encdec' / 'yes_no' reranker as a transformers
T5ForConditionalGeneration folder; with the reranker's scoring token (or answer
tokens) its first-step logits give the same scores.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

from t5dual import partitioning, rerankers, t5
from t5dual.interop import hf, lazy_arrays, mapping, t5x, trees

# What a checkpoint must provide for each scorer, and what may be freshly initialised.
_SCOPES = {'encdec': ('token_embedder/', 'encoder/', 'decoder/'),
           'yes_no': ('token_embedder/', 'encoder/', 'decoder/'),
           'enc': ('token_embedder/', 'encoder/', 'score_dense/')}
_MAY_INITIALISE = ('score_dense/',)
_T5_FIELDS = {f.name for f in dataclasses.fields(t5.T5Config)}
_RERANKER_FIELDS = {f.name for f in dataclasses.fields(rerankers.RerankerConfig)} - {'t5'}

ShardingsLike = Union[jax.sharding.Mesh, jax.sharding.Sharding, Mapping, None]


def decoder_fields(tree: Mapping, num_layers: Optional[int] = None) -> dict:
  """T5Config decoder fields of a T5X-named tree: num_decoder_layers and logits_via_embedding.

  num_decoder_layers is None when the decoder has as many layers as `num_layers`
  (the encoder's). Empty when the tree has no decoder.
  """
  flat = trees.flatten(tree)
  layers = sorted({int(m.group(1)) for p in flat
                   if (m := re.match(r'decoder/layers_(\d+)/', p))})
  if not layers:
    return {}
  if layers != list(range(len(layers))):
    raise ValueError(f'decoder layers are not numbered 0..n-1: {layers}')
  return {'num_decoder_layers': None if len(layers) == num_layers else len(layers),
          'logits_via_embedding': 'decoder/logits_dense/kernel' not in flat}


def infer_t5_config(tree: Mapping, **overrides) -> t5.T5Config:
  """T5Config of a T5X-named encoder-decoder from its shapes (see `mapping.infer_t5_config`)."""
  config = mapping.infer_t5_config({k: tree[k] for k in ('token_embedder', 'encoder') if k in tree})
  fields = decoder_fields(tree, config.num_layers)
  return dataclasses.replace(config, **{**fields, **overrides})


def _split_overrides(overrides: Mapping[str, Any]) -> tuple[dict, dict]:
  unknown = sorted(set(overrides) - _T5_FIELDS - _RERANKER_FIELDS)
  if unknown:
    raise TypeError(f'unknown T5Config / RerankerConfig fields: {unknown}')
  return ({k: v for k, v in overrides.items() if k in _T5_FIELDS},
          {k: v for k, v in overrides.items() if k in _RERANKER_FIELDS})


def _flat_shardings(shardings: ShardingsLike, config: rerankers.RerankerConfig
                    ) -> Optional[dict]:
  if shardings is None:
    return None
  if isinstance(shardings, jax.sharding.Mesh):
    shardings = partitioning.param_shardings(rerankers.logical_axes(config), shardings,
                                             rerankers.RerankerModel)
  if isinstance(shardings, jax.sharding.Sharding):
    return {k: shardings for k in trees.flatten(rerankers.logical_axes(config))}
  return trees.flatten(shardings)


def reranker_from_tree(
    source: Mapping, config: Optional[rerankers.RerankerConfig] = None, *,
    scorer: str = 'encdec', t5_config: Optional[t5.T5Config] = None,
    init_params: Optional[Mapping] = None, shardings: ShardingsLike = None,
    param_dtype: np.dtype = np.float32, seed: int = 0, **overrides
) -> tuple[dict, rerankers.RerankerConfig, mapping.MappingReport]:
  """t5dual reranker params from a T5X-named tree (LazyArray, numpy or jax leaves).

  Args:
    source: e.g. `t5x.open_checkpoint(path).target`, `t5x.load_tree(path)` or
      `hf.t5x_tree_from_hf(state)`: a T5 encoder-decoder, or for 'enc' also an
      encoder (a t5dual SDE, a t5dual 'enc' reranker).
    config: the target reranker. When None it is RerankerConfig(scorer=scorer)
      with the T5 config `t5_config` (else inferred from the shapes), and
      `overrides`: T5Config fields (e.g. dtype='float32',
      relative_attention_max_distance, which checkpoints do not record) and
      RerankerConfig fields (e.g. scoring_token_id).
    init_params: values for the parameters the source may lack (an 'enc'
      reranker's score_dense); freshly initialised from `seed` if None.
    shardings: a Mesh (parameters placed by partitioning.LOGICAL_AXIS_RULES), a
      Sharding, or a tree of them like the params.
    param_dtype: parameter dtype (t5dual keeps float32 parameters).
  Returns:
    (params, config, report). Raises ValueError naming every parameter that is
    missing, has another shape, or has no place in the reranker (e.g. an extra
    decoder layer, a logits_dense where the config ties the head).
  """
  if config is None:
    t5_overrides, reranker_overrides = _split_overrides(overrides)
    uses_decoder = scorer != 'enc'
    t5c = t5_config
    if t5c is None:
      t5c = infer_t5_config(source) if uses_decoder else mapping.infer_t5_config(
          {k: source[k] for k in ('token_embedder', 'encoder') if k in source})
    config = rerankers.RerankerConfig(t5=dataclasses.replace(t5c, **t5_overrides),
                                      scorer=scorer, **reranker_overrides)
  elif overrides or t5_config is not None:
    raise ValueError('pass either config or t5_config / config overrides, not both')

  src = trees.flatten(source)
  scopes = _SCOPES[config.scorer]
  if config.scorer != 'enc' and not any(p.startswith('decoder/') for p in src):
    raise ValueError(f'the {config.scorer!r} reranker needs an encoder-decoder checkpoint; this '
                     'one has no decoder/ (top-level entries: '
                     f'{sorted({p.split("/")[0] for p in src})})')
  template = trees.flatten(jax.eval_shape(lambda rng: rerankers.init_params(config, rng),
                                        jax.random.PRNGKey(seed)))
  report, errors, used = mapping.MappingReport(), [], set()
  for path, leaf in template.items():
    if path not in src:
      if not path.startswith(_MAY_INITIALISE):
        errors.append(f'checkpoint has no parameter {path} {list(leaf.shape)}')
      report.initialised.append(path)
      continue
    used.add(path)
    have, want = tuple(src[path].shape), tuple(leaf.shape)
    if have != want:
      errors.append(f'shape mismatch for {path}: checkpoint {list(have)}, reranker {list(want)}')
    report.mapped.append((path, path, have))
  for path in sorted(set(src) - used):
    if path.startswith(scopes):
      errors.append(f'checkpoint parameter {path} has no counterpart in the {config.scorer!r} '
                    'reranker')
    else:
      report.skipped.append(path)
  if errors:
    raise mapping.MappingError('cannot map the checkpoint into the reranker', errors)

  flat_shardings = _flat_shardings(shardings, config)
  if report.initialised and init_params is None:
    init_params = mapping.init_params_in(
        lambda rng: rerankers.init_params(config, rng), jax.random.PRNGKey(seed),
        None if flat_shardings is None else trees.unflatten(flat_shardings))
  init_flat = trees.flatten(init_params) if report.initialised else {}
  out = {}
  for path in template:
    sharding = None if flat_shardings is None else flat_shardings[path]
    leaf = src[path] if path in used else init_flat[path]
    out[path] = lazy_arrays.materialize(leaf, sharding, param_dtype)
  return trees.unflatten(out), config, report


def load_reranker(path: str, config: Optional[rerankers.RerankerConfig] = None, **kwargs
                  ) -> tuple[dict, rerankers.RerankerConfig, mapping.MappingReport]:
  """Reranker params from a Hugging Face or T5X checkpoint: (params, config, report).

  Hugging Face: a T5ForConditionalGeneration (or, for 'enc', T5EncoderModel)
  folder or weights file; the T5 config comes from config.json when there is
  one. T5X: a checkpoint directory; its optimizer state is never read (the
  report lists it as skipped). Other arguments as in `reranker_from_tree`.
  """
  if hf.is_hf_checkpoint(path):
    tree, hf_config = hf.load_tree(path, lazy=True)
    if config is None and kwargs.get('t5_config') is None and hf_config:
      t5c = hf.t5_config_from_hf(hf_config)
      if kwargs.get('scorer', 'encdec') != 'enc':
        t5c = dataclasses.replace(t5c, **decoder_fields(tree, t5c.num_layers))
      kwargs['t5_config'] = t5c
    return reranker_from_tree(tree, config, **kwargs)
  ckpt = t5x.open_checkpoint(path)
  params, config, report = reranker_from_tree(ckpt.target, config, **kwargs)
  report.skipped += list(trees.flatten(ckpt.state))
  return params, config, report


# --------------------------------------------------------------------------- the family's interop
# (RerankerModel.interop_module: the functions every family offers, see interop/dual_encoders.py)

def load_initial(path: str, model: rerankers.RerankerModel, shardings: ShardingsLike = None):
  """(params, report) of `model` (unrolled layers) from a T5X, Hugging Face or t5dual
  dual-encoder checkpoint (`load_reranker`)."""
  params, _, report = load_reranker(path, model.config, shardings=shardings)
  return params, report


def write_hf(folder: str, params: Mapping, model: rerankers.RerankerModel,
             vocab: Optional[str], max_lengths: dict) -> list[tuple[str, str]]:
  """`save_hf` of an 'encdec' or 'yes_no' reranker: [(folder, the line that says what
  it holds and how its score is read)]."""
  config = model.config
  save_hf(folder, params, config, vocab)
  score = {'encdec': f'score: first-step logit of token {config.scoring_token_id}',
           'yes_no': f'score: log-softmax of token {config.yes_token_id} over '
                     f'{config.yes_token_id}, {config.no_token_id} at the first step'}
  return [(folder, f'wrote Hugging Face T5ForConditionalGeneration folder {folder} '
                   f'({score[config.scorer]}; input template {config.template!r}):')]


def save_hf(folder: str, params: Mapping, config: rerankers.RerankerConfig,
            spm_path: Optional[str] = None) -> str:
  """Writes an 'encdec' / 'yes_no' reranker as a transformers T5ForConditionalGeneration folder.

  T5.1.1 (untied decoder/logits_dense) is written with tie_word_embeddings and
  scale_decoder_outputs false, T5 1.0 with both true. With `spm_path`, the
  vocabulary and T5Tokenizer files go alongside. The folder is written under a
  temporary name and renamed when complete; an existing non-empty folder is
  never overwritten.
  """
  if config.scorer == 'enc':
    raise ValueError("an 'enc' reranker has no decoder: only 'encdec' and 'yes_no' rerankers "
                     'can be written as T5ForConditionalGeneration')
  has_head = 'logits_dense' in params['decoder']
  if has_head == config.t5.logits_via_embedding:
    raise ValueError(f'params {"have" if has_head else "lack"} decoder/logits_dense but '
                     f'config.t5.logits_via_embedding is {config.t5.logits_via_embedding}')
  if os.path.isdir(folder) and os.listdir(folder):
    raise FileExistsError(f'{folder} already exists and is not empty; not overwriting it')
  work = f'{folder.rstrip(os.sep)}.tmp-{os.getpid()}-{int(time.time())}'
  try:
    hf.save_encoder_decoder(
        work, trees.to_numpy(params, np.float32), spm_path,
        relative_attention_max_distance=config.t5.relative_attention_max_distance,
        layer_norm_epsilon=config.t5.layer_norm_epsilon, dropout_rate=config.t5.dropout_rate)
    if os.path.isdir(folder):
      os.rmdir(folder)  # empty, checked above
    os.rename(work, folder)
  finally:
    if os.path.isdir(work):
      shutil.rmtree(work)
  return folder
