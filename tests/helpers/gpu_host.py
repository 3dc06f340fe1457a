"""The GPU host's Python: JAX, flax, optax, orbax, tensorstore, sentencepiece, PyTorch and
transformers, and none of TensorFlow, seqio, TFDS, bm25s or the trec_eval bindings (gin-config
and rax travel as wheels). `env(folder)` gives a child process that environment: a
sitecustomize on PYTHONPATH makes the absent packages fail to import, in its own children too."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ABSENT = ('tensorflow', 'tensorflow_datasets', 'seqio', 'bm25s', 'ir_measures', 'pytrec_eval',
          'faiss')
MESSAGE = 'not on the GPU host'

SITECUSTOMIZE = f'''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {ABSENT!r}:
      raise ModuleNotFoundError(f'No module named {{name!r}} ({MESSAGE})', name=name)
    return None
sys.meta_path.insert(0, _Absent())
'''


def env(folder):
  """os.environ for a child process without the packages in ABSENT (writes folder/site)."""
  site = os.path.join(str(folder), 'site')
  os.makedirs(site, exist_ok=True)
  with open(os.path.join(site, 'sitecustomize.py'), 'w') as f:
    f.write(SITECUSTOMIZE)
  return {**os.environ, 'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS', 'cpu'),
          'PYTHONPATH': os.pathsep.join(filter(None, [site, REPO, os.environ.get('PYTHONPATH')]))}


def setup_kwargs():
  """What setup.py passes to setuptools.setup (install_requires, extras_require, ...)."""
  import importlib.util
  import setuptools
  captured = {}
  spec = importlib.util.spec_from_file_location('t5dual_setup', os.path.join(REPO, 'setup.py'))
  module = importlib.util.module_from_spec(spec)
  real_setup = setuptools.setup
  setuptools.setup = lambda **kwargs: captured.update(kwargs)
  try:
    spec.loader.exec_module(module)
  finally:
    setuptools.setup = real_setup
  return captured


def pins(requirements, python):
  """{name: version} of `name==version; marker` requirements that apply on `python` ('3.12')."""
  from packaging.requirements import Requirement
  out = {}
  for text in requirements:
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate({'python_version': python}):
      [spec] = req.specifier
      out[req.name] = spec.version
  return out
