"""Embedding exports in a subprocess (t5dual/export.py): killed with SIGKILL mid-shard, then
resumed to identical files; the progress bar drawn once to 100%. The in-process export tests
are in test_export.py."""

import json
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from t5dual import export
from tiny_export import OPTIONS, collection_and_model, files, numpy_encoder  # tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every test runs an export in a subprocess.
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope='module')
def setup(tmp_path_factory, demo_beir):
  return collection_and_model(demo_beir, tmp_path_factory.mktemp('export'))


KILLED_EXPORT = textwrap.dedent('''
    import json, os, signal, sys
    sys.path.insert(0, {helpers!r})
    from tiny_export import numpy_encoder
    from t5dual import export, vocab
    tok = vocab.Tokenizer({spm!r})
    ids, texts = json.load(open({corpus!r}))
    real_replace, npy_renames = os.replace, []
    def replace(src, dst):
      if dst.endswith('.npy'):
        npy_renames.append(dst)
        if len(npy_renames) == 3:  # the third shard's vectors are written, not yet renamed
          os.kill(os.getpid(), signal.SIGKILL)
      real_replace(src, dst)
    os.replace = replace
    export.export_embeddings(numpy_encoder(tok.vocab_size), tok, ids, texts, {out!r},
                             export.ExportOptions(**{options!r}))
''')


def test_killed_process_resumes_to_identical_files(setup, tmp_path):
  options = dict(OPTIONS, shard_size=25, dtype='float32', parquet=True)
  corpus = tmp_path / 'corpus.json'
  corpus.write_text(json.dumps([setup['ids'], setup['texts']]))
  script = KILLED_EXPORT.format(helpers=str(REPO / 'tests' / 'helpers'), spm=setup['tok'].path,
                                corpus=str(corpus), out=str(tmp_path / 'killed'),
                                options=options)
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  killed = tmp_path / 'killed'
  assert sorted(p.name for p in killed.glob('shard-*.json')) == [
      'shard-00000-of-00005.json', 'shard-00001-of-00005.json']
  assert (killed / 'embeddings-00002-of-00005.npy.tmp').exists()
  assert not (killed / 'manifest.json').exists()

  encode = numpy_encoder(setup['tok'].vocab_size)
  args = (setup['tok'], setup['ids'], setup['texts'])
  opts = export.ExportOptions(**options)
  export.export_embeddings(encode, *args, str(tmp_path / 'whole'), opts)
  manifest = export.export_embeddings(encode, *args, str(killed), opts)
  assert manifest['count'] == 120 and len(manifest['shards']) == 5
  assert files(killed) == files(tmp_path / 'whole')


def test_progress_reaches_100_percent_once(setup, tmp_path):
  """tqdm's close() redraws the bar: the last batch must not draw 100% as well."""
  script = textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {str(REPO / 'tests' / 'helpers')!r})
      from tiny_export import numpy_encoder
      from t5dual import export, vocab
      tok = vocab.Tokenizer({setup['tok'].path!r})
      texts = ['alpha beta', 'gamma', 'delta epsilon zeta']
      ids = [str(i) for i in range(len(texts))]
      for out in ('one', 'one', 'two'):  # one batch; then resumed with nothing to do; then 3
        options = dict(max_length=16, side='query', batch_size=8 if out == 'one' else 1,
                       shard_size=2)
        export.export_embeddings(numpy_encoder(tok.vocab_size), tok, ids, texts,
                                 {str(tmp_path)!r} + '/' + out, export.ExportOptions(**options))
  ''')
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stderr.replace('\r', '\n').splitlines()
  full = [l for l in lines if '100%' in l]
  assert len(full) == 2, lines  # one per export that encoded something
  assert all('3/3' in l and l.startswith('query embeddings (process 0)') for l in full)
