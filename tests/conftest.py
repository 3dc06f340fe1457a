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


@pytest.fixture(autouse=True)
def _seed_torch():
  """Models built with torch draw from its global generator: seed it before every test, so that
  a test's weights do not depend on which tests ran before it."""
  if 'torch' in sys.modules:
    sys.modules['torch'].manual_seed(0)


def pytest_configure(config):
  # Tiers: `pytest -m "not slow"` for everyday work; the README's test command runs all.
  config.addinivalue_line('markers', 'slow: minutes of work (multi-process jobs, training runs)')
  config.addinivalue_line('markers', 'multiprocess: starts several processes joined by '
                          'jax.distributed')


@pytest.fixture(scope='session')
def demo_collection(tmp_path_factory):
  """The demo BEIR collection (200 documents, 40 concepts) with its 256-piece SentencePiece
  model as `spm.model` inside: built once per test process for the modules that share it."""
  from t5dual import vocab
  from t5dual.data import demo
  folder = str(tmp_path_factory.mktemp('demo_collection') / 'data')
  demo.write_demo_beir(folder, num_docs=200, num_concepts=40)
  vocab.train_sentencepiece(demo.demo_texts(folder), os.path.join(folder, 'spm'), 256)
  return folder
