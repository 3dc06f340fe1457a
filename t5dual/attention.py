"""Attention kernels for t5.py's layers, and how T5Config.attention picks one.

`ATTENTION_FNS` maps the names gin may bind to `t5.t5_config.attention` ('xla',
'jax_nn', 'cudnn') to functions with one signature: unscaled T5-style dot-product
attention of [batch, length, heads, head_dim] inputs with a relative position
bias, a key padding mask and causality. 'xla' is the reference; 'cudnn' routes
each call to cuDNN's fused kernel where it takes the shapes (`cudnn_shapes_ok`)
and to XLA elsewhere. `check_config` holds the settings each kernel needs
(T5Config calls it), so a config that would silently not run a kernel is refused.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t5dual import cli

Array = jax.Array


def mask_bias(allowed: Array) -> Array:
  """Additive float32 attention bias: 0 where `allowed`, a huge negative number elsewhere."""
  return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


def _logit_bias(bias: Optional[Array], kv_mask: Optional[Array], causal: bool,
                q_length: int, kv_length: int) -> Array:
  """The additive float32 bias of `xla_attention`: bias + padding mask + causal mask."""
  total = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias is None else bias.astype(jnp.float32)
  if kv_mask is not None:
    total = total + mask_bias(kv_mask[:, None, None, :])
  if causal:
    total = total + mask_bias(np.tril(np.ones((q_length, kv_length), bool))[None, None])
  return total


def xla_attention(query: Array, key: Array, value: Array, bias: Optional[Array] = None,
                  kv_mask: Optional[Array] = None, causal: bool = False,
                  training: bool = True,
                  dropout: Optional[Callable[[Array], Array]] = None) -> Array:
  """Unscaled dot-product attention, T5 style, in plain XLA ops (the reference).

  Every attention function of ATTENTION_FNS takes the same arguments.

  Args:
    query, key, value: [batch, length, heads, head_dim].
    bias: [1, heads, q_length, kv_length], the relative position bias (the same
      for every row), or None (attention to the encoder has none).
    kv_mask: [batch, kv_length] bool, True for real keys, or None. t5dual's
      sequences are right-padded (pad id 0 only after the last real token),
      which 'cudnn' relies on; 'xla' and 'jax_nn' take any pattern.
    causal: position t attends to positions <= t only (decoder self-attention).
    training: gradients will be taken (the trainer's step: deterministic=False);
      'cudnn' routes by it, as cuDNN's backward pass takes fewer shapes.
    dropout: optional function applied to the attention weights (training).
  Returns:
    [batch, q_length, heads, head_dim] in the dtype of `value`. A row whose keys
    are all masked (a padding row) gets finite values: it attends uniformly.
  """
  del training  # any shape
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key, preferred_element_type=jnp.float32)
  bias = _logit_bias(bias, kv_mask, causal, query.shape[1], key.shape[1])
  weights = jax.nn.softmax(logits + bias, axis=-1)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(value.dtype), value)


def jax_nn_attention(query: Array, key: Array, value: Array, bias: Optional[Array] = None,
                     kv_mask: Optional[Array] = None, causal: bool = False,
                     training: bool = True) -> Array:
  """`jax.nn.dot_product_attention` (XLA) with the bias, mask and causality kept apart."""
  del training  # any shape
  return jax.nn.dot_product_attention(
      query, key, value, bias=None if bias is None else bias.astype(query.dtype),
      mask=None if kv_mask is None else kv_mask[:, None, None, :], is_causal=causal,
      scale=1.0)


# cuDNN's fused attention (jax 0.10-0.11, `check_is_flash_attention` in
# jax/_src/cudnn/fused_attention_stablehlo.py): bf16 / fp16 only, head_dim a multiple of 8
# and at most 128 (256 from Hopper on; 128 is kept for every GPU), and in training even
# query and key lengths. jax's rule reads "with a bias", but its training path checks a
# placeholder that is never None, so every training call counts as biased: the reranker's
# one-step decoder (query length 1) must use XLA there, with or without a bias.
CUDNN_DTYPES = ('bfloat16', 'float16')
CUDNN_MAX_HEAD_DIM = 128


def cudnn_shapes_ok(query: Array, key: Array, bias: Optional[Array],
                    training: bool = True) -> bool:
  """Whether cuDNN's fused kernel takes these shapes (else `cudnn_attention` uses XLA).

  query, key: [batch, length, heads, head_dim]; training: gradients will be taken.
  tests/test_attention.py holds this equal to jax's own check for the models' lengths.
  """
  del bias  # jax's training path counts every call as biased (see above)
  head_dim = query.shape[-1]
  even = query.shape[1] % 2 == 0 and key.shape[1] % 2 == 0
  return (jnp.dtype(query.dtype).name in CUDNN_DTYPES and head_dim % 8 == 0
          and head_dim <= CUDNN_MAX_HEAD_DIM and (even or not training))


@functools.cache
def cudnn_unavailable() -> Optional[str]:
  """Why cuDNN's fused attention cannot run in this process, or None when it can."""
  backend = jax.default_backend()
  if backend != 'gpu':
    return f"JAX's backend is {backend!r}, not a CUDA GPU"
  from jax._src.cudnn import fused_attention_stablehlo
  try:
    fused_attention_stablehlo.check_cudnn_version()
  except RuntimeError as e:  # "cuDNN is not detected." (no CUDA plugin, or ROCm)
    return str(e).rstrip('.')
  return None


def check_cudnn_available() -> None:
  """A one-line ConfigError where attention='cudnn' cannot run (instead of jax's 33 lines)."""
  reason = cudnn_unavailable()
  if reason:
    raise cli.ConfigError(
        f"T5Config.attention 'cudnn' needs cuDNN, which this process lacks ({reason}): set "
        f"t5.t5_config.attention = 'xla' (or 'jax_nn'), or run on an NVIDIA GPU with the "
        f"'cuda' extra installed")


def seq_length_attention(query: Array, key: Array, value: Array, bias: Optional[Array] = None,
                         kv_mask: Optional[Array] = None, causal: bool = False,
                         implementation: Optional[str] = None, training: bool = True) -> Array:
  """`jax.nn.dot_product_attention` with padding given as key lengths, not as a mask.

  This is the form cuDNN's fused (flash) attention runs: the [1, heads, Lq, Lk]
  relative position bias stays broadcast over the batch, and the padding is a
  length per row, so no [batch, heads, Lq, Lk] bias is ever built. It relies on
  right padding: the length is the count of real keys. A row without any real
  key gets length 1 (cuDNN's result for 0 is undefined); such padding rows come
  out finite and are masked downstream. (`training` is the kernels' common argument.)
  """
  del training
  lengths = None
  if kv_mask is not None:
    lengths = jnp.maximum(jnp.sum(kv_mask, axis=-1, dtype=jnp.int32), 1)
  return jax.nn.dot_product_attention(
      query, key, value, bias=None if bias is None else bias.astype(query.dtype),
      key_value_seq_lengths=lengths, is_causal=causal, scale=1.0,
      implementation=implementation)


def cudnn_attention(query: Array, key: Array, value: Array, bias: Optional[Array] = None,
                    kv_mask: Optional[Array] = None, causal: bool = False,
                    training: bool = True) -> Array:
  """cuDNN fused attention where it takes the shapes, XLA elsewhere (e.g. in training, a
  reranker's one-step decoder: query length 1, odd)."""
  if cudnn_shapes_ok(query, key, bias, training):
    check_cudnn_available()
    return seq_length_attention(query, key, value, bias, kv_mask, causal, 'cudnn')
  return jax_nn_attention(query, key, value, bias, kv_mask, causal)


ATTENTION_FNS: dict[str, Callable[..., Array]] = {
    'xla': xla_attention,
    'jax_nn': jax_nn_attention,
    'cudnn': cudnn_attention,
}


def check_config(attention: str, dtype: str, dropout_rate: float) -> None:
  """Raises ValueError (naming the T5Config field) where kernel `attention` cannot run
  a model of this `dtype` and `dropout_rate`."""
  if attention not in ATTENTION_FNS:
    raise ValueError(f'T5Config.attention must be one of {sorted(ATTENTION_FNS)}, got '
                     f'{attention!r}')
  if attention == 'cudnn' and dtype not in CUDNN_DTYPES:
    raise ValueError(f"T5Config.attention 'cudnn' needs dtype one of {CUDNN_DTYPES} "
                     f'(cuDNN fused attention has no float32 kernel), got {dtype!r}')
  if attention == 'cudnn' and dropout_rate > 0:
    # jax.nn.dot_product_attention has no dropout: training would silently run XLA.
    raise ValueError(
        f"T5Config.attention 'cudnn' has no attention dropout, but dropout_rate is "
        f"{dropout_rate}: set DROPOUT_RATE = 0.0 (t5.t5_config.dropout_rate) or "
        f"t5.t5_config.attention = 'xla'")
