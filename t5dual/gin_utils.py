"""gin at the edges: T5X-style command-line flags and running a configured function.

  --gin_file=gin/models/sde.gin        (repeatable; searched in --gin_search_paths,
                                        the repository root, gin/ and configs/)
  --gin.MODEL_DIR="'/tmp/run'"         (a binding: --gin.X=V becomes `X = V`)
  --gin_bindings="X = V"               (repeatable, as in T5X)
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Sequence

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (os.getcwd(), REPO_ROOT, os.path.join(REPO_ROOT, 'gin'),
                        os.path.join(REPO_ROOT, 'configs'))


def parse_flags(argv: Sequence[str]) -> tuple[list[str], list[str], argparse.Namespace]:
  """Splits argv into gin files, gin bindings, and the remaining known flags."""
  parser = argparse.ArgumentParser(description='t5dual (gin-configured)')
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument('--gin_search_paths', action='append', default=[])
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise SystemExit(f'{arg}: expected --gin.NAME=VALUE')
      bindings.append(f'{name} = {value}')
    else:
      rest.append(arg)
  args = parser.parse_args(rest)
  return args.gin_file, args.gin_bindings + bindings, args


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  for path in list(search_paths) + list(DEFAULT_SEARCH_PATHS):
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)
  except (ValueError, KeyError, IOError, SyntaxError, TypeError) as e:
    # gin's messages already name the file/line or binding; add what was parsed.
    raise SystemExit(f'gin configuration error: {e}\n(gin files: {list(files)}, '
                     f'bindings: {list(bindings)})') from None


def call_configured(fn: Callable, **kwargs):
  """Calls the gin-configured version of `fn` (registered dynamically by the gin files)."""
  return gin.get_configurable(fn)(**kwargs)
