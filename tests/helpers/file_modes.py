"""Checking that written files get the modes the process umask gives new files."""

import contextlib
import os
import stat


@contextlib.contextmanager
def umask(mask):
  """Runs the block under `mask` (one that neither 0600 nor the common 0022 matches)."""
  old = os.umask(mask)
  try:
    yield
  finally:
    os.umask(old)


def wrong_modes(folder, mask):
  """'path mode' of every file and directory under `folder` not 0o666 / 0o777 less `mask`."""
  wrong = []
  for root, dirs, files in os.walk(folder):
    for name, full in [(n, 0o777) for n in dirs] + [(n, 0o666) for n in files]:
      path = os.path.join(root, name)
      mode = stat.S_IMODE(os.stat(path).st_mode)
      if mode != full & ~mask:
        wrong.append(f'{os.path.relpath(path, folder)} {oct(mode)}')
  return wrong
