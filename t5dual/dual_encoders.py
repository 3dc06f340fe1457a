"""Dual encoders built from T5 encoders, and the model object the trainer drives.

Architectures (Dong et al. 2022, "Exploring Dual Encoder Architectures") differ
only in which parts of a tower the query and document sides share
(`SHARED_PARTS`; `tower_paths` gives where each part sits in the parameter tree):

  sde      one tower shared by queries and documents. Parameter tree as in
           t5x_retrieval: token_embedder/, encoder/, projection_layer/.
  ade      two towers, nothing shared: left_tower/{token_embedder,encoder,
           projection_layer}/ and right_tower/{...}/.
  ade_spl  two towers sharing one projection: left_tower/{token_embedder,encoder}/,
           right_tower/{...}/, projection_layer/.

The query side is the "left" tower (feature `inputs`), the document side the
"right" one (`targets`); see `t5dual.sides.Side`.
A tower: embed -> T5 encoder -> mean over non-padding tokens -> projection
(no bias) -> L2 normalisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5dual import losses as losses_lib
from t5dual import model_api, t5
from t5dual.sides import Side

Array = jax.Array
# The parts of a tower, named as in t5x_retrieval's parameter tree.
TOWER_PARTS = ('token_embedder', 'encoder', 'projection_layer')
# The parts both sides share (kept at the root of the tree); the others live in
# left_tower/ (query side) and right_tower/ (document side).
SHARED_PARTS = {
    'sde': TOWER_PARTS,
    'ade': (),
    'ade_spl': ('projection_layer',),
}
ARCHITECTURES = tuple(SHARED_PARTS)
LOSSES = ('softmax', 'samtone', 'pair')


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  t5: t5.T5Config = t5.T5Config()
  architecture: str = 'sde'
  projection_dim: int = 768  # pooling, projection and L2 norm run in float32

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f'architecture must be one of {ARCHITECTURES}, '
                       f'got {self.architecture!r}')


def tower_paths(architecture: str, side: Side | str) -> dict[str, str]:
  """Where one side's tower sits in the parameter tree of `architecture`.

  The one statement of the SDE / ADE / ADE-SPL layouts that readers and writers
  of other formats (T5X, Hugging Face, sentence-transformers) follow.

  Args:
    architecture: one of ARCHITECTURES.
    side: a `Side`, or any of its names ('query', 'left', 'inputs', ...).
  Returns:
    {part: path} for every part in TOWER_PARTS, a path being the '/'-joined keys
    of that part's subtree in `init_params`' output; e.g. ADE-SPL's document side
    is {'token_embedder': 'right_tower/token_embedder', 'encoder':
    'right_tower/encoder', 'projection_layer': 'projection_layer'}.
  """
  if architecture not in SHARED_PARTS:
    raise ValueError(f'architecture must be one of {ARCHITECTURES}, got {architecture!r}')
  tower = f'{Side.parse(side).tower}_tower/'
  return {part: part if part in SHARED_PARTS[architecture] else tower + part
          for part in TOWER_PARTS}


def tower_params(params: Mapping, architecture: str, side: Side | str) -> dict:
  """{token_embedder, encoder, projection_layer} subtrees of one side's tower of `params`."""
  def subtree(path):
    node = params
    for key in path.split('/'):
      node = node[key]
    return node
  return {part: subtree(path) for part, path in tower_paths(architecture, side).items()}


def mean_pool(hidden: Array, mask: Array) -> Array:
  """Mean of `hidden` [B, L, D] over positions where `mask` [B, L] is True (float32)."""
  mask = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Projection(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'),
            ('embed', 'projection')), (x.shape[-1], self.features), jnp.float32)
    return x.astype(jnp.float32) @ kernel


class Tower(nn.Module):
  """token_embedder + encoder (+ projection_layer unless it is shared)."""

  config: t5.T5Config
  projection_dim: Optional[int]

  def setup(self):
    self.token_embedder = t5.Embed(self.config.vocab_size, self.config.emb_dim,
                                   self.config.dtype)
    self.encoder = t5.Encoder(self.config)
    if self.projection_dim is not None:
      self.projection_layer = Projection(self.projection_dim)

  def pooled(self, ids: Array, deterministic: bool) -> Array:
    mask = ids != t5.PAD_ID
    return mean_pool(self.encoder(self.token_embedder(ids), mask, deterministic), mask)


class DualEncoder(nn.Module):
  """Maps token ids [B, L] to L2-normalised embeddings [B, projection_dim]."""

  config: DualEncoderConfig

  def setup(self):
    cfg = self.config
    if cfg.architecture == 'sde':
      self.token_embedder = t5.Embed(cfg.t5.vocab_size, cfg.t5.emb_dim, cfg.t5.dtype)
      self.encoder = t5.Encoder(cfg.t5)
    else:
      own_projection = cfg.projection_dim if cfg.architecture == 'ade' else None
      self.left_tower = Tower(cfg.t5, own_projection)
      self.right_tower = Tower(cfg.t5, own_projection)
    if cfg.architecture in ('sde', 'ade_spl'):
      self.projection_layer = Projection(cfg.projection_dim)

  def _encode(self, ids: Array, side: str, deterministic: bool) -> Array:
    cfg = self.config
    if cfg.architecture == 'sde':
      mask = ids != t5.PAD_ID
      pooled = mean_pool(self.encoder(self.token_embedder(ids), mask, deterministic), mask)
      return l2_normalize(self.projection_layer(pooled))
    tower = self.left_tower if side == 'left' else self.right_tower
    pooled = tower.pooled(ids, deterministic)
    projection = tower.projection_layer if cfg.architecture == 'ade' else self.projection_layer
    return l2_normalize(projection(pooled))

  def encode_left(self, ids: Array, deterministic: bool = True) -> Array:
    """Query tower."""
    return self._encode(ids, 'left', deterministic)

  def encode_right(self, ids: Array, deterministic: bool = True) -> Array:
    """Document tower."""
    return self._encode(ids, 'right', deterministic)

  def __call__(self, left_ids: Array, right_ids: Array, deterministic: bool = True):
    return self.encode_left(left_ids, deterministic), self.encode_right(right_ids, deterministic)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which contrastive loss to train with (see losses.py)."""

  name: str = 'samtone'             # 'softmax' | 'samtone' | 'pair'
  temperature: float = 0.01
  bidirectional: bool = True
  same_tower_negatives: str = 'query'  # for 'samtone': 'query' | 'doc' | 'both'
  pair_alpha: float = 0.1
  mask_duplicates: bool = True

  def __post_init__(self):
    if self.name not in LOSSES:
      raise ValueError(f'loss name must be one of {LOSSES}, got {self.name!r}')


@model_api.register
class DualEncoderModel:
  """A dual encoder with its contrastive loss: the `model_api.Model` of kind 'dual_encoder'.

  Batches are dicts of numpy arrays: 'inputs' [B, Lq], 'targets' [B, Ld], and
  optionally 'negative_targets' [B, N, Ld], 'query_ids' [B], 'doc_ids' [B],
  'negative_ids' [B, N] (`input_features`; data/tasks.PairTask makes them).
  """

  kind = 'dual_encoder'
  progress_metrics = ('loss', 'p_at_1')
  feature_names = tuple(side.feature for side in Side)  # query and document token ids
  # The projection head's output axis is replicated: it is small, and each embedding
  # is L2-normalised over it.
  logical_axis_rules = (('projection', None),)
  # Its checkpoints in other formats (interop.family): imported only when used.
  interop_module = 't5dual.interop.dual_encoders'

  def __init__(self, config: DualEncoderConfig, loss: LossConfig = LossConfig()):
    self.config = config
    self.loss = loss
    self.module = DualEncoder(config)

  @property
  def metric_names(self) -> tuple[str, ...]:
    if self.loss.name == 'pair':
      terms = ('query_centric', 'passage_centric')
    else:
      terms = ('query_to_doc',) + (('doc_to_query',) if self.loss.bidirectional else ())
    return ('loss',) + tuple(f'loss/{t}' for t in terms) + ('p_at_1', 'mrr')

  @property
  def vocab_size(self) -> int:
    return self.config.t5.vocab_size

  @property
  def name(self) -> str:
    return f'{self.config.architecture} dual encoder'

  @property
  def embedding_dim(self) -> int:
    return self.config.projection_dim

  @property
  def t5_config(self) -> t5.T5Config:
    return self.config.t5

  def with_t5(self, **changes) -> 'DualEncoderModel':
    """The same dual encoder and loss with `changes` to its T5Config (model_api.T5Model)."""
    t5_config = dataclasses.replace(self.config.t5, **changes)
    return type(self)(dataclasses.replace(self.config, t5=t5_config), self.loss)

  def describe(self) -> dict:
    return {'config': dataclasses.asdict(self.config), 'loss': dataclasses.asdict(self.loss)}

  @classmethod
  def from_description(cls, desc: dict) -> 'DualEncoderModel':
    cfg = dict(desc['config'])
    config = DualEncoderConfig(t5=t5.T5Config.from_dict(cfg.pop('t5')), **cfg)
    return cls(config, LossConfig(**desc.get('loss', {})))

  # The batches it takes (data/tasks.PairTask's): token ids of each side, and hard
  # negatives and the ids that mask duplicates when the task has them.
  input_features = {
      'inputs': model_api.Feature(('batch', 'query_length'), 'int32'),
      'targets': model_api.Feature(('batch', 'document_length'), 'int32'),
      'negative_targets': model_api.Feature(('batch', 'negatives', 'document_length'),
                                            'int32', required=False),
      'query_ids': model_api.Feature(('batch',), 'int32', required=False),
      'doc_ids': model_api.Feature(('batch',), 'int32', required=False),
      'negative_ids': model_api.Feature(('batch', 'negatives'), 'int32', required=False),
  }
  token_features = ('inputs', 'targets', 'negative_targets')

  def _boxed_init(self, rng: Array, query_length: int, doc_length: int):
    q = jnp.ones((1, query_length), jnp.int32)
    d = jnp.ones((1, doc_length), jnp.int32)
    return self.module.init(rng, q, d)['params']

  def init_params(self, rng: Array, query_length: int = 8, doc_length: int = 8):
    return nn.unbox(self._boxed_init(rng, query_length, doc_length))

  def logical_axes(self) -> Any:
    """Pytree of `PartitionSpec`s of logical axis names, matching `init_params`."""
    boxed = jax.eval_shape(lambda rng: self._boxed_init(rng, 8, 8), jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)

  def encode(self, params, ids: Array, side: 'Side | str' = Side.QUERY) -> Array:
    """L2-normalised embeddings of one side's ids [B, L] (any name of the side)."""
    method = (DualEncoder.encode_left if Side.parse(side) is Side.QUERY
              else DualEncoder.encode_right)
    return self.module.apply({'params': params}, ids, method=method)

  def embed(self, params, batch: dict[str, Array], dropout_rng: Optional[Array]) -> dict:
    """The batch's embeddings (model_api.ContrastiveModel); dropout is on when dropout_rng is given.

    Returns:
      {'query': [B, D], 'doc': [B, D]} and, when the batch has
      'negative_targets' [B, N, Ld], 'negatives': [B, N, D]; float32, unit norm.
    """
    deterministic = dropout_rng is None
    rngs = None if deterministic else {'dropout': dropout_rng}
    apply = lambda method, ids: self.module.apply(
        {'params': params}, ids, deterministic, method=method, rngs=rngs)
    out = {'query': apply(DualEncoder.encode_left, batch['inputs'])}
    docs = batch['targets']
    negatives = batch.get('negative_targets')
    if negatives is not None:
      b, n, length = negatives.shape
      all_docs = apply(DualEncoder.encode_right,
                       jnp.concatenate([docs, negatives.reshape(b * n, length)], axis=0))
      out['doc'], out['negatives'] = all_docs[:b], all_docs[b:].reshape(b, n, -1)
    else:
      out['doc'] = apply(DualEncoder.encode_right, docs)
    return out

  def loss_from_embeddings(self, embeddings: dict, batch: dict[str, Array]):
    """(loss, metrics) of `embed`'s output; `batch` supplies the ids of duplicates only."""
    query, doc, neg = embeddings['query'], embeddings['doc'], embeddings.get('negatives')
    ids = {}
    if self.loss.mask_duplicates:
      ids = {k: batch[k] for k in ('query_ids', 'doc_ids', 'negative_ids') if k in batch}
    cfg = self.loss
    if cfg.name == 'pair':
      loss, terms = losses_lib.pair_loss(query, doc, neg, alpha=cfg.pair_alpha,
                                         temperature=cfg.temperature, **ids)
    else:
      loss, terms = losses_lib.in_batch_softmax_loss(
          query, doc, neg, temperature=cfg.temperature, bidirectional=cfg.bidirectional,
          same_tower_negatives=cfg.same_tower_negatives if cfg.name == 'samtone' else 'none',
          **ids)
    metrics = {'loss': loss, **{f'loss/{k}': v for k, v in terms.items()}}
    metrics.update(losses_lib.in_batch_ranking_metrics(
        query, doc, ids.get('query_ids'), ids.get('doc_ids')))
    return loss, metrics

  def loss_fn(self, params, batch: dict[str, Array], dropout_rng: Optional[Array]):
    """Returns (loss, metrics) for one batch; dropout is on when dropout_rng is given."""
    return self.loss_from_embeddings(self.embed(params, batch, dropout_rng), batch)
