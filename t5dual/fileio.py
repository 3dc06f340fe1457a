"""Atomic file writes: a path is either absent, its old content, or complete.

Everything t5dual writes that a later run reads (model.json, exports and their
records, runs, scores kept for resume, the multistage record) goes through
`atomic_write` or `atomic_path`: the content goes to a temporary file beside
the target, is fsynced, and `os.replace`d onto the target only once it is
complete, so a kill -9 or a crash mid-write never leaves a truncated file under
the real name. On an exception the temporary is removed and the old file, if
any, is untouched; after a kill the temporary stays (the next write of the same
path overwrites it).

The temporary is `path + tmp_suffix`. Where several processes may write the
same path (every host of a multi-host run writing the same run file), pass a
per-process suffix such as f'.tmp{jax.process_index()}', so no process renames
a file another is still writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import IO, Any, Iterator, Optional


@contextlib.contextmanager
def atomic_path(path: str, tmp_suffix: str = '.tmp') -> Iterator[str]:
  """Yields a temporary path beside `path` for the caller (or a library such as
  np.save or pyarrow) to write; on success fsyncs it and renames it onto `path`,
  on an exception removes it."""
  tmp = path + tmp_suffix
  try:
    yield tmp
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', *, tmp_suffix: str = '.tmp',
                 encoding: Optional[str] = None, newline: Optional[str] = None
                 ) -> Iterator[IO]:
  """`open(path, mode)` whose content appears under `path` only when the block ends
  without an exception (see `atomic_path`). `mode` is 'w' or 'wb'."""
  if mode not in ('w', 'wb'):
    raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', got {mode!r}")
  with atomic_path(path, tmp_suffix) as tmp:
    with open(tmp, mode, encoding=encoding, newline=newline) as f:
      yield f


def write_json(path: str, obj: Any, *, indent: int = 2, sort_keys: bool = False,
               tmp_suffix: str = '.tmp') -> None:
  """`obj` as JSON with a final newline, atomically."""
  with atomic_write(path, tmp_suffix=tmp_suffix) as f:
    json.dump(obj, f, indent=indent, sort_keys=sort_keys)
    f.write('\n')


def read_json(path: str, error: type = ValueError) -> Any:
  """The JSON value in `path`; a file that is not valid JSON raises `error` (a one-line
  cli.UserError subclass where a user's file is read) naming the file."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise error(f'{path}: not valid JSON ({e.msg})') from None


def write_or_compare_json(path: str, obj: Any, *, error: type = ValueError,
                          tmp_suffix: str = '.tmp') -> list[str]:
  """Writes `obj` (a dict) as JSON at `path` (its folder made) unless a file is there,
  and returns the top-level keys in which that file differs from `obj` (none: the same
  plan). How an export or a store checks that a directory is being resumed for the
  same work (several processes may race to write the same plan). A file there that is
  not JSON raises `error` (read_json)."""
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    write_json(path, obj, indent=1, sort_keys=True, tmp_suffix=tmp_suffix)
    return []
  old, new = read_json(path, error), json.loads(json.dumps(obj))
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def sha256_file(path: str) -> str:
  """Hex sha256 of the file's bytes (read in blocks)."""
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def atomic_symlink(target: str, link: str) -> None:
  """Points `link` at `target`, replacing an existing link in one rename, so readers
  of `link` see the old target or the new one, never no link."""
  tmp = link + '.tmp'
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(target, tmp)
  os.replace(tmp, link)
