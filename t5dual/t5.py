"""T5 / T5.1.1 encoder and decoder in Flax, with T5X parameter names and logical axis names.

The modules only describe the network. Every parameter is created through
`param_with_axes`, so `partitioning.py` can shard any model built from them
with T5X logical axis rules without touching this file.

Parameter tree of an encoder (names identical to T5X / t5x_retrieval):

  token_embedder/embedding                          [vocab, embed]
  encoder/relpos_bias/rel_embedding                 [heads, relpos_buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale [embed]
  encoder/layers_{i}/attention/{query,key,value}/kernel [embed, joined_kv]
  encoder/layers_{i}/attention/out/kernel           [joined_kv, embed]
  encoder/layers_{i}/pre_mlp_layer_norm/scale       [embed]
  encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel         [embed, mlp]   (T5.1.1, gated GELU)
  encoder/layers_{i}/mlp/wi/kernel                  [embed, mlp]   (T5 1.0, ReLU)
  encoder/layers_{i}/mlp/wo/kernel                  [mlp, embed]
  encoder/encoder_norm/scale                        [embed]

An encoder-decoder (`EncoderDecoder`, T5X's `Transformer`) adds, with the same
shared token_embedder:

  decoder/relpos_bias/rel_embedding                 [heads, relpos_buckets] (causal buckets)
  decoder/layers_{i}/pre_self_attention_layer_norm/scale  [embed]
  decoder/layers_{i}/self_attention/{query,key,value,out}/kernel   (as the encoder's attention)
  decoder/layers_{i}/pre_cross_attention_layer_norm/scale [embed]
  decoder/layers_{i}/encoder_decoder_attention/{query,key,value,out}/kernel
  decoder/layers_{i}/pre_mlp_layer_norm/scale       [embed]
  decoder/layers_{i}/mlp/...                        (as the encoder's mlp)
  decoder/decoder_norm/scale                        [embed]
  decoder/logits_dense/kernel                       [embed, vocab]  (T5.1.1: untied head)

T5 1.0 (`logits_via_embedding=True`) has no logits_dense: the logits are the
decoder output times the token embedding, divided by sqrt(emb_dim) (T5X's
`Embed.attend`; Hugging Face's scale_decoder_outputs with the tied lm_head).

With `T5Config.scan_layers` each stack's layers_{i} become one `layers` subtree
whose parameters carry a leading [num_layers] axis (logical axis 'layers');
`t5dual.layer_layout` converts exactly between the two layouts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from t5dual.attention import ATTENTION_FNS, check_config as check_attention_config
from t5dual.attention import xla_attention
from t5dual.vocab import EOS_ID, PAD_ID  # noqa: F401 (t5.EOS_ID: the vocabulary's ids)

Array = jax.Array

# T5 starts decoding from the padding id.
DECODER_START_ID = PAD_ID


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 encoder or encoder-decoder (T5.1.1 defaults)."""

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  num_layers: int = 8
  # ('gelu', 'linear') is T5.1.1's gated GELU; ('relu',) is T5 1.0.
  mlp_activations: tuple[str, ...] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # Activations and matmuls run in `dtype`; parameters are stored in float32.
  dtype: str = 'bfloat16'
  # Name of an entry of ATTENTION_FNS (attention.py): 'xla' (plain ops, the reference), 'jax_nn'
  # (jax.nn.dot_product_attention), 'cudnn' (cuDNN fused attention on GPUs; needs
  # dtype bfloat16 or float16 and dropout_rate 0: the fused kernel has no dropout).
  attention: str = 'xla'
  # What each layer keeps for the backward pass: a name in REMAT_POLICIES ('none'
  # keeps everything, 'full' recomputes the whole layer).
  remat: str = 'none'
  # True: the layers are one `nn.scan`ned module whose parameters have a leading
  # 'layers' axis (encoder/layers/... [num_layers, ...]); it compiles once per stack
  # instead of once per layer. `layer_layout` converts to and from T5X's layers_{i}.
  scan_layers: bool = False
  # Decoder (encoder-decoder models only). None: as many layers as the encoder.
  num_decoder_layers: Optional[int] = None
  # True for T5 1.0's head tied to the token embedding (rescaled by emb_dim**-0.5);
  # False for T5.1.1's separate decoder/logits_dense.
  logits_via_embedding: bool = False

  def __post_init__(self):
    check_attention_config(self.attention, self.dtype, self.dropout_rate)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'T5Config.remat must be one of {sorted(REMAT_POLICIES)}, got '
                       f'{self.remat!r}')
    if self.num_decoder_layers is not None and self.num_decoder_layers < 1:
      raise ValueError(f'T5Config.num_decoder_layers must be None or >= 1, got '
                       f'{self.num_decoder_layers}')

  @property
  def decoder_layers(self) -> int:
    """Number of decoder layers."""
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @classmethod
  def from_dict(cls, fields: dict) -> 'T5Config':
    """The config `dataclasses.asdict` wrote to JSON (lists back to tuples)."""
    fields = dict(fields)
    fields['mlp_activations'] = tuple(fields['mlp_activations'])
    return cls(**fields)


# Names of intermediate values (`checkpoint_name` tags in the layers) that the
# named remat policies below may keep.
QUERY_PROJ, KEY_PROJ, VALUE_PROJ = 'query_proj', 'key_proj', 'value_proj'  # [B, L, heads, kv]
ATTENTION_OUT = 'attention_out'  # [B, L, embed], after the output projection
MLP_HIDDEN = 'mlp_hidden'        # [B, L, mlp], the (gated) activation

# T5Config.remat: which values of a layer the backward pass keeps rather than
# recomputes. None: no rematerialisation at all.
REMAT_POLICIES: dict[str, Optional[Callable]] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_qkv_proj': jax.checkpoint_policies.save_only_these_names(
        QUERY_PROJ, KEY_PROJ, VALUE_PROJ),
    'save_attention_out': jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    'save_mlp_hidden': jax.checkpoint_policies.save_only_these_names(MLP_HIDDEN),
    # Every projection's output: all that 'dots' keeps but the attention logits.
    'save_projections': jax.checkpoint_policies.save_only_these_names(
        QUERY_PROJ, KEY_PROJ, VALUE_PROJ, ATTENTION_OUT, MLP_HIDDEN),
}

# Logical axis names of activations (T5X's standard_logical_axis_rules name them
# too); `nn.with_logical_constraint` is a no-op unless the partitioner has set
# rules and a mesh, so single-device numerics do not depend on them.
EMBED_ACTIVATION = ('batch', 'length', 'embed')
HEADS_ACTIVATION = ('batch', 'length', 'heads', 'kv')
MLP_ACTIVATION = ('batch', 'length', 'mlp')


# T5.1.1 sizes (vocab 32,128). 'tiny' is for tests and the demo.
SIZES = {
    'tiny': dict(emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128, num_layers=2),
    'small': dict(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024, num_layers=8),
    'base': dict(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048, num_layers=12),
    'large': dict(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816, num_layers=24),
    'xl': dict(emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120, num_layers=24),
    'xxl': dict(emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240, num_layers=24),
}


def t5_config(size: str = 'base', **overrides) -> T5Config:
  """Returns the T5.1.1 config of a named size, with `overrides` applied."""
  if size not in SIZES:
    raise ValueError(f'unknown T5 size {size!r}; choose one of {sorted(SIZES)}')
  return T5Config(**{**SIZES[size], **overrides})


def _act(name: str) -> Callable[[Array], Array]:
  if name == 'gelu':
    return lambda x: nn.gelu(x, approximate=True)  # T5.1.1's "gelu_new"
  if name == 'relu':
    return nn.relu
  if name == 'linear':
    return lambda x: x
  raise ValueError(f'unknown activation {name!r}')


def param_with_axes(module: nn.Module, name: str, init, shape, axes):
  """A float32 parameter of `module` carrying logical axis names (T5X's param_with_axes)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


# --------------------------------------------------------------------------- layers

class Embed(nn.Module):
  """Token embedding [vocab, embed], T5X's `token_embedder`."""

  num_embeddings: int
  features: int
  dtype: str = 'float32'

  def setup(self):
    self.embedding = param_with_axes(self, 'embedding', nn.initializers.normal(stddev=1.0),
                            (self.num_embeddings, self.features), ('vocab', 'embed'))

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, query: Array, vocab_ids: Optional[Array] = None) -> Array:
    """Dot products of `query` [..., embed] with the embeddings, in float32.

    vocab_ids: if given, only these rows of the embedding ([..., len(vocab_ids)]).
    """
    embedding = self.embedding if vocab_ids is None else jnp.take(
        self.embedding, jnp.asarray(vocab_ids), axis=0)
    return jnp.einsum('...d,vd->...v', query.astype(jnp.float32),
                      embedding.astype(jnp.float32))


class LayerNorm(nn.Module):
  """T5 RMS norm: no mean subtraction, no bias, statistics in float32."""

  epsilon: float = 1e-6
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale).astype(self.dtype)


class DenseGeneral(nn.Module):
  """Bias-free dense layer whose kernel carries logical axis names."""

  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: Array, columns: Optional[Array] = None) -> Array:
    """x [..., in] -> [..., features], or [..., len(columns)] for only those outputs."""
    kernel = param_with_axes(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                             self.kernel_axes)
    if columns is not None:
      kernel = jnp.take(kernel, jnp.asarray(columns), axis=1)
    return jnp.einsum('...d,df->...f', x.astype(self.dtype), kernel.astype(self.dtype))


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int, bidirectional: bool = True) -> np.ndarray:
  """T5 bucketing of `memory_position - query_position`.

  Bidirectional (encoder): half of the buckets hold positive offsets. Causal
  (decoder): all buckets hold distances to the past, and future positions share
  bucket 0 with the query's own position (the causal mask hides them anyway).
  Small distances get their own bucket, larger ones share log-spaced buckets up
  to max_distance.
  """
  if bidirectional:
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int32) * num_buckets
    n = np.abs(relative_position)
  else:
    buckets = np.zeros(np.shape(relative_position), np.int32)
    n = np.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide='ignore'):
    large = max_exact + (
        np.log(n.astype(np.float32) / max_exact) / math.log(max_distance / max_exact) *
        (num_buckets - max_exact))
  large = np.minimum(np.where(is_small, 0, large).astype(np.int32), num_buckets - 1)
  return buckets + np.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
  """Relative position bias shared by all layers: [1, heads, q_len, k_len]."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, q_len: int, k_len: int, bidirectional: bool = True) -> Array:
    rel_embedding = param_with_axes(
        self, 'rel_embedding', nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
        (self.num_heads, self.num_buckets), ('heads', 'relpos_buckets'))
    relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance,
                                       bidirectional)
    # One-hot contraction (as in T5X) keeps the gather off the TPU's slow path.
    one_hot = jax.nn.one_hot(buckets, self.num_buckets, dtype=self.dtype)
    values = jnp.einsum('hb,qkb->hqk', rel_embedding.astype(self.dtype), one_hot)
    return values[None]


class MultiHeadAttention(nn.Module):
  """T5 attention: self-attention, or attention from `x` to `inputs_kv` (cross-attention)."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Optional[Array], kv_mask: Optional[Array],
               deterministic: bool, inputs_kv: Optional[Array] = None,
               causal: bool = False) -> Array:
    """Attention from x [B, Lq, embed] to inputs_kv [B, Lk, embed] (default x).

    The pieces of the logits' bias stay apart so that fused kernels can take
    them (see xla_attention): bias [1, heads, Lq, Lk] or None, kv_mask [B, Lk]
    bool (True: a real key) or None, causal.
    """
    cfg = self.config
    kv = x if inputs_kv is None else inputs_kv
    joined = cfg.num_heads * cfg.head_dim
    # 1/sqrt(head_dim) is folded into the query initialisation, as in T5.
    q_init = nn.initializers.variance_scaling(1.0 / math.sqrt(cfg.head_dim), 'fan_in', 'normal')
    kv_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

    def project(name, tag, init, inputs):
      y = DenseGeneral(joined, ('embed', 'joined_kv'), init, cfg.dtype, name=name)(inputs)
      y = y.reshape(y.shape[:-1] + (cfg.num_heads, cfg.head_dim))
      return checkpoint_name(nn.with_logical_constraint(y, HEADS_ACTIVATION), tag)
    q = project('query', QUERY_PROJ, q_init, x)
    k = project('key', KEY_PROJ, kv_init, kv)
    v = project('value', VALUE_PROJ, kv_init, kv)
    if not deterministic and cfg.dropout_rate > 0:
      # Attention-probability dropout needs the explicit softmax (so T5Config refuses
      # 'cudnn' with dropout: it would not run here).
      out = xla_attention(q, k, v, bias, kv_mask, causal, training=True,
                          dropout=lambda w: nn.Dropout(cfg.dropout_rate)(w, deterministic=False))
    else:
      # deterministic=False is a training step (the trainer always passes a dropout key).
      out = ATTENTION_FNS[cfg.attention](q, k, v, bias, kv_mask, causal,
                                         training=not deterministic)
    out = nn.with_logical_constraint(out, HEADS_ACTIVATION)
    out = out.reshape(out.shape[:-2] + (joined,))
    out = DenseGeneral(x.shape[-1], ('joined_kv', 'embed'), kv_init, cfg.dtype, name='out')(out)
    return checkpoint_name(nn.with_logical_constraint(out, EMBED_ACTIVATION), ATTENTION_OUT)


class MlpBlock(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    acts = cfg.mlp_activations
    hidden = None
    for i, act in enumerate(acts):
      name = 'wi' if len(acts) == 1 else f'wi_{i}'
      h = _act(act)(DenseGeneral(cfg.mlp_dim, ('embed', 'mlp'), dtype=cfg.dtype, name=name)(x))
      hidden = h if hidden is None else hidden * h
    hidden = checkpoint_name(nn.with_logical_constraint(hidden, MLP_ACTIVATION), MLP_HIDDEN)
    hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
    out = DenseGeneral(x.shape[-1], ('mlp', 'embed'), dtype=cfg.dtype, name='wo')(hidden)
    # No tag: the backward pass never needs the MLP output (only the residual sum).
    return nn.with_logical_constraint(out, EMBED_ACTIVATION)


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=deterministic)
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_attention_layer_norm')(x)
    x = x + drop(MultiHeadAttention(cfg, name='attention')(h, bias, mask, deterministic))
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_mlp_layer_norm')(x)
    x = x + drop(MlpBlock(cfg, name='mlp')(h, deterministic))
    return nn.with_logical_constraint(x, EMBED_ACTIVATION)


def apply_layers(config: T5Config, layer_cls: type[nn.Module], num_layers: int, x: Array,
                 *args) -> Array:
  """Runs `num_layers` layers `layer_cls(config)(x, *args) -> x` of the calling module.

  Unrolled, layer i is the submodule layers_{i}; with `config.scan_layers` one
  `nn.scan`ned submodule 'layers' holds every parameter with a leading
  [num_layers] axis (logical axis 'layers'), and each layer gets its own dropout
  rng. `config.remat` wraps each layer (inside the scan) in `nn.remat`.

  Args:
    config: the T5Config (remat, scan_layers).
    layer_cls: EncoderLayer or DecoderLayer.
    num_layers: how many layers.
    x: [batch, length, embed] input of the first layer.
    *args: the layer's other arguments, the same for every layer; the last one
      is `deterministic` (a Python bool).
  Returns:
    [batch, length, embed] output of the last layer.
  """
  policy = REMAT_POLICIES[config.remat]
  if config.remat != 'none':
    # `deterministic` (a Python bool, after self, x and the other args) stays static.
    # Inside a scan, the loop already keeps XLA from merging the recomputation
    # with the forward pass, so CSE prevention would only cost speed.
    layer_cls = nn.remat(layer_cls, policy=policy, static_argnums=(len(args) + 1,),
                         prevent_cse=not config.scan_layers)
  if not config.scan_layers:
    for i in range(num_layers):
      x = layer_cls(config, name=f'layers_{i}')(x, *args)
    return x
  scan = nn.scan(lambda layer, carry, *rest: (layer(carry, *rest), None),
                 variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                 in_axes=(nn.broadcast,) * len(args), length=num_layers,
                 metadata_params={nn.PARTITION_NAME: 'layers'})
  x, _ = scan(layer_cls(config, name='layers'), x, *args)
  return x


class Encoder(nn.Module):
  """The T5 encoder stack (T5X's `encoder` scope); embeddings come from outside."""

  config: T5Config

  @nn.compact
  def __call__(self, embedded: Array, mask: Array, deterministic: bool = True) -> Array:
    """Encodes embedded tokens.

    Args:
      embedded: [batch, length, embed] token embeddings.
      mask: [batch, length] bool, True for real tokens.
      deterministic: disables dropout when True.
    Returns:
      [batch, length, embed] hidden states after the final norm.
    """
    cfg = self.config
    length = embedded.shape[1]
    bias = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, cfg.num_heads,
                                  cfg.dtype, name='relpos_bias')(length, length)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        embedded.astype(cfg.dtype), deterministic=deterministic)
    x = nn.with_logical_constraint(x, EMBED_ACTIVATION)
    x = apply_layers(cfg, EncoderLayer, cfg.num_layers, x, bias, mask, deterministic)
    x = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name='encoder_norm')(x)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class DecoderLayer(nn.Module):
  """Causal self-attention, attention to the encoder, MLP; each pre-normed and residual."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array, encoder_mask: Array,
               deterministic: bool) -> Array:
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=deterministic)
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_self_attention_layer_norm')(x)
    x = x + drop(MultiHeadAttention(cfg, name='self_attention')(
        h, self_bias, None, deterministic, causal=True))
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_cross_attention_layer_norm')(x)
    # Attention to the encoder has no position bias, only the padding mask.
    x = x + drop(MultiHeadAttention(cfg, name='encoder_decoder_attention')(
        h, None, encoder_mask, deterministic, inputs_kv=encoded))
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_mlp_layer_norm')(x)
    x = x + drop(MlpBlock(cfg, name='mlp')(h, deterministic))
    return nn.with_logical_constraint(x, EMBED_ACTIVATION)


class Decoder(nn.Module):
  """The T5 decoder stack (T5X's `decoder` scope), teacher-forced over whole sequences.

  There is no key/value cache: rerankers score one decoder step, and training
  feeds the whole shifted target at once.
  """

  config: T5Config
  # The token_embedder of the enclosing model: embeds the decoder inputs and, for
  # T5 1.0, is the output layer too. Its parameters live in the parent's scope.
  shared_embedding: Embed

  @nn.compact
  def __call__(self, encoded: Array, encoder_mask: Array, decoder_input_ids: Array,
               deterministic: bool = True, vocab_ids: Optional[Array] = None) -> Array:
    """Next-token logits at every decoder position.

    Args:
      encoded: [batch, length, embed] encoder output.
      encoder_mask: [batch, length] bool, True for real encoder tokens.
      decoder_input_ids: [batch, steps] int, the targets shifted right behind the
        start token 0. Position t sees positions <= t only, so right padding never
        changes the logits of earlier positions and needs no mask.
      deterministic: disables dropout when True.
      vocab_ids: optional token ids [n]; only their logits are computed.
    Returns:
      [batch, steps, vocab_size] float32 logits, or [batch, steps, n] with vocab_ids.
    """
    cfg = self.config
    steps = decoder_input_ids.shape[1]
    self_bias = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance, cfg.num_heads,
                                       cfg.dtype, name='relpos_bias')(steps, steps, False)
    drop = lambda y: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=deterministic)
    x = drop(self.shared_embedding(decoder_input_ids).astype(cfg.dtype))
    x = nn.with_logical_constraint(x, EMBED_ACTIVATION)
    encoded = nn.with_logical_constraint(encoded.astype(cfg.dtype), EMBED_ACTIVATION)
    x = apply_layers(cfg, DecoderLayer, cfg.decoder_layers, x, encoded, self_bias,
                     encoder_mask, deterministic)
    x = drop(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name='decoder_norm')(x))
    if cfg.logits_via_embedding:
      return self.shared_embedding.attend(x, vocab_ids) / math.sqrt(x.shape[-1])
    return DenseGeneral(cfg.vocab_size, ('embed', 'vocab'), dtype='float32',
                        name='logits_dense')(x, vocab_ids)


class EncoderDecoder(nn.Module):
  """T5 encoder-decoder (T5X's `Transformer`): token_embedder/, encoder/, decoder/."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

  def encode(self, input_ids: Array, deterministic: bool = True) -> Array:
    """[batch, length] ids (0 = padding) -> [batch, length, embed] encoder output."""
    return self.encoder(self.token_embedder(input_ids), input_ids != PAD_ID, deterministic)

  def decode(self, encoded: Array, input_ids: Array, decoder_input_ids: Array,
             deterministic: bool = True, vocab_ids: Optional[Array] = None) -> Array:
    """Logits of the decoder on `encode(input_ids)`; see `Decoder` for the shapes."""
    return self.decoder(encoded, input_ids != PAD_ID, decoder_input_ids, deterministic,
                        vocab_ids)

  def __call__(self, input_ids: Array, decoder_input_ids: Array, deterministic: bool = True,
               vocab_ids: Optional[Array] = None) -> Array:
    """input_ids [batch, length], decoder_input_ids [batch, steps] -> float32 logits
    [batch, steps, vocab_size] (or [batch, steps, len(vocab_ids)])."""
    encoded = self.encode(input_ids, deterministic)
    return self.decode(encoded, input_ids, decoder_input_ids, deterministic, vocab_ids)
