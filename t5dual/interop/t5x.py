"""T5X checkpoints: read them (msgpack + TensorStore, or orbax), write them, load them
into t5dual.

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
`load_dual_encoder` maps a checkpoint into a t5dual dual encoder of any
architecture (see `mapping.dual_encoder_from_tree`).

Files are reached through `storage` (local or gs://), the msgpack encoding is
`msgpack_io`'s, arrays are `lazy_arrays.LazyArray`s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np
import tensorstore as ts

from t5dual import dual_encoders
from t5dual.interop import mapping
from t5dual.interop.lazy_arrays import LazyArray
from t5dual.interop.msgpack_io import decode_msgpack, dtype_from_name, encode_msgpack
from t5dual.interop.storage import is_gcs, join, kvstore_spec, list_files, read_file, write_file
from t5dual.interop.trees import flatten, to_numpy, unflatten

VERSION = 3
_CHUNK_BYTES = 64 * 1024 * 1024  # T5X's desired TensorStore chunk size
_ORBAX_PLACEHOLDER = 'PLACEHOLDER://'
_GCS_DUMMY_BUCKET = 't5x-dummy-bucket'


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
  dtype = dtype_from_name(metadata['dtype']) if isinstance(metadata.get('dtype'), str) else None
  opened = {'driver': spec['driver'], 'kvstore': kvstore_spec(join(ckpt_dir, rel))}
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
    return LazyArray(name, spec={'driver': 'zarr', 'kvstore': kvstore_spec(join(ckpt_dir, rel))})
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
  where = join(ckpt_dir, 'checkpoint')
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
  base = kvstore_spec(state_dir.rstrip('/') + '/')
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
      kv = kvstore_spec(join(state_dir, name) + '/')
    flat['/'.join(keys)] = LazyArray('/'.join(keys), spec={'driver': driver, 'kvstore': kv})
  # Old orbax versions kept small leaves in a msgpack 'checkpoint' file next to _METADATA.
  raw = read_file(join(state_dir, 'checkpoint'))
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
    raw = read_file(path)
    if raw is not None:
      return _open_msgpack(path.rsplit('/', 1)[0] if '/' in path else '.', raw)
  for state_dir in (join(path, 'state'), path):
    meta = read_file(join(state_dir, '_METADATA'))
    if meta is not None:
      return _open_orbax(state_dir, json.loads(meta))
  raw = read_file(join(path, 'checkpoint'))
  if raw is not None:
    return _open_msgpack(path, raw)
  if is_gcs(path) or os.path.isdir(path):
    steps = sorted({int(m.group(1)) for f in list_files(path)
                    if (m := re.match(r'checkpoint_(\d+)/(checkpoint|state/_METADATA)$', f))})
    if steps:
      return open_checkpoint(join(path, f'checkpoint_{steps[-1]}'))
  raise FileNotFoundError(f'no T5X checkpoint at {path} (looked for checkpoint, state/_METADATA '
                          'and checkpoint_<step>/ directories)')


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
  kvstore = ({'driver': 'gcs', 'bucket': _GCS_DUMMY_BUCKET, 'path': name} if is_gcs(ckpt_dir)
             else {'driver': 'file', 'path': name})
  spec = {'driver': 'zarr', 'dtype': dtype.name, 'kvstore': kvstore,
          'metadata': {'compressor': {'id': 'gzip'}, 'shape': list(shape),
                       'chunks': _chunk_shape(shape, dtype.itemsize) if shape else []}}
  absolute = {**copy.deepcopy(spec), 'kvstore': kvstore_spec(join(ckpt_dir, name))}
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
  if read_file(join(ckpt_dir, 'checkpoint')) is not None:
    raise FileExistsError(f'{ckpt_dir} already holds a checkpoint')
  work_dir = ckpt_dir if is_gcs(ckpt_dir) else f'{ckpt_dir}.tmp-{int(time.time())}'

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
  write_file(join(work_dir, 'checkpoint'), encode_msgpack(contents))
  if work_dir != ckpt_dir:
    os.makedirs(os.path.dirname(os.path.abspath(ckpt_dir)), exist_ok=True)
    os.rename(work_dir, ckpt_dir)
  return ckpt_dir


# --------------------------------------------------------------------------- into t5dual

def load_dual_encoder(path: str, config: Optional[dual_encoders.DualEncoderConfig] = None, **kwargs
                      ) -> tuple[dict, dual_encoders.DualEncoderConfig, mapping.MappingReport]:
  """t5dual params from a T5X checkpoint; see `mapping.dual_encoder_from_tree` for the arguments.

  The optimizer state is never read; the report lists it as skipped.
  """
  ckpt = open_checkpoint(path)
  params, config, report = mapping.dual_encoder_from_tree(ckpt.target, config, **kwargs)
  report.skipped += list(flatten(ckpt.state))
  return params, config, report
