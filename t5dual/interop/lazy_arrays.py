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


_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                       'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
                       'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


class SafetensorsArray(LazyArray):
  """One tensor of a .safetensors file: `read` takes only the region asked for
  (safetensors' get_slice reads it from the memory-mapped file)."""

  def __init__(self, path: str, key: str, shape: Iterable[int], dtype: str):
    super().__init__(key, shape=shape, dtype=np.dtype(_SAFETENSORS_DTYPES[dtype]))
    self.path = path

  def __repr__(self):
    return f'SafetensorsArray({self.name!r}, {self.shape}, {self.dtype}, {self.path})'

  def read(self, index: Any = ()) -> np.ndarray:
    from safetensors import safe_open
    index = tuple(index) if isinstance(index, tuple) else (index,)
    with safe_open(self.path, 'np') as f:
      if not self.shape or all(s == slice(None) for s in index):
        return np.asarray(f.get_tensor(self.name))
      index += (slice(None),) * (len(self.shape) - len(index))
      return np.asarray(f.get_slice(self.name)[index])


def safetensors_arrays(path: str) -> dict[str, SafetensorsArray]:
  """{name: SafetensorsArray} of a .safetensors file, from its header alone."""
  from safetensors import safe_open
  with safe_open(path, 'np') as f:
    out = {}
    for key in f.keys():
      tensor = f.get_slice(key)
      out[key] = SafetensorsArray(path, key, tensor.get_shape(), tensor.get_dtype())
    return out


class TransposedArray(LazyArray):
  """`base.T` (Hugging Face's [out, in] weights as [in, out] kernels), read on demand:
  a region of it is the transposed region of `base`."""

  def __init__(self, base: LazyArray):
    super().__init__(base.name, shape=tuple(base.shape)[::-1], dtype=base.dtype)
    self.base = base

  def __repr__(self):
    return f'TransposedArray({self.base!r})'

  def read(self, index: Any = ()) -> np.ndarray:
    index = tuple(index) if isinstance(index, tuple) else (index,)
    index += (slice(None),) * (len(self.shape) - len(index))
    return self.base.read(index[::-1]).T


def transpose(leaf: Any) -> Any:
  """leaf.T, kept lazy for a LazyArray."""
  return TransposedArray(leaf) if isinstance(leaf, LazyArray) else leaf.T


def read_slice(array: LazyArray, index: tuple) -> np.ndarray:
  """The one function that reads shards for `LazyArray.to_jax` (tests count its calls)."""
  return array.read(index)


def materialize(leaf: Any, sharding: Optional[Sharding] = None,
                dtype: Optional[np.dtype] = None) -> Any:
  """numpy array of a leaf (LazyArray, numpy or jax array), or a jax.Array placed by `sharding`."""
  if isinstance(leaf, LazyArray):
    return leaf.numpy(dtype) if sharding is None else leaf.to_jax(sharding, dtype)
  if sharding is not None and isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    # Created in its layout already (e.g. a fresh projection on a mesh across processes):
    # no process can read it whole, and none needs to.
    leaf = leaf if dtype is None else leaf.astype(dtype)
    return leaf if leaf.sharding == sharding else jax.device_put(leaf, sharding)
  arr = np.asarray(leaf) if dtype is None else np.asarray(leaf).astype(dtype)
  if sharding is None:
    return arr
  from t5dual import partitioning
  return partitioning.place(arr, sharding)
