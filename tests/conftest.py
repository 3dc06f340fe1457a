import os
import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / 'shared'


@pytest.fixture
def shared_dir():
  if not SHARED.is_dir():
    pytest.skip(f'{SHARED} is absent (optional shared material)')
  return SHARED

# Shared helpers (tests/helpers/*.py) import as top-level modules.
import sys  # noqa: E402
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / 'helpers'))
