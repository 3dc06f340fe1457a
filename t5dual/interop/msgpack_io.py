"""flax.serialization's msgpack encoding, read and written without flax: the format of
T5X's `checkpoint` files.

numpy arrays are msgpack ExtType 1 (shape, dtype name, bytes), complex numbers
ExtType 2, numpy scalars ExtType 3; arrays over 1 GiB are split into
'__msgpack_chunked_array__' nodes. bfloat16 is stored under its name
('bfloat16') and read back as ml_dtypes.bfloat16.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import msgpack
import numpy as np


def dtype_from_name(name: str) -> np.dtype:
  """numpy dtype of a dtype name as flax and T5X's TensorStore metadata write it."""
  return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


def _ext_unpack(code: int, data: bytes):
  """flax.serialization's msgpack extension types: 1 ndarray, 2 complex, 3 numpy scalar."""
  if code in (1, 3):
    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    arr = np.frombuffer(buffer, dtype_from_name(dtype.decode())).reshape(shape)
    return arr if code == 1 else arr[()]
  if code == 2:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  return msgpack.ExtType(code, data)


def _ext_pack(obj):
  if isinstance(obj, (np.ndarray, np.generic)):
    arr = np.asarray(obj)
    payload = msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes('C')), use_bin_type=True)
    return msgpack.ExtType(1 if isinstance(obj, np.ndarray) else 3, payload)
  raise TypeError(f'cannot write {type(obj).__name__} into a T5X msgpack file')


def _unchunk(tree):
  """Reassembles flax's '__msgpack_chunked_array__' leaves (arrays over 1 GiB)."""
  if isinstance(tree, dict):
    if '__msgpack_chunked_array__' in tree:
      shape = tuple(tree['shape'][str(i)] for i in range(len(tree['shape'])))
      chunks = [tree['chunks'][str(i)] for i in range(len(tree['chunks']))]
      return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}
  return tree


def decode_msgpack(raw: bytes) -> Any:
  """Decodes a flax / T5X msgpack file (numpy leaves)."""
  return _unchunk(msgpack.unpackb(raw, ext_hook=_ext_unpack, raw=False, strict_map_key=False))


def encode_msgpack(tree: Any) -> bytes:
  """Encodes a tree of dicts, numbers, strings and numpy arrays like flax.serialization."""
  return msgpack.packb(tree, default=_ext_pack, strict_types=True)
