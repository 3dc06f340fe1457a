"""Running a model over many token sequences in length-bucketed, fixed-shape batches.

`map_bucketed` is the generic part: it sorts sequences by token length, cuts
them into batches of one size, pads each batch only to the smallest bucket
length that holds its longest sequence, calls a function on the padded id
batch and puts the results back into input order. Every call sees one of a
few shapes, so a jitted function compiles once per bucket. Dual encoders use
it through `encode_texts` (texts -> vectors); rerankers can call it on
query-document inputs with a scoring function.

`make_encode_fn` turns a model's `encode` for one side into such a function,
data-parallel over the local devices.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from t5dual import partitioning
from t5dual.sides import Side
from t5dual.vocab import EOS_ID, PAD_ID

# numpy int32 ids [B, L] -> numpy [B, ...]; may carry `batch_multiple`, what B must divide by.
BatchFn = Callable[[np.ndarray], np.ndarray]
EncodeFn = BatchFn  # ids [B, L] -> float32 vectors [B, D]


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def default_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` below `max_length`, then `max_length`."""
  buckets, b = [], smallest
  while b < max_length:
    buckets.append(b)
    b *= 2
  return tuple(buckets) + (max_length,)


def map_bucketed(fn: BatchFn, tokens: np.ndarray, batch_size: int,
                 buckets: Optional[Sequence[int]] = None,
                 on_batch: Optional[Callable[[int], None]] = None) -> np.ndarray:
  """fn over all rows of `tokens`, in length-sorted, bucketed batches; results in input order.

  Args:
    fn: padded ids [batch_size', width] int32 -> results [batch_size', ...], where
      batch_size' is `batch_size` rounded up to `fn.batch_multiple` (if set) and
      width is one of the buckets. Spare rows of the last batch hold a lone EOS;
      their results are dropped.
    tokens: [N, L] int32 ids, padded with PAD_ID on the right (N >= 1).
    batch_size: rows per call.
    buckets: allowed widths (default `default_buckets(L)`); L is always one.
    on_batch: called with the number of real rows after each call (progress).

  Returns:
    [N, ...] results of `fn`, row i for tokens[i].
  """
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or not len(tokens):
    raise ValueError(f'tokens must be [N >= 1, length], got shape {tokens.shape}')
  max_length = tokens.shape[1]
  buckets = sorted({b for b in buckets or default_buckets(max_length) if b <= max_length}
                   | {max_length})
  batch_size = round_up(batch_size, getattr(fn, 'batch_multiple', 1))
  lengths = (tokens != PAD_ID).sum(axis=1)
  order = np.argsort(lengths, kind='stable')
  out: Optional[np.ndarray] = None
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = next(b for b in buckets if b >= lengths[rows].max())
    batch = np.zeros((batch_size, width), np.int32)
    batch[:, 0] = EOS_ID
    batch[:len(rows)] = tokens[rows, :width]
    results = np.asarray(fn(batch))[:len(rows)]
    if out is None:
      out = np.empty((len(tokens),) + results.shape[1:], results.dtype)
    out[rows] = results
    if on_batch is not None:
      on_batch(len(rows))
  return out


def encode_texts(encode_fn: EncodeFn, tokenizer, texts: Sequence[str], max_length: int,
                 batch_size: int = 64, buckets: Optional[Sequence[int]] = None,
                 on_batch: Optional[Callable[[int], None]] = None) -> np.ndarray:
  """float32 [len(texts), D] in input order: `texts` tokenized to `max_length`, then
  `map_bucketed`. An empty text is a lone EOS."""
  tokens = tokenizer.encode(list(texts), max_length)
  return map_bucketed(encode_fn, tokens, batch_size, buckets, on_batch).astype(np.float32,
                                                                              copy=False)


def make_encode_fn(model, params, side: 'Side | str',
                   devices: Optional[Sequence[jax.Device]] = None,
                   partitioner: Optional['partitioning.Partitioner'] = None) -> EncodeFn:
  """numpy ids [B, L] -> numpy float32 [B, D] with `model.encode` of one side.

  `side` is a Side or any of its names (query/left/inputs, document/right/targets).
  Parameters are placed by their logical axes and the batch is split over the
  'data' axis of `partitioner` (default: data-parallel over `devices`, or this
  process's local devices; a given partitioner's mesh must hold only this
  process's devices); `encode.batch_multiple` tells callers what the batch
  size must divide by.
  """
  side = Side.parse(side)
  partitioner = partitioner or partitioning.local_data_parallel(devices)
  fn, param_sh = _jitted_encode(model, side, partitioner)
  params = jax.device_put(params, param_sh)
  split = partitioner.batch_sharding(2)

  def encode(ids: np.ndarray) -> np.ndarray:
    return np.asarray(fn(params, jax.device_put(np.asarray(ids, np.int32), split)),
                      np.float32)

  encode.batch_multiple = partitioner.data_parallel
  return encode


_ENCODERS: dict = {}


def _jitted_encode(model, side: Side, partitioner: 'partitioning.Partitioner'):
  """(jitted encoder, parameter shardings) per (model class and config, side,
  partitioner), so that every `make_encode_fn` call reuses its compilations (e.g.
  evaluating before and after training, or several restores of one model)."""
  key = (type(model), model.config, side, partitioner)
  if key not in _ENCODERS:
    logical = model.logical_axes()
    param_sh = partitioner.for_model(model).param_shardings(
        logical, jax.eval_shape(model.init_params, jax.random.PRNGKey(0)))
    split = partitioner.batch_sharding(2)
    _ENCODERS[key] = (partitioner.partition(
        functools.partial(model.encode, side=side.tower), in_shardings=(param_sh, split),
        out_shardings=split), param_sh)
  return _ENCODERS[key]
