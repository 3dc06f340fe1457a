"""Finding the accelerator (t5dual/accelerator.py): which extra scripts/run.sh installs, and the
job scripts' start-up check (distributed.check_backend), in fake machines: a /dev with TPU
device files, an nvidia-smi on PATH that lists GPUs or fails. No real accelerator is needed."""

import logging
import os
import shutil
import stat
import subprocess
import sys

import pytest

import gpu_host  # tests/helpers
from t5dual import accelerator, cli, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMI_GPUS = ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"; '
            'echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)"')
SMI_BROKEN = ('echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA '
              'driver." >&2; exit 9')


@pytest.fixture
def machine(tmp_path):
  """make(dev=[files under a fake /dev], smi=None | shell body of a fake nvidia-smi) -> env."""
  def make(dev=(), smi=None, **variables):
    root = tmp_path / f'm{len(list(tmp_path.iterdir()))}'
    (root / 'dev').mkdir(parents=True)
    (root / 'bin').mkdir()
    for name in dev:
      (root / 'dev' / name).parent.mkdir(parents=True, exist_ok=True)
      (root / 'dev' / name).touch()
    if smi is not None:
      path = root / 'bin' / 'nvidia-smi'
      path.write_text(f'#!/bin/bash\n{smi}\n')
      path.chmod(path.stat().st_mode | stat.S_IEXEC)
    # PATH: the fake bin alone, so that a real nvidia-smi is never found; it holds what
    # run.sh calls (python3: this interpreter, dirname).
    python3 = root / 'bin' / 'python3'
    python3.write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    python3.chmod(python3.stat().st_mode | stat.S_IEXEC)
    os.symlink(shutil.which('dirname'), root / 'bin' / 'dirname')
    env = {k: v for k, v in os.environ.items() if k not in (accelerator.ENV, 'JAX_PLATFORMS')}
    env.update(PATH=str(root / 'bin'), **{accelerator.ENV_DEV: str(root / 'dev')}, **variables)
    return env
  return make


@pytest.mark.parametrize('dev,smi,kind', [
    ((), None, 'cpu'),
    (('vfio/vfio',), None, 'cpu'),                    # the vfio control file alone: no TPU
    (('accel0', 'accel1', 'accel2', 'accel3'), None, 'tpu'),  # v4 VM
    (('vfio/vfio', 'vfio/0', 'vfio/1'), None, 'tpu'),  # v5e / v6e VM
    ((), SMI_GPUS, 'cuda'),
])
def test_detect(machine, dev, smi, kind):
  got, why = accelerator.detect(machine(dev, smi))
  assert got == kind, why
  if kind == 'cuda':
    assert why == 'nvidia-smi lists 2 GPU(s)'


@pytest.mark.parametrize('dev,smi,variables,message', [
    ((), SMI_BROKEN, {}, 'nvidia-smi -L lists no GPU (exit 9: NVIDIA-SMI has failed'),
    ((), 'exit 0', {}, 'nvidia-smi -L lists no GPU (exit 0)'),
    (('accel0',), SMI_GPUS, {}, 'TPU devices'),
    ((), None, {accelerator.ENV: 'gpu'}, "T5DUAL_ACCELERATOR='gpu' is not one of cpu, cuda, tpu"),
])
def test_unsure_says_what_to_set(machine, dev, smi, variables, message):
  with pytest.raises(accelerator.Unsure) as raised:
    accelerator.detect(machine(dev, smi, **variables))
  assert message in str(raised.value) and '\n' not in str(raised.value)
  if not variables:
    assert str(raised.value).endswith('set T5DUAL_ACCELERATOR=cpu, cuda or tpu')


def test_forced_wins_over_the_machine(machine):
  env = machine(('accel0',), SMI_BROKEN, **{accelerator.ENV: 'cpu'})
  assert accelerator.detect(env) == ('cpu', 'T5DUAL_ACCELERATOR=cpu')


def _extras(env, job=None):
  return subprocess.run(['/bin/bash', os.path.join(ROOT, 'scripts', 'run.sh'), 'extras']
                        + ([job] if job else []), env=env, capture_output=True, text=True,
                        timeout=60)


@pytest.mark.parametrize('dev,smi,variables,job,extras', [
    ((), None, {}, None, 'demo'),
    ((), None, {}, 'test', 'all'),
    (('accel0',), None, {}, 'train', 'demo,tpu'),
    ((), SMI_GPUS, {'T5DUAL_EXTRAS': 'torch'}, 'convert', 'torch,cuda'),
    ((), SMI_GPUS, {}, 'test', 'all,cuda'),
    ((), None, {accelerator.ENV: 'tpu'}, 'plan', 'demo,tpu'),  # what launch_tpu_pod.sh sets
    ((), SMI_GPUS, {accelerator.ENV: 'cpu'}, 'train', 'demo'),
])
def test_run_sh_installs_the_accelerators_extra(machine, dev, smi, variables, job, extras):
  """`run.sh extras JOB` prints the `pip install -e .[...]` extras that JOB installs here."""
  result = _extras(machine(dev, smi, **variables), job)
  assert result.returncode == 0, result.stderr
  assert result.stdout == extras + '\n'
  assert result.stderr.startswith('accelerator: ')


def test_run_sh_unsure_is_one_line(machine):
  result = _extras(machine((), SMI_BROKEN), 'train')
  assert result.returncode == 2 and result.stdout == ''
  [line] = result.stderr.splitlines()
  assert line.startswith('error: cannot tell which accelerator this machine has: ')
  assert line.endswith('set T5DUAL_ACCELERATOR=cpu, cuda or tpu')


def test_setup_extras_exist():
  """The extras run.sh names are setup.py's, pinned to the jax of each Python range."""
  kwargs = gpu_host.setup_kwargs()
  extras = kwargs['extras_require']
  for kind, extra in accelerator.EXTRAS.items():
    assert not extra or extra in extras, kind
  for python in ('3.11', '3.12'):
    jax = gpu_host.pins(kwargs['install_requires'], python)['jax']
    cuda = gpu_host.pins(extras['cuda'], python)
    assert cuda == {'jax-cuda12-plugin': jax, 'jax-cuda12-pjrt': jax}, (python, cuda)
    assert set(gpu_host.pins(extras['tpu'], python)) == {'libtpu'}


def test_start_up_line_names_backend_and_devices(machine, caplog):
  import jax
  with caplog.at_level(logging.INFO, logger='t5dual.distributed'):
    line = distributed.check_backend(machine())
  assert line.startswith(f'JAX backend cpu: {jax.device_count()} device(s) (cpu), '
                         f'{jax.local_device_count()} on each of 1 process(es); jax ')
  assert line in caplog.text


@pytest.mark.parametrize('dev,smi,variables,why', [
    ((), SMI_GPUS, {}, 'nvidia-smi lists 2 GPU(s)'),
    (('vfio/0',), None, {}, '1 TPU device file(s)'),
    ((), None, {accelerator.ENV: 'cuda'}, 'T5DUAL_ACCELERATOR=cuda'),
])
def test_accelerator_unused_by_jax_is_refused(machine, dev, smi, variables, why):
  with pytest.raises(cli.UserError) as raised:
    distributed.check_backend(machine(dev, smi, **variables))
  message = str(raised.value)
  assert message.startswith(why) and ', but JAX (jax ' in message and '\n' not in message
  assert 'sees only the CPU' in message and message.endswith(
      'or set T5DUAL_ACCELERATOR=cpu to run on the CPU')


@pytest.mark.parametrize('variables', [{accelerator.ENV: 'cpu'}, {'JAX_PLATFORMS': 'cpu'}])
def test_cpu_on_purpose_is_allowed(machine, variables):
  assert distributed.check_backend(machine((), SMI_GPUS, **variables)).startswith(
      'JAX backend cpu')


def test_job_script_refuses_in_one_line(machine):
  """A job script (train.py) on a GPU machine whose JAX has only the CPU: exit 2, one line,
  before it reads a file or writes anything."""
  env = machine((), SMI_GPUS, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3', PYTHONWARNINGS='ignore')
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'train.py'),
                           '--gin_file=/nonexistent.gin'],
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr[-3000:]
  assert errors[0].startswith('error: nvidia-smi lists 2 GPU(s), but JAX (jax ')
