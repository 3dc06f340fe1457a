"""Scanned <-> unrolled layouts of T5 layer parameters, exactly.

With `T5Config.scan_layers` the layers of a stack are one scanned module, so a
parameter tree holds

  encoder/layers/attention/query/kernel        [num_layers, embed, joined_kv]

where T5X (and every reader and writer in `t5dual.interop`) expects

  encoder/layers_{i}/attention/query/kernel    [embed, joined_kv]   for each i.

These functions convert whole trees in either direction wherever the stacks sit
(encoder/ and decoder/ of an encoder-decoder, left_tower/encoder/ of an ADE dual
encoder, ...): a node's child named 'layers' that is a subtree is a scanned
stack, children named layers_0 ... layers_{n-1} are unrolled layers. Slicing and
stacking copy values unchanged, so a round trip is bitwise exact.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SCANNED = 'layers'
_UNROLLED = re.compile(r'layers_(\d+)$')


def _take(leaf: Any, i: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=_layer_sharding(leaf))
  return leaf[i]


def _layer_sharding(stacked: jax.ShapeDtypeStruct) -> Any:
  """One layer's NamedSharding: the stack's with its leading [num_layers] entry dropped."""
  sharding = getattr(stacked, 'sharding', None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (len(stacked.shape) - len(sharding.spec))
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))


def _stack(leaves: list[Any]) -> Any:
  if isinstance(leaves[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _num_layers(stack: Mapping, where: str) -> int:
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(stack)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f'{where}: a scanned stack needs one leading [num_layers] axis on every '
                     f'parameter, found leading sizes {sorted(map(str, sizes))}')
  return sizes.pop()


def scan_to_unrolled(params: Mapping, _where: str = '') -> dict:
  """Splits every scanned stack `.../layers/...` [L, ...] into `.../layers_{i}/...` [...].

  Args:
    params: nested mappings of arrays (numpy, jax or `jax.ShapeDtypeStruct`).
  Returns:
    The same tree as nested dicts with every stack unrolled; other leaves are
    the same objects.
  """
  out = {}
  for key, value in params.items():
    where = f'{_where}{key}'
    if not isinstance(value, Mapping):
      out[key] = value
    elif key == SCANNED:
      if any(_UNROLLED.match(k) for k in params):
        raise ValueError(f'{where} sits beside unrolled layers_{{i}}; a tree has one layout')
      for i in range(_num_layers(value, where)):
        out[f'layers_{i}'] = jax.tree.map(lambda leaf: _take(leaf, i), dict(value))
    else:
      out[key] = scan_to_unrolled(value, where + '/')
  return out


def unrolled_to_scan(params: Mapping, _where: str = '') -> dict:
  """Stacks every run of `.../layers_{i}/...` [...] into `.../layers/...` [L, ...].

  Args:
    params: nested mappings of arrays (numpy, jax or `jax.ShapeDtypeStruct`).
  Returns:
    The same tree as nested dicts with every stack scanned.
  Raises:
    ValueError: layer numbers with a gap, or layers whose parameters differ in
      names or shapes (naming the first offending path).
  """
  out, layers = {}, {}
  for key, value in params.items():
    where = f'{_where}{key}'
    if (m := _UNROLLED.match(key)) and isinstance(value, Mapping):
      layers[int(m.group(1))] = value
    elif isinstance(value, Mapping):
      out[key] = unrolled_to_scan(value, where + '/')
    else:
      out[key] = value
  if not layers:
    return out
  if SCANNED in out:
    raise ValueError(f'{_where}{SCANNED} sits beside unrolled layers_{{i}}; a tree has one layout')
  if sorted(layers) != list(range(len(layers))):
    raise ValueError(f'{_where}layers_{{i}} must be numbered 0..{len(layers) - 1}, found '
                     f'{sorted(layers)}')
  first = jax.tree_util.tree_structure(dict(layers[0]))
  shapes = [np.shape(x) for x in jax.tree.leaves(layers[0])]
  for i in range(1, len(layers)):
    if (jax.tree_util.tree_structure(dict(layers[i])) != first or
        [np.shape(x) for x in jax.tree.leaves(layers[i])] != shapes):
      raise ValueError(f'{_where}layers_{i} has other parameters or shapes than '
                       f'{_where}layers_0, so they cannot be stacked')
  out[SCANNED] = jax.tree.map(lambda *leaves: _stack(list(leaves)),
                              *[dict(layers[i]) for i in range(len(layers))])
  return out


def unscanned_model(model):
  """`model` rebuilt with `T5Config.scan_layers` off (itself if it is off already).

  Checkpoint formats (T5X, Hugging Face, sentence-transformers) name layers
  layers_{i}: interop maps into and out of the unrolled twin and converts with
  the functions above, so scanned models read and write every format.
  """
  from t5dual import model_api
  if not isinstance(model, model_api.T5Model) or not model.t5_config.scan_layers:
    return model
  return model.with_t5(scan_layers=False)

