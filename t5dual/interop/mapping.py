"""Mapping T5X-named parameter trees into t5dual dual encoders, and t5dual towers out.

`dual_encoder_from_tree` maps any T5X-named tree (a t5x_retrieval dual encoder,
a T5 encoder-decoder, a t5dual tree, or a Hugging Face model converted by
`hf.t5x_tree_from_hf`) into a t5dual dual encoder of any architecture; for ADE /
ADE-SPL a single-tower source goes into both towers. Leaves may be `LazyArray`s:
each is read once, onto its devices, when its parameter is built. Both the
source and the target layouts are read from `dual_encoders.tower_paths`.

`infer_t5_config` recovers a T5Config from the shapes of a tree (checkpoints do
not record it), and `save_towers` hands each tower of a t5dual model to a
per-format writer (`hf.save_t5_encoders`, `st.save_sentence_transformers`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Optional, Union

import jax
import numpy as np

from t5dual import dual_encoders, partitioning, t5
from t5dual.interop.lazy_arrays import Sharding, materialize
from t5dual.interop.trees import flatten, unflatten
from t5dual.sides import Side

# A Mesh (t5dual's logical axis rules place every parameter), a Sharding for every
# parameter, a tree of them shaped like the t5dual params, or a function
# (parameter path 'a/b/c', shape) -> Sharding.
ShardingsLike = Union[jax.sharding.Mesh, Sharding, Mapping, Callable[[str, tuple], Sharding],
                      None]


class MappingError(ValueError):
  """A checkpoint that does not fit the model: `problems` holds one line per parameter
  (e.g. 'shape mismatch for encoder/...: checkpoint [8, 16], t5dual model [8, 32]')."""

  def __init__(self, headline: str, problems: list[str]):
    self.problems = list(problems)
    super().__init__(headline + ':\n  ' + '\n  '.join(self.problems))


def tree_shardings(shardings: ShardingsLike, template: Mapping, model: Any
                   ) -> Optional[dict]:
  """The sharding of every parameter of `template` (nested, like it), or None.

  `shardings` as `dual_encoder_from_tree` takes it; on a bare Mesh the parameters
  are placed by `model`'s logical axes (partitioning.LOGICAL_AXIS_RULES and the
  model's own rules).
  """
  if shardings is None:
    return None
  if isinstance(shardings, jax.sharding.Mesh):
    return partitioning.param_shardings(model.logical_axes(), shardings, model)
  flat = flatten(template)
  if isinstance(shardings, Sharding):
    return unflatten({k: shardings for k in flat})
  if isinstance(shardings, Mapping):
    given = flatten(shardings)
    missing = sorted(set(flat) - set(given))
    if missing:
      raise KeyError(f'no sharding given for parameter {missing[0]}')
    return unflatten({k: given[k] for k in flat})
  return unflatten({k: shardings(k, tuple(v.shape)) for k, v in flat.items()})


def init_params_in(init_fn: Callable, rng: Any, shardings: Optional[Mapping]) -> Any:
  """`init_fn(rng)`, created straight into `shardings` when given (one jitted init whose
  outputs are sharded, so no device holds a whole copy), else on the default device.

  Jitted either way, as the trainer's random init is: op-by-op, XLA rounds the
  scaled initialisers differently (by an ulp), and a sharded load would not
  equal an unsharded one.
  """
  return jax.jit(init_fn, out_shardings=shardings)(rng)


# --------------------------------------------------------------------------- config from shapes

def infer_t5_config(tree: Mapping, **overrides) -> t5.T5Config:
  """T5Config of a T5X-named encoder ({token_embedder, encoder}) from its shapes.

  Not recorded in a checkpoint, hence defaults unless overridden:
  relative_attention_max_distance (128), layer_norm_epsilon (1e-6), dtype. A
  gated MLP (wi_0/wi_1) is taken to be T5.1.1's gated GELU, a single wi to be
  T5 1.0's ReLU.
  """
  flat = flatten(tree)

  def shape(path):
    if path not in flat:
      raise KeyError(f'checkpoint has no parameter {path!r} (found e.g. {sorted(flat)[:5]})')
    return tuple(flat[path].shape)

  vocab, emb = shape('token_embedder/embedding')
  heads, buckets = shape('encoder/relpos_bias/rel_embedding')
  layers = sorted({int(m.group(1)) for p in flat if (m := re.match(r'encoder/layers_(\d+)/', p))})
  if layers != list(range(len(layers))) or not layers:
    raise ValueError(f'encoder layers are not numbered 0..n-1: {layers}')
  joined = shape('encoder/layers_0/attention/query/kernel')[1]
  mlp = 'encoder/layers_0/mlp/'
  if f'{mlp}wi/kernel' in flat:
    acts = ('relu',)
  elif f'{mlp}wi_0/kernel' in flat and f'{mlp}wi_1/kernel' in flat:
    acts = ('gelu', 'linear')
  else:
    raise ValueError('unrecognised MLP: expected mlp/wi (T5 1.0) or mlp/wi_0 + wi_1 (T5.1.1)')
  fields = dict(vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=joined // heads,
                mlp_dim=shape(f'{mlp}wo/kernel')[0], num_layers=len(layers),
                mlp_activations=acts, relative_attention_num_buckets=buckets)
  return t5.T5Config(**{**fields, **overrides})


# --------------------------------------------------------------------------- mapping into t5dual

@dataclasses.dataclass
class MappingReport:
  """What a conversion did, parameter by parameter."""

  mapped: list = dataclasses.field(default_factory=list)       # (target, source, shape)
  skipped: list = dataclasses.field(default_factory=list)      # source params left out
  initialised: list = dataclasses.field(default_factory=list)  # target params not in source
  notes: list = dataclasses.field(default_factory=list)        # anything else worth saying

  def lines(self) -> list[str]:
    out = [f'mapped {len(self.mapped)} parameters:']
    out += [f'  {src} -> {tgt} {list(shape)}' for tgt, src, shape in self.mapped]
    out.append(f'skipped {len(self.skipped)} checkpoint entries:')
    out += [f'  {s}' for s in self.skipped]
    out.append(f'initialised {len(self.initialised)} parameters absent from the checkpoint:')
    out += [f'  {s}' for s in self.initialised]
    out += [f'note: {s}' for s in self.notes]
    return out

  def __str__(self):
    return '\n'.join(self.lines())


def source_architecture(flat: Mapping[str, Any]) -> str:
  """The t5dual architecture whose layout a flat T5X-named source tree has.

  left_tower/ and right_tower/ are an ADE when the towers hold their own
  projections, else an ADE-SPL; an encoder/ at the root (t5x_retrieval dual
  encoders, T5 encoder-decoders, Hugging Face models) has the SDE layout.
  """
  has = lambda path: any(p.startswith(path + '/') for p in flat)
  query, document = (dual_encoders.tower_paths('ade', side) for side in Side)
  if has(query['encoder']) and has(document['encoder']):
    return 'ade' if has(query['projection_layer']) else 'ade_spl'
  if has(dual_encoders.tower_paths('sde', Side.QUERY)['encoder']):
    return 'sde'
  raise ValueError('checkpoint has no encoder/ (nor left_tower/ and right_tower/); top-level '
                   f'entries: {sorted({p.split("/")[0] for p in flat})}')


def _prefix_rules(flat: Mapping[str, Any], architecture: str) -> dict[str, str]:
  """{t5dual prefix: source prefix}; each side's tower comes from the same side of the source."""
  source = source_architecture(flat)
  rules = {}
  for side in Side:  # the query side first: an SDE target takes the query tower
    target_paths = dual_encoders.tower_paths(architecture, side)
    source_paths = dual_encoders.tower_paths(source, side)
    for part, path in target_paths.items():
      rules.setdefault(path + '/', source_paths[part] + '/')
  return rules


def map_to_dual_encoder(source: Mapping, template: Mapping, architecture: str
                        ) -> tuple[dict[str, Any], MappingReport]:
  """Assigns source leaves to the t5dual parameters of `template` (anything with .shape).

  Returns ({t5dual path: source leaf or None when absent}, report). Raises
  ValueError naming every parameter whose shape differs, and every source
  parameter inside a mapped scope that t5dual has no place for (e.g. extra layers).
  """
  src = flatten(source)
  tgt = flatten(template)
  rules = _prefix_rules(src, architecture)
  report = MappingReport()
  assignment, used, errors = {}, set(), []
  for path, leaf in tgt.items():
    match = next(((d, s) for d, s in rules.items() if path.startswith(d)), None)
    src_path = match[1] + path[len(match[0]):] if match else None
    if src_path is None or src_path not in src:
      assignment[path] = None
      report.initialised.append(path)
      continue
    used.add(src_path)
    have, want = tuple(src[src_path].shape), tuple(leaf.shape)
    if have != want:
      errors.append(f'shape mismatch for {path} (from {src_path}): checkpoint {list(have)}, '
                    f't5dual model {list(want)}')
    assignment[path] = src[src_path]
    report.mapped.append((path, src_path, have))
  scopes = set(rules.values())
  for path in sorted(set(src) - used):
    if any(path.startswith(s) for s in scopes):
      errors.append(f'checkpoint parameter {path} has no counterpart in the t5dual '
                    f'{architecture} model')
    else:
      report.skipped.append(path)
  if errors:
    raise MappingError('cannot map the checkpoint', errors)
  return assignment, report


def dual_encoder_from_tree(
    source: Mapping, config: Optional[dual_encoders.DualEncoderConfig] = None, *,
    architecture: str = 'sde', t5_config: Optional[t5.T5Config] = None,
    init_params: Optional[Mapping] = None, shardings: ShardingsLike = None,
    param_dtype: np.dtype = np.float32, seed: int = 0, **t5_overrides
) -> tuple[dict, dual_encoders.DualEncoderConfig, MappingReport]:
  """t5dual dual-encoder params from a T5X-named tree (LazyArray, numpy or jax leaves).

  Args:
    source: e.g. `t5x.open_checkpoint(path).target`: a t5x_retrieval dual encoder
      ({token_embedder, encoder, projection_layer}), a T5 encoder-decoder (the
      decoder is skipped), or a t5dual SDE / ADE / ADE-SPL tree. A single-tower
      source fills both towers of an ADE / ADE-SPL model.
    config: the target model. When None it is built from `architecture`, the
      T5 config (`t5_config`, else inferred from the shapes) with `t5_overrides`
      (T5Config fields, e.g. dtype='float32' or relative_attention_max_distance),
      and the checkpoint's projection size (else DualEncoderConfig's default).
    init_params: values for t5dual parameters the source lacks (e.g. the
      projection of an encoder-decoder); freshly initialised from `seed` if None.
    shardings: a Mesh (parameters placed by partitioning.LOGICAL_AXIS_RULES), a
      Sharding, a tree of them like the params, or a function (path, shape) ->
      Sharding; each device then reads only its own slice.
    param_dtype: parameter dtype (t5dual keeps float32 parameters).
  Returns:
    (params, config, report).
  """
  if config is None:
    flat = flatten(source)
    query = dual_encoders.tower_paths(source_architecture(flat), Side.QUERY)
    encoder = {}  # {token_embedder, encoder} of the source's query tower
    for part in ('token_embedder', 'encoder'):
      prefix = query[part] + '/'
      encoder.update({f'{part}/{k[len(prefix):]}': v for k, v in flat.items()
                      if k.startswith(prefix)})
    t5c = dataclasses.replace(t5_config or infer_t5_config(unflatten(encoder)), **t5_overrides)
    projection = flat.get(query['projection_layer'] + '/kernel')
    kwargs = {'projection_dim': projection.shape[1]} if projection is not None else {}
    config = dual_encoders.DualEncoderConfig(t5=t5c, architecture=architecture, **kwargs)
  elif t5_overrides or t5_config is not None:
    raise ValueError('pass either config or t5_config / T5Config overrides, not both')
  model = dual_encoders.DualEncoderModel(config)
  template = jax.eval_shape(model.init_params, jax.random.PRNGKey(seed))
  assignment, report = map_to_dual_encoder(source, template, config.architecture)
  placed = tree_shardings(shardings, template, model)
  if report.initialised and init_params is None:
    init_params = init_params_in(model.init_params, jax.random.PRNGKey(seed), placed)
  init_flat = flatten(init_params) if init_params is not None else {}
  flat_shardings = flatten(placed) if placed is not None else {}
  out = {}
  for path, leaf in assignment.items():
    out[path] = materialize(init_flat[path] if leaf is None else leaf,
                            flat_shardings.get(path), param_dtype)
  return unflatten(out), config, report


# --------------------------------------------------------------------------- t5dual towers out

def save_towers(folder: str, params: Mapping, architecture: str,
                save_tower: Callable[[str, dict, Optional[int]], str],
                max_lengths: Optional[Mapping[Union[Side, str], Optional[int]]] = None
                ) -> list[str]:
  """Writes each tower of a t5dual dual encoder with `save_tower(folder, tower, max_length)`.

  A tower is {token_embedder, encoder, projection_layer} (`dual_encoders.tower_params`).
  An SDE has one, written to `folder`; ADE / ADE-SPL towers go to folder/query
  and folder/document, ADE-SPL's shared projection into both.

  Args:
    max_lengths: {side: max tokens} (a `Side` or any of its names, e.g. 'left');
      a tower serving both sides (SDE) gets the longer of the two.
  Returns:
    The folders written, the query side's first.
  """
  lengths = {Side.parse(k): v for k, v in (max_lengths or {}).items() if v}
  towers: dict[tuple, list[Side]] = {}  # sides served by each distinct tower
  for side in Side:
    towers.setdefault(tuple(dual_encoders.tower_paths(architecture, side).values()), []).append(side)
  written = []
  for sides in towers.values():
    target = folder if len(towers) == 1 else os.path.join(folder, sides[0].value)
    length = max((lengths[s] for s in sides if s in lengths), default=None)
    written.append(save_tower(target, dual_encoders.tower_params(params, architecture, sides[0]),
                              length))
  return written


def graft(source: Mapping, model, seed: int = 0, shardings: Optional[Mapping] = None
          ) -> tuple[dict, MappingReport]:
  """Params for `model` that take every parameter of `source` found at the same path.

  For starting one t5dual model from another kind, e.g. a reranker's
  token_embedder/ and encoder/ from a trained SDE dual encoder; the rest (a
  decoder, a scoring head) keeps `model`'s fresh initialisation from `seed`.
  With `shardings` (a tree like the params) every parameter comes back placed
  by it, the fresh ones created there. Raises MappingError (a ValueError) when
  a shared path has another shape, ValueError when nothing is shared.
  """
  src = flatten(source)
  template = flatten(jax.eval_shape(model.init_params, jax.random.PRNGKey(seed)))
  errors = [f'shape mismatch for {path}: checkpoint {list(src[path].shape)}, '
            f'model {list(leaf.shape)}' for path, leaf in template.items()
            if path in src and tuple(src[path].shape) != tuple(leaf.shape)]
  if errors:  # before anything is initialised
    raise MappingError('cannot start from that checkpoint', errors)
  fresh = flatten(init_params_in(model.init_params, jax.random.PRNGKey(seed), shardings))
  flat_shardings = flatten(shardings) if shardings is not None else {}
  place = lambda path, x: x if path not in flat_shardings else jax.device_put(
      x, flat_shardings[path])
  report, out = MappingReport(), {}
  for path, leaf in fresh.items():
    if path in src:
      out[path] = place(path, src[path])
      report.mapped.append((path, path, tuple(leaf.shape)))
    else:
      out[path] = leaf
      report.initialised.append(path)
  report.skipped = sorted(set(src) - set(fresh))
  if not report.mapped:
    raise ValueError(f'the checkpoint shares no parameter with the {model.name} '
                     f'(its top-level entries: {sorted({p.split("/")[0] for p in src})})')
  return unflatten(out), report
