"""Checkpoint arrays read on demand: a parameter is only read when it is materialised, and
then, given a `jax.sharding.Sharding`, each device reads only its own slice.

A `LazyArray` is either inline (a numpy array decoded from a msgpack file) or a
TensorStore array (zarr, local or gs://), whose shape and dtype come from its
metadata without reading it. T5X's format version 2 stored bfloat16 arrays as
uint16; `bfloat16_as_uint16` views them back.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts

Sharding = jax.sharding.Sharding


class LazyArray:
  """One checkpoint array, read on demand: inline in the msgpack or a TensorStore array."""

  def __init__(self, name: str, value: Optional[np.ndarray] = None, spec: Optional[dict] = None,
               shape: Optional[Iterable[int]] = None, dtype: Optional[np.dtype] = None,
               bfloat16_as_uint16: bool = False):
    self.name = name
    self.value = None if value is None else np.asarray(value)
    self.spec = spec
    self.bfloat16_as_uint16 = bfloat16_as_uint16
    self._shape = tuple(shape) if shape is not None else None
    self._dtype = dtype
    self._store = None

  def __repr__(self):
    where = 'inline' if self.value is not None else 'tensorstore'
    return f'LazyArray({self.name!r}, {self.shape}, {self.dtype}, {where})'

  def _open(self) -> ts.TensorStore:
    if self._store is None:
      try:
        self._store = ts.open(self.spec, open=True, read=True).result()
      except Exception as e:  # TensorStore raises ValueError with a long spec dump
        raise IOError(f'cannot open the TensorStore array of checkpoint parameter {self.name!r} '
                      f'({self.spec["kvstore"]}): {e}') from e
      if self._shape is not None and tuple(self._store.shape) != self._shape:
        raise ValueError(f'checkpoint parameter {self.name!r}: the msgpack says shape '
                         f'{self._shape} but its TensorStore array has {tuple(self._store.shape)}')
    return self._store

  @property
  def shape(self) -> tuple:
    if self.value is not None:
      return self.value.shape
    if self._shape is None:
      self._shape = tuple(self._open().shape)
    return self._shape

  @property
  def dtype(self) -> np.dtype:
    if self.value is not None:
      return self.value.dtype
    if self._dtype is None:
      self._dtype = np.dtype(self._open().dtype.numpy_dtype)
    if self.bfloat16_as_uint16 and self._dtype == np.uint16:
      return np.dtype(ml_dtypes.bfloat16)
    return self._dtype

  def read(self, index: Any = ()) -> np.ndarray:
    """Reads `self[index]` (a tuple of slices); only that region is fetched from TensorStore."""
    if self.value is not None:
      return self.value[index]
    arr = np.asarray(self._open()[index].read().result())
    if self.bfloat16_as_uint16 and arr.dtype == np.uint16:
      arr = arr.view(ml_dtypes.bfloat16)  # T5X format version 2 stored bfloat16 as uint16
    return arr

  def numpy(self, dtype: Optional[np.dtype] = None) -> np.ndarray:
    arr = self.read()
    return arr if dtype is None else arr.astype(dtype)

  def to_jax(self, sharding: Sharding, dtype: Optional[np.dtype] = None) -> jax.Array:
    """A global jax.Array placed by `sharding`; each device's slice is read separately."""
    cache = {}

    def shard(index):
      key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)
      if key not in cache:  # replicas of a shard read it once
        arr = read_slice(self, index)
        cache[key] = arr if dtype is None else arr.astype(dtype)
      return cache[key]
    return jax.make_array_from_callback(self.shape, sharding, shard)


def read_slice(array: LazyArray, index: tuple) -> np.ndarray:
  """The one function that reads shards for `LazyArray.to_jax` (tests count its calls)."""
  return array.read(index)


def materialize(leaf: Any, sharding: Optional[Sharding] = None,
                dtype: Optional[np.dtype] = None) -> Any:
  """numpy array of a leaf (LazyArray, numpy or jax array), or a jax.Array placed by `sharding`."""
  if isinstance(leaf, LazyArray):
    return leaf.numpy(dtype) if sharding is None else leaf.to_jax(sharding, dtype)
  arr = np.asarray(leaf) if dtype is None else np.asarray(leaf).astype(dtype)
  return arr if sharding is None else jax.device_put(arr, sharding)
