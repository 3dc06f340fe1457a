import collections
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

import durations_record  # noqa: E402  tests/helpers


@pytest.fixture(autouse=True)
def _seed_torch():
  """Models built with torch draw from its global generator: seed it before every test, so that
  a test's weights do not depend on which tests ran before it."""
  if 'torch' in sys.modules:
    sys.modules['torch'].manual_seed(0)


# ------------------------------------------------------------------------------ demo data

@pytest.fixture(scope='session')
def demo_beir(tmp_path_factory):
  """Builds demo BEIR collections and their SentencePiece vocabularies once per test process.

  A function (num_docs, num_concepts, vocab_size, *, lexical_overlap=0.0, extra_texts=(),
  vocabulary_in_folder=False) -> (folder, spm_model_path): modules that ask for the same
  collection share its folder, and the same vocabulary its file, so a test must copy a folder
  before it changes it. The vocabulary is trained on the collection's texts plus extra_texts;
  with vocabulary_in_folder it is `spm.model` inside a folder of its own (the layout that
  processes started by a test find from the folder alone).
  """
  from t5dual import vocab
  from t5dual.data import demo
  folders, vocabularies = {}, {}

  def build(num_docs, num_concepts, vocab_size, *, lexical_overlap=0.0, extra_texts=(),
            vocabulary_in_folder=False):
    collection = (num_docs, num_concepts, lexical_overlap, vocabulary_in_folder)
    if collection not in folders:
      name = f'demo_{num_docs}_{num_concepts}' + (f'_overlap{lexical_overlap}' * bool(lexical_overlap))
      folder = str(tmp_path_factory.mktemp(name) / 'data')
      demo.write_demo_beir(folder, num_docs=num_docs, num_concepts=num_concepts,
                           lexical_overlap=lexical_overlap)
      folders[collection] = folder
    folder = folders[collection]
    key = collection + (vocab_size, tuple(extra_texts))
    if key not in vocabularies:
      prefix = (os.path.join(folder, 'spm') if vocabulary_in_folder else
                str(tmp_path_factory.mktemp(f'spm_{vocab_size}') / 'spm'))
      vocabularies[key] = vocab.train_sentencepiece(demo.demo_texts(folder) + list(extra_texts),
                                                    prefix, vocab_size)
    return folder, vocabularies[key]

  return build


@pytest.fixture(scope='session')
def demo_collection(demo_beir):
  """The demo BEIR collection (200 documents, 40 concepts) with its 256-piece SentencePiece
  model as `spm.model` inside, for the modules whose processes read both from one folder."""
  folder, _ = demo_beir(200, 40, 256, vocabulary_in_folder=True)
  return folder


# ------------------------------------------------------------------------------ test tiers
# Markers are declared in pytest.ini (strict). The record of durations (tests/DURATIONS.md)
# keeps the tiers honest: test_tiers.py fails when a test recorded as slow lacks `slow`.

_SECONDS = collections.defaultdict(float)  # test id -> setup + call + teardown, this run


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  # Before `-m` deselects anything, so that test_tiers checks every collected test in any tier.
  config.stash[durations_record.COLLECTED] = {
      item.nodeid: {mark.name for mark in item.iter_markers()} for item in items}


def pytest_runtest_logreport(report):
  # With xdist this runs on the controller too, which receives the workers' reports.
  _SECONDS[report.nodeid] += report.duration


def pytest_sessionfinish(session):
  config = session.config
  if os.environ.get(durations_record.ENV) == '1' and not hasattr(config, 'workerinput'):
    workers = getattr(config.option, 'numprocesses', None) or 0
    durations_record.update(_SECONDS, f'{workers} workers' if workers else '1 process')
