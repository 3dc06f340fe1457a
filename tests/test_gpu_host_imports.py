"""Everything a device call runs on the GPU host must import without TensorFlow, seqio, TFDS,
bm25s and the trec_eval bindings, which that host lacks (helpers/gpu_host.py): every library
module but the seqio tasks. (scripts/benchmark_speed.py's workloads run that way in
test_benchmark_speed.py.)"""

import os
import pkgutil
import re
import subprocess
import sys

import gpu_host
import t5dual

NEEDS_SEQIO = {'t5dual.data.seqio_tasks'}


def test_blocker_blocks(tmp_path):
  """Guards the tests that rely on it: with it, importing TensorFlow or seqio fails."""
  for name in ('tensorflow', 'seqio'):
    proc = subprocess.run([sys.executable, '-c', f'import {name}'], env=gpu_host.env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and gpu_host.MESSAGE in proc.stderr, proc.stderr[-2000:]


def test_library_imports_without_tensorflow_or_seqio(tmp_path):
  modules = sorted(m.name for m in pkgutil.walk_packages(t5dual.__path__, 't5dual.')
                   if m.name not in NEEDS_SEQIO)
  assert 't5dual.trainer' in modules and 't5dual.interop.hf' in modules, modules
  code = ('import importlib, sys\n'
          f'for m in {modules!r}:\n'
          '  importlib.import_module(m)\n'
          f'bad = sorted(m for m in sys.modules if m.split(".")[0] in {gpu_host.ABSENT!r})\n'
          'assert not bad, bad\n'
          f'print("imported", {len(modules)})\n')
  proc = subprocess.run([sys.executable, '-c', code], env=gpu_host.env(tmp_path),
                        capture_output=True, text=True, timeout=600, cwd=gpu_host.REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f'imported {len(modules)}' in proc.stdout


def test_constraints_are_setup_pys_python_312_pins():
  """constraints/gpu-host.txt (the GPU host's versions, scripts/check_gpu_host_versions.sh)
  and setup.py's pins for Python >= 3.12 are the same versions."""
  text = open(os.path.join(gpu_host.REPO, 'constraints', 'gpu-host.txt')).read()
  constraints = dict(re.findall(r'^([\w-]+)==(\S+)$', text, re.M))
  kwargs = gpu_host.setup_kwargs()
  extras = kwargs['extras_require']
  setup_pins = {}
  for requirements in [kwargs['install_requires'], extras['torch'], extras['cuda']]:
    setup_pins.update(gpu_host.pins(requirements, '3.12'))
  assert constraints == {name: setup_pins[name] for name in constraints}, (constraints,
                                                                          setup_pins)
  assert constraints['jax'] == constraints['jaxlib'] == '0.11.2'
  assert gpu_host.pins(kwargs['install_requires'], '3.11')['jax'] == '0.10.2'  # the default
