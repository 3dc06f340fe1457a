"""A seqio pair task prepared into the store: the store of the same pairs as JSONL, so a
seqio run resumes by row (tests/test_data.py covers the seqio batcher's own re-reading)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from t5dual import cli, vocab
from t5dual.data import pipeline, sources, store

seqio_tasks = pytest.importorskip('t5dual.data.seqio_tasks',
                                  reason='seqio extra (TensorFlow, seqio) not installed')

pytestmark = pytest.mark.slow  # TensorFlow's import and a tf.data pass per store
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {'inputs': 12, 'targets': 16}  # max_length 15 + EOS


@pytest.fixture(scope='module')
def tokenizer(demo_collection):
  return vocab.Tokenizer(os.path.join(demo_collection, 'spm.model'))


@pytest.fixture(scope='module')
def pairs_jsonl(demo_collection, tmp_path_factory):
  """The demo's training pairs, one query and one document repeated (rows are distinct
  texts), documents longer than the store's max_length."""
  ex = sources.beir_pairs(demo_collection, 'train')
  queries, positives = list(ex.queries), list(ex.positives)
  queries[3], positives[7] = queries[0], positives[1]
  positives[5] = ' '.join([positives[5]] * 6)
  path = str(tmp_path_factory.mktemp('jsonl') / 'pairs.jsonl')
  with open(path, 'w') as f:
    f.writelines(json.dumps({'query': q, 'positive': p}) + '\n'
                 for q, p in zip(queries, positives))
  return path


def _files(folder):
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder)] = open(path, 'rb').read()
  return out


def test_seqio_task_prepares_the_store_of_its_pairs(pairs_jsonl, tokenizer, tmp_path):
  """Every file but the plan and manifest (which name the inputs) equals the JSONL store's,
  and its batches at any step equal the in-memory JSONL batcher's."""
  seqio_tasks.register_pair_task('t5dual_store_pairs', f'jsonl:{pairs_jsonl}', tokenizer.path)
  expected, out = str(tmp_path / 'jsonl'), str(tmp_path / 'seqio')
  store.prepare(f'jsonl:{pairs_jsonl}', expected, tokenizer, max_length=15, shard_size=16)
  manifest = store.prepare('seqio:t5dual_store_pairs', out, tokenizer, max_length=15,
                           shard_size=16)
  want, got = _files(expected), _files(out)
  assert set(got) == set(want)
  for name in want:
    if name not in (store.PLAN, store.MANIFEST):
      assert got[name] == want[name], name
  assert manifest['seqio'] == {'task': 't5dual_store_pairs', 'split': 'train',
                               'input_examples': len(open(pairs_jsonl).readlines())}
  assert manifest['counts']['queries']['rows'] == manifest['counts']['pairs']['rows'] - 1
  memory = pipeline.make_batcher(f'jsonl:{pairs_jsonl}', tokenizer, 8, LENGTHS, seed=3)
  stored = pipeline.make_batcher(f'store:{out}', tokenizer, 8, LENGTHS, seed=3)
  for step in (0, 5, 10**6):
    a, b = memory.batch(step), stored.batch(step)
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Done is done: the same command again reads nothing and returns the manifest.
  assert store.prepare('seqio:t5dual_store_pairs', out, tokenizer, max_length=15,
                       shard_size=16)['files'] == manifest['files']


def test_prepare_data_imports_the_task_module(pairs_jsonl, tokenizer, tmp_path, monkeypatch,
                                              capsys):
  """scripts/prepare_data.py --module registers the task, as MIXTURE_OR_TASK_MODULE does."""
  (tmp_path / 'my_pair_tasks.py').write_text(
      'from t5dual.data import seqio_tasks\n'
      f"seqio_tasks.register_pair_task('t5dual_cli_pairs', 'jsonl:{pairs_jsonl}', "
      f"'{tokenizer.path}')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  spec = importlib.util.spec_from_file_location(
      'prepare_data', os.path.join(REPO, 'scripts', 'prepare_data.py'))
  prepare_data = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(prepare_data)
  out = str(tmp_path / 'store')
  prepare_data.main(['--source=seqio:t5dual_cli_pairs', '--module=my_pair_tasks',
                     f'--vocabulary={tokenizer.path}', f'--out_dir={out}', '--verify'])
  rows = len(open(pairs_jsonl).readlines())
  assert f'{rows - 1} queries, {rows} pairs' in capsys.readouterr().out
  with pytest.raises(cli.ConfigError, match=r'^--module no_such_module: No module named'):
    prepare_data.main(['--source=seqio:t5dual_cli_pairs', '--module=no_such_module',
                       f'--vocabulary={tokenizer.path}', f'--out_dir={out}'])


def test_seqio_sources_refused_in_one_line(pairs_jsonl, tokenizer, demo_collection, tmp_path):
  other = vocab.train_sentencepiece(open(pairs_jsonl).read().split('\n'),
                                    str(tmp_path / 'other'), vocab_size=300)
  seqio_tasks.register_pair_task('t5dual_other_vocab', f'jsonl:{pairs_jsonl}', other)
  out = str(tmp_path / 'store')
  for source, error, message in [
      ('seqio:t5dual_other_vocab', store.StoreError,
       r"^seqio:t5dual_other_vocab: its 'inputs' vocabulary \(.*other\.model\) is not "),
      ('seqio:t5dual_no_such_task', sources.UnknownSourceError,
       r'^seqio:t5dual_no_such_task: .*--module'),
      ('seqio:t5dual_other_vocab:validation', sources.UnknownSourceError,
       r"^seqio:t5dual_other_vocab has no split 'validation' \(splits: train\)"),
      ('seqio:', sources.UnknownSourceError, r'give a task name')]:
    with pytest.raises(error, match=message) as e:
      store.prepare(source, out, tokenizer)
    assert '\n' not in str(e.value)
  with pytest.raises(cli.ConfigError, match='not from a seqio pair source'):
    store.prepare('seqio:t5dual_other_vocab', out, tokenizer,
                  lists=store.ListOptions(os.path.join(demo_collection, 'qrels', 'train.tsv')))
  assert not os.path.exists(out)
