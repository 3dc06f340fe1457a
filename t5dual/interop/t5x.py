"""T5X checkpoints: read them (msgpack + TensorStore, or orbax), write them, map them into t5dual.

Layouts read (local paths or gs://):

  msgpack   CKPT/checkpoint_<step>/checkpoint holds, with flax's msgpack encoding,
            {'version': 2 or 3, 'optimizer': {'target': params, 'state': {...}}}.
            Small arrays are inline (msgpack ExtType 1: shape, dtype name, bytes);
            large ones are TensorStore specs {'driver': 'zarr', 'kvstore': {'driver':
            'file' | 'gfile' | 'gcs', 'path': 'target.encoder.layers_0....'}, 'metadata':
            {...}} whose path is relative to the checkpoint directory. Version 2 wrote
            bfloat16 arrays as uint16; version 3 writes them natively.
  orbax     CKPT/checkpoint_<step>/state/ written by orbax's PyTree handler for T5X's
            train-state dict {'target': params, 'state': {'step', 'param_states'}}:
            `_METADATA` (JSON tree) and one zarr array per leaf, named by the leaf's
            keys joined with '.', inside an OCDBT database or as plain folders.

Arrays are opened lazily (`LazyArray`): nothing is read until a parameter is
materialised, and with a `jax.sharding.Sharding` each device reads only its own
slice from TensorStore, so an XXL checkpoint never needs a full host copy.

`write_checkpoint` writes the msgpack layout (format version 3) that T5X restores.

`dual_encoder_from_tree` maps any T5X-named parameter tree (a t5x_retrieval
dual encoder, a T5 encoder-decoder, a t5dual tree, or a Hugging Face model
converted by `hf.t5x_tree_from_hf`) into a t5dual dual encoder of any
architecture; for ADE / ADE-SPL a single-tower checkpoint goes into both towers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import jax
import ml_dtypes
import msgpack
import numpy as np
import tensorstore as ts

from t5dual import models, partitioning, t5

VERSION = 3
_CHUNK_BYTES = 64 * 1024 * 1024  # T5X's desired TensorStore chunk size
_ORBAX_PLACEHOLDER = 'PLACEHOLDER://'
_GCS_DUMMY_BUCKET = 't5x-dummy-bucket'

Sharding = jax.sharding.Sharding
# A Mesh (t5dual's logical axis rules place every parameter), a Sharding for every
# parameter, a tree of them shaped like the t5dual params, or a function
# (parameter path 'a/b/c', shape) -> Sharding.
ShardingsLike = Union[jax.sharding.Mesh, Sharding, Mapping, Callable[[str, tuple], Sharding],
                      None]


# --------------------------------------------------------------------------- locations

def _is_gcs(path: str) -> bool:
  return path.startswith('gs://')


def _join(base: str, *parts: str) -> str:
  if _is_gcs(base):
    return '/'.join([base.rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(base, *parts)


def _kvstore(path: str) -> dict:
  """TensorStore kvstore spec of a local path or a gs://bucket/path (a directory ends with '/')."""
  m = re.fullmatch(r'gs://([^/]+)/?(.*)', path, re.DOTALL)
  if m:
    return {'driver': 'gcs', 'bucket': m.group(1), 'path': m.group(2)}
  return {'driver': 'file', 'path': os.path.abspath(path) + ('/' if path.endswith('/') else '')}


def _read_file(path: str) -> Optional[bytes]:
  """Contents of a file (local or gs://), or None when it does not exist."""
  directory, name = path.rsplit('/', 1) if _is_gcs(path) else os.path.split(os.path.abspath(path))
  store = ts.KvStore.open(_kvstore(directory + '/')).result()
  result = store.read(name).result()
  return bytes(result.value) if result.state == 'value' else None


def _write_file(path: str, data: bytes) -> None:
  directory, name = path.rsplit('/', 1) if _is_gcs(path) else os.path.split(os.path.abspath(path))
  ts.KvStore.open(_kvstore(directory + '/')).result().write(name, data).result()


def _list_files(directory: str) -> list[str]:
  store = ts.KvStore.open(_kvstore(directory.rstrip('/') + '/')).result()
  return [k.decode() for k in store.list().result()]


# --------------------------------------------------------------------------- flax msgpack

def _dtype_from_name(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


def _ext_unpack(code: int, data: bytes):
  """flax.serialization's msgpack extension types: 1 ndarray, 2 complex, 3 numpy scalar."""
  if code in (1, 3):
    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    arr = np.frombuffer(buffer, _dtype_from_name(dtype.decode())).reshape(shape)
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


# --------------------------------------------------------------------------- lazy arrays

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


# --------------------------------------------------------------------------- trees

def flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten(v, path + '/'))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def to_numpy(tree: Mapping, dtype: Optional[np.dtype] = None) -> dict:
  """Reads every LazyArray of a tree into host memory."""
  return unflatten({k: materialize(v, None, dtype) for k, v in flatten(tree).items()})


# --------------------------------------------------------------------------- reading

@dataclasses.dataclass
class T5XCheckpoint:
  """An opened checkpoint; `target` and `state` hold LazyArray leaves."""

  path: str      # directory holding the arrays
  layout: str    # 'msgpack' or 'orbax'
  version: int   # T5X msgpack format version (0 for orbax)
  step: Optional[int]
  target: dict   # model parameters
  state: dict    # the rest, read only when asked: {'state': {'step', 'param_states'}}


def _is_ts_spec(node: Any) -> bool:
  return isinstance(node, dict) and 'driver' in node and ('kvstore' in node or 'path' in node)


def _resolve_spec(spec: dict, ckpt_dir: str) -> tuple[dict, Optional[tuple], Optional[np.dtype]]:
  """Opens-ready spec of a relative T5X TensorStore spec; also its recorded shape and dtype."""
  spec = copy.deepcopy(spec)
  metadata = spec.pop('metadata', {}) or {}
  if 'kvstore' in spec:  # tensorstore >= 0.1.14
    kv = spec['kvstore']
    rel = kv.get('path')
    if not isinstance(kv, dict) or rel is None:
      raise ValueError(f'unsupported TensorStore spec in the checkpoint: {spec}')
    if kv.get('driver') not in ('file', 'gfile', 'gcs'):
      raise ValueError(f'unsupported TensorStore kvstore driver {kv.get("driver")!r}')
  else:
    rel = spec.pop('path')
  shape = tuple(metadata['shape']) if 'shape' in metadata else None
  dtype = _dtype_from_name(metadata['dtype']) if isinstance(metadata.get('dtype'), str) else None
  opened = {'driver': spec['driver'], 'kvstore': _kvstore(_join(ckpt_dir, rel))}
  return opened, shape, dtype


def _lazy_tree(node: Any, ckpt_dir: str, version: int, name: str = '') -> Any:
  """Replaces arrays and TensorStore references by LazyArrays."""
  if _is_ts_spec(node):
    spec, shape, dtype = _resolve_spec(node, ckpt_dir)
    return LazyArray(name, spec=spec, shape=shape, dtype=dtype,
                     bfloat16_as_uint16=version < 3)
  if isinstance(node, dict):
    return {k: _lazy_tree(v, ckpt_dir, version, f'{name}/{k}' if name else str(k))
            for k, v in node.items()}
  if isinstance(node, str) and node.startswith(_ORBAX_PLACEHOLDER):  # early orbax aggregate file
    rel = node[len(_ORBAX_PLACEHOLDER):]
    return LazyArray(name, spec={'driver': 'zarr', 'kvstore': _kvstore(_join(ckpt_dir, rel))})
  if isinstance(node, (np.ndarray, np.generic, int, float, bool)):
    return LazyArray(name, value=np.asarray(node))
  return node


def _split_state(contents: dict, where: str) -> tuple[int, dict]:
  version = int(contents.get('version', 0)) if isinstance(contents, dict) else 0
  if version == 1 or version > VERSION:
    raise ValueError(f'{where}: T5X checkpoint format version {version} is not supported '
                     '(versions 2 and 3 are)')
  state = contents.get('optimizer', contents) if version else contents
  if not isinstance(state, dict) or 'target' not in state:
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f'{where}: no parameters found (expected optimizer/target; top-level keys '
                     f'{keys})')
  return version, state


def _step_of(path: str) -> Optional[int]:
  m = re.search(r'checkpoint_(\d+)', path)
  return int(m.group(1)) if m else None


def _open_msgpack(ckpt_dir: str, raw: bytes) -> T5XCheckpoint:
  where = _join(ckpt_dir, 'checkpoint')
  try:
    contents = decode_msgpack(raw)
  except Exception as e:
    if raw.startswith(b'model_checkpoint_path'):
      raise ValueError(f'{where} is a TensorFlow checkpoint index, not a T5X checkpoint') from e
    raise ValueError(f'{where} is not a msgpack T5X checkpoint: {e}') from e
  version, state = _split_state(contents, where)
  tree = _lazy_tree(state, ckpt_dir, version)
  return T5XCheckpoint(ckpt_dir, 'msgpack', version, _step_of(ckpt_dir), tree['target'],
                       {k: v for k, v in tree.items() if k != 'target'})


def _open_orbax(state_dir: str, metadata: dict) -> T5XCheckpoint:
  """Reads orbax's `_METADATA` tree; every array is a zarr array named by its keys."""
  driver = 'zarr3' if metadata.get('use_zarr3') else 'zarr'
  base = _kvstore(state_dir.rstrip('/') + '/')
  flat = {}
  for entry in metadata['tree_metadata'].values():
    keys = [str(k['key']) for k in entry['key_metadata']]
    value_type = entry.get('value_metadata', {}).get('value_type', '')
    name = '.'.join(keys)
    if value_type not in ('np.ndarray', 'jax.Array', 'scalar'):
      continue  # strings and empty nodes carry no parameters
    if metadata.get('use_ocdbt'):
      kv = {'driver': 'ocdbt', 'base': base, 'path': name + '/'}
    else:
      kv = _kvstore(_join(state_dir, name) + '/')
    flat['/'.join(keys)] = LazyArray('/'.join(keys), spec={'driver': driver, 'kvstore': kv})
  # Old orbax versions kept small leaves in a msgpack 'checkpoint' file next to _METADATA.
  raw = _read_file(_join(state_dir, 'checkpoint'))
  if raw is not None:
    for path, leaf in flatten(_lazy_tree(decode_msgpack(raw), state_dir, 0)).items():
      if isinstance(leaf, LazyArray) and leaf.value is not None:
        flat[path] = leaf
  tree = unflatten(flat)
  if 'target' not in tree:
    raise ValueError(f'{state_dir}: orbax checkpoint has no "target" (top-level keys '
                     f'{sorted(tree)}); is it a T5X checkpoint?')
  step = _step_of(state_dir)
  return T5XCheckpoint(state_dir, 'orbax', 0, step, tree['target'],
                       {k: v for k, v in tree.items() if k != 'target'})


def open_checkpoint(path: str) -> T5XCheckpoint:
  """Opens a T5X checkpoint without reading its arrays.

  `path` is a checkpoint directory (checkpoint_<step>), its msgpack `checkpoint`
  file, an orbax `state` directory, or a directory of checkpoint_<step>
  directories (the latest is taken); local or gs://.
  """
  path = path.rstrip('/')
  if path.endswith('/checkpoint') or path == 'checkpoint':
    raw = _read_file(path)
    if raw is not None:
      return _open_msgpack(path.rsplit('/', 1)[0] if '/' in path else '.', raw)
  for state_dir in (_join(path, 'state'), path):
    meta = _read_file(_join(state_dir, '_METADATA'))
    if meta is not None:
      return _open_orbax(state_dir, json.loads(meta))
  raw = _read_file(_join(path, 'checkpoint'))
  if raw is not None:
    return _open_msgpack(path, raw)
  if _is_gcs(path) or os.path.isdir(path):
    steps = sorted({int(m.group(1)) for f in _list_files(path)
                    if (m := re.match(r'checkpoint_(\d+)/(checkpoint|state/_METADATA)$', f))})
    if steps:
      return open_checkpoint(_join(path, f'checkpoint_{steps[-1]}'))
  raise FileNotFoundError(f'no T5X checkpoint at {path} (looked for checkpoint, state/_METADATA '
                          'and checkpoint_<step>/ directories)')


def is_t5x_checkpoint(path: str) -> bool:
  try:
    open_checkpoint(path)
    return True
  except (FileNotFoundError, ValueError):
    return False


def load_tree(path: str, include_optimizer_state: bool = False,
              dtype: Optional[np.dtype] = None) -> Union[dict, tuple[dict, dict]]:
  """The whole parameter tree of a checkpoint as nested dicts of numpy arrays.

  For an encoder-decoder this is token_embedder/, encoder/ and decoder/ (with
  decoder/logits_dense for untied T5.1.1). With include_optimizer_state, returns
  (params, rest) where rest is {'state': {'step', 'param_states'}} (and any
  other top-level entry of the checkpoint).
  """
  ckpt = open_checkpoint(path)
  params = to_numpy(ckpt.target, dtype)
  return (params, to_numpy(ckpt.state)) if include_optimizer_state else params


# --------------------------------------------------------------------------- writing

def _chunk_shape(shape: tuple, itemsize: int) -> list[int]:
  """Largest chunk dividing `shape` within 64 MiB, halving the largest dimension first (T5X)."""
  factors = [[i for i in range(1, d + 1) if d % i == 0] for d in shape]
  while math.prod(f[-1] for f in factors) * itemsize > _CHUNK_BYTES:
    dim = max(range(len(shape)), key=lambda i: factors[i][-1])
    factors[dim].pop()
  return [f[-1] for f in factors]


def _write_tensorstore(ckpt_dir: str, name: str, arr: Any) -> dict:
  """Writes one array as gzip zarr under ckpt_dir/name; returns its relative spec."""
  shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
  kvstore = ({'driver': 'gcs', 'bucket': _GCS_DUMMY_BUCKET, 'path': name} if _is_gcs(ckpt_dir)
             else {'driver': 'file', 'path': name})
  spec = {'driver': 'zarr', 'dtype': dtype.name, 'kvstore': kvstore,
          'metadata': {'compressor': {'id': 'gzip'}, 'shape': list(shape),
                       'chunks': _chunk_shape(shape, dtype.itemsize) if shape else []}}
  absolute = {**copy.deepcopy(spec), 'kvstore': _kvstore(_join(ckpt_dir, name))}
  store = ts.open(absolute, create=True, open=True).result()
  if isinstance(arr, jax.Array) and not arr.is_fully_replicated:
    for s in arr.addressable_shards:  # shard by shard: no host copy of the whole array
      if s.replica_id == 0:
        store[s.index].write(np.asarray(s.data)).result()
  else:
    store.write(np.asarray(arr)).result()
  return spec


def write_checkpoint(ckpt_dir: str, params: Mapping, step: int = 0,
                     optimizer_state: Optional[Mapping] = None,
                     tensorstore_min_bytes: int = 4096) -> str:
  """Writes `params` as a T5X checkpoint (format version 3); returns the directory.

  Parameters of at least `tensorstore_min_bytes` go to gzip zarr arrays named
  `target.<dotted.path>` with paths relative to `ckpt_dir`; smaller ones, and
  the optimizer state, are inline in the msgpack `checkpoint` file. Sharded
  jax.Arrays are written shard by shard. Local directories are written under a
  temporary name and renamed when complete. Single-process: multi-host jobs
  should gather to one process first.
  """
  ckpt_dir = ckpt_dir.rstrip('/')
  if _read_file(_join(ckpt_dir, 'checkpoint')) is not None:
    raise FileExistsError(f'{ckpt_dir} already holds a checkpoint')
  work_dir = ckpt_dir if _is_gcs(ckpt_dir) else f'{ckpt_dir}.tmp-{int(time.time())}'

  def target(path: str, leaf):
    name = 'target.' + path.replace('/', '.')
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    if leaf.ndim and nbytes >= tensorstore_min_bytes:
      return _write_tensorstore(work_dir, name, leaf)
    return np.asarray(leaf)

  written = unflatten({k: target(k, v) for k, v in flatten(params).items()})
  state = {'step': np.asarray(step, np.int32)}
  if optimizer_state is not None:
    state['param_states'] = unflatten(
        {k: np.asarray(v) for k, v in flatten(optimizer_state).items()})
  contents = {'version': VERSION, 'optimizer': {'target': written, 'state': state}}
  _write_file(_join(work_dir, 'checkpoint'), encode_msgpack(contents))
  if work_dir != ckpt_dir:
    os.makedirs(os.path.dirname(os.path.abspath(ckpt_dir)), exist_ok=True)
    os.rename(work_dir, ckpt_dir)
  return ckpt_dir


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


def _source_towers(flat: Mapping[str, Any]) -> tuple[str, str, Optional[str], Optional[str]]:
  """Prefixes of the left / right encoders and projections of a source tree."""
  has = lambda prefix: any(p.startswith(prefix) for p in flat)
  if has('left_tower/') and has('right_tower/'):
    left, right = 'left_tower/', 'right_tower/'
  elif has('encoder/'):
    left = right = ''
  else:
    raise ValueError('checkpoint has no encoder/ (nor left_tower/ and right_tower/); top-level '
                     f'entries: {sorted({p.split("/")[0] for p in flat})}')
  def projection(tower):
    for prefix in (f'{tower}projection_layer/', 'projection_layer/'):
      if has(prefix):
        return prefix
    return None
  return left, right, projection(left), projection(right)


def _prefix_rules(flat: Mapping[str, Any], architecture: str) -> list[tuple[str, str]]:
  """(t5dual prefix, source prefix) pairs."""
  left, right, lproj, rproj = _source_towers(flat)
  tower = lambda dst, src: [(f'{dst}token_embedder/', f'{src}token_embedder/'),
                            (f'{dst}encoder/', f'{src}encoder/')]
  proj = lambda dst, src: [(f'{dst}projection_layer/', src)] if src else []
  if architecture == 'sde':
    return tower('', left) + proj('', lproj)
  if architecture == 'ade':
    return (tower('left_tower/', left) + proj('left_tower/', lproj) +
            tower('right_tower/', right) + proj('right_tower/', rproj))
  if architecture == 'ade_spl':
    return tower('left_tower/', left) + tower('right_tower/', right) + proj('', lproj)
  raise ValueError(f'unknown architecture {architecture!r}')


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
    match = next(((d, s) for d, s in rules if path.startswith(d)), None)
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
  scopes = {s for _, s in rules}
  for path in sorted(set(src) - used):
    if any(path.startswith(s) for s in scopes):
      errors.append(f'checkpoint parameter {path} has no counterpart in the t5dual '
                    f'{architecture} model')
    else:
      report.skipped.append(path)
  if errors:
    raise ValueError('cannot map the checkpoint:\n  ' + '\n  '.join(errors))
  return assignment, report


def _sharding_for(shardings: ShardingsLike, flat_shardings: Optional[dict], path: str,
                  shape: tuple) -> Optional[Sharding]:
  if shardings is None:
    return None
  if isinstance(shardings, Sharding):
    return shardings
  if flat_shardings is not None:
    if path not in flat_shardings:
      raise KeyError(f'no sharding given for parameter {path}')
    return flat_shardings[path]
  return shardings(path, shape)


def dual_encoder_from_tree(
    source: Mapping, config: Optional[models.DualEncoderConfig] = None, *,
    architecture: str = 'sde', t5_config: Optional[t5.T5Config] = None,
    init_params: Optional[Mapping] = None, shardings: ShardingsLike = None,
    param_dtype: np.dtype = np.float32, seed: int = 0, **t5_overrides
) -> tuple[dict, models.DualEncoderConfig, MappingReport]:
  """t5dual dual-encoder params from a T5X-named tree (LazyArray, numpy or jax leaves).

  Args:
    source: e.g. `open_checkpoint(path).target`: a t5x_retrieval dual encoder
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
    left, _, proj, _ = _source_towers(flat)
    tower = {k[len(left):]: v for k, v in flat.items() if k.startswith(left)}
    t5c = dataclasses.replace(t5_config or infer_t5_config(unflatten(tower)), **t5_overrides)
    kwargs = {'projection_dim': flat[proj + 'kernel'].shape[1]} if proj else {}
    config = models.DualEncoderConfig(t5=t5c, architecture=architecture, **kwargs)
  elif t5_overrides or t5_config is not None:
    raise ValueError('pass either config or t5_config / T5Config overrides, not both')
  model = models.DualEncoderModel(config)
  template = jax.eval_shape(model.init_params, jax.random.PRNGKey(seed))
  assignment, report = map_to_dual_encoder(source, template, config.architecture)
  if report.initialised and init_params is None:
    init_params = model.init_params(jax.random.PRNGKey(seed))
  init_flat = flatten(init_params) if init_params is not None else {}
  if isinstance(shardings, jax.sharding.Mesh):
    shardings = partitioning.param_shardings(model.logical_axes(), shardings)
  flat_shardings = flatten(shardings) if isinstance(shardings, Mapping) else None
  shapes = {k: tuple(v.shape) for k, v in flatten(template).items()}
  out = {}
  for path, leaf in assignment.items():
    sharding = _sharding_for(shardings, flat_shardings, path, shapes[path])
    out[path] = materialize(init_flat[path] if leaf is None else leaf, sharding, param_dtype)
  return unflatten(out), config, report


def load_dual_encoder(path: str, config: Optional[models.DualEncoderConfig] = None, **kwargs
                      ) -> tuple[dict, models.DualEncoderConfig, MappingReport]:
  """t5dual params from a T5X checkpoint; see `dual_encoder_from_tree` for the arguments.

  The optimizer state is never read; the report lists it as skipped.
  """
  ckpt = open_checkpoint(path)
  params, config, report = dual_encoder_from_tree(ckpt.target, config, **kwargs)
  report.skipped += list(flatten(ckpt.state))
  return params, config, report
