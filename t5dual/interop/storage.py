"""Where checkpoint files live: local paths or gs:// locations, read and written through
TensorStore's kvstore drivers (so Google Cloud Storage needs no other client).

A location is a path string: `gs://bucket/dir/file` or a local path. These
functions are the only place that turns one into a TensorStore kvstore spec.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import tensorstore as ts


def is_gcs(path: str) -> bool:
  return path.startswith('gs://')


def join(base: str, *parts: str) -> str:
  """`os.path.join` for local paths and gs:// locations alike."""
  if is_gcs(base):
    return '/'.join([base.rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(base, *parts)


def kvstore_spec(path: str) -> dict:
  """TensorStore kvstore spec of a local path or a gs://bucket/path (a directory ends with '/')."""
  m = re.fullmatch(r'gs://([^/]+)/?(.*)', path, re.DOTALL)
  if m:
    return {'driver': 'gcs', 'bucket': m.group(1), 'path': m.group(2)}
  return {'driver': 'file', 'path': os.path.abspath(path) + ('/' if path.endswith('/') else '')}


def _split(path: str) -> tuple[str, str]:
  return path.rsplit('/', 1) if is_gcs(path) else os.path.split(os.path.abspath(path))


def read_file(path: str) -> Optional[bytes]:
  """Contents of a file (local or gs://), or None when it does not exist."""
  directory, name = _split(path)
  store = ts.KvStore.open(kvstore_spec(directory + '/')).result()
  result = store.read(name).result()
  return bytes(result.value) if result.state == 'value' else None


def write_file(path: str, data: bytes) -> None:
  directory, name = _split(path)
  ts.KvStore.open(kvstore_spec(directory + '/')).result().write(name, data).result()


def list_files(directory: str) -> list[str]:
  """Paths of every file under `directory`, relative to it."""
  store = ts.KvStore.open(kvstore_spec(directory.rstrip('/') + '/')).result()
  return [k.decode() for k in store.list().result()]
