"""The GPU host has JAX, flax, optax, orbax, tensorstore, sentencepiece, PyTorch and
transformers, and none of TensorFlow, seqio, TFDS, bm25s or the trec_eval bindings
(gin-config and rax travel as wheels). Everything a device call runs there must import and run
without them: the library's modules (seqio_tasks aside) and scripts/benchmark_speed.py's
workloads. A sitecustomize on PYTHONPATH makes those imports fail in the child processes too."""

import os
import pkgutil
import subprocess
import sys

import t5dual

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ABSENT_ON_GPU_HOST = ('tensorflow', 'tensorflow_datasets', 'seqio', 'bm25s', 'ir_measures',
                      'pytrec_eval', 'faiss')
NEEDS_SEQIO = {'t5dual.data.seqio_tasks'}

BLOCKER = f'''
import importlib.abc, sys
BLOCKED = {ABSENT_ON_GPU_HOST!r}
class _Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ModuleNotFoundError(f'No module named {{name!r}} (not on the GPU host)', name=name)
    return None
sys.meta_path.insert(0, _Absent())
'''


def _env(tmp_path):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(BLOCKER)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(site), REPO, env.get('PYTHONPATH', '')])
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


def _run(cmd, env, timeout=600):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_blocker_blocks(tmp_path):
  """Guards the test itself: with the blocker, importing TensorFlow or seqio fails."""
  env = _env(tmp_path)
  for name in ('tensorflow', 'seqio'):
    proc = subprocess.run([sys.executable, '-c', f'import {name}'], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'not on the GPU host' in proc.stderr


def test_library_imports_without_tensorflow_or_seqio(tmp_path):
  modules = sorted(m.name for m in pkgutil.walk_packages(t5dual.__path__, 't5dual.')
                   if m.name not in NEEDS_SEQIO)
  assert 't5dual.trainer' in modules and 't5dual.interop.hf' in modules, modules
  code = ('import importlib, sys\n'
          f'for m in {modules!r}:\n'
          '  importlib.import_module(m)\n'
          f'bad = sorted(m for m in sys.modules if m.split(".")[0] in {ABSENT_ON_GPU_HOST!r})\n'
          'assert not bad, bad\n'
          'print("imported", len(' f'{modules!r}' '))\n')
  out = _run([sys.executable, '-c', code], _env(tmp_path))
  assert f'imported {len(modules)}' in out


def test_benchmark_workloads_run_without_tensorflow_or_seqio(tmp_path):
  """W1 (dual-encoder step) and W3 (RankT5 step) as gpu_bench.sh runs them, tiny and on CPU."""
  rows = tmp_path / 'rows.jsonl'
  _run([sys.executable, os.path.join(REPO, 'scripts', 'benchmark_speed.py'),
        '--workloads', 'W1,W3', '--size', 'tiny', '--dtype', 'float32', '--batch', '4',
        '--q_len', '8', '--d_len', '16', '--queries', '2', '--list_size', '2', '--in_len', '16',
        '--steps', '1', '--json', str(rows), '--output', str(tmp_path / 'BENCH.md')],
       _env(tmp_path))
  text = rows.read_text()
  assert '"W1"' in text and '"W3"' in text and '"error"' not in text, text
