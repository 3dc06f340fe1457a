"""t5dual.distributed: where a multi-host job's layout comes from, and a peer that never joins
ending in one line instead of a hang. (Two processes that do join and train as one are in
test_partitioning_processes.py.)"""

import os
import socket
import subprocess
import sys
import time

import pytest

from t5dual import cli, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'gpu[001-004]', 'SLURM_NTASKS': '4',
         'SLURM_PROCID': '3', 'SLURM_LOCALID': '0'}


def test_a_single_process_needs_nothing():
  assert distributed.detect(env={}) is None
  assert distributed.detect(env={'T5DUAL_NUM_PROCESSES': '1'}) is None
  assert distributed.detect(env={**SLURM, 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}) is None
  distributed.initialize(None)  # no-op


def test_explicit_layout_from_variables_and_flags():
  env = {'T5DUAL_COORDINATOR': 'host0:1234', 'T5DUAL_NUM_PROCESSES': '4',
         'T5DUAL_PROCESS_ID': '2', 'T5DUAL_INIT_TIMEOUT': '30'}
  assert distributed.detect(env=env) == distributed.Cluster('explicit', 'host0:1234', 4, 2, 30)
  # Flags win over variables; explicit wins over SLURM.
  assert distributed.detect(process_id=1, coordinator='h:9', env={**env, **SLURM}) == (
      distributed.Cluster('explicit', 'h:9', 4, 1, 30))


def test_slurm_and_tpu_layouts_are_left_to_jax_detection():
  assert distributed.detect(env=SLURM) == distributed.Cluster('slurm', None, 4, 3, 300)
  assert distributed.detect(multihost=True, env={}) == distributed.Cluster('auto')
  assert distributed.detect(env={'T5DUAL_MULTIHOST': '1'}) == distributed.Cluster('auto')


@pytest.mark.parametrize('kwargs,env,message', [
    (dict(coordinator='h:1'), {}, r'--coordinator given but not --num_processes '
                                  r'\(T5DUAL_NUM_PROCESSES\), --process_id \(T5DUAL_PROCESS_ID\)'),
    (dict(coordinator='h', num_processes=2, process_id=0), {}, 'expected HOST:PORT'),
    (dict(coordinator='h:1', num_processes=2, process_id=2), {}, 'must be below'),
    ({}, {'T5DUAL_NUM_PROCESSES': 'two'}, r'T5DUAL_NUM_PROCESSES: expected an integer >= 1, '
                                          r"got 'two'"),
    ({}, {'T5DUAL_INIT_TIMEOUT': '0'}, 'expected an integer >= 1'),
])
def test_an_incomplete_layout_is_a_config_error(kwargs, env, message):
  with pytest.raises(cli.ConfigError, match=message):
    distributed.detect(**kwargs, env=env)


def test_process_shares_cover_every_row_once():
  for count in (0, 1, 7, 8, 9):
    for processes in (1, 2, 3):
      shares = [distributed._share(count, p, processes) for p in range(processes)]
      assert [i for a, b in shares for i in range(a, b)] == list(range(count))
      assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_missing_peer_fails_fast_with_one_line(tmp_path):
  """Process 0 of 2 (its peer never starts) and process 1 of 2 (no coordinator listens) of
  a real script stop after the 3 s timeout with one line naming the coordinator, the
  process count and the timeout, before reading any input; so does --multihost where
  there is no cluster to detect, at once."""
  ports = [_free_port(), _free_port()]
  export = [sys.executable, os.path.join(ROOT, 'scripts', 'export.py'), '--model_dir',
            'nowhere', '--side', 'query', '--out_dir', str(tmp_path / 'out'), '--beir',
            'nowhere']
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'T5DUAL_', 'OMPI_', 'JAX_COORDINATOR'))}
  env['JAX_PLATFORMS'] = 'cpu'
  start = time.monotonic()
  procs = [subprocess.Popen(
      export + [f'--coordinator=localhost:{port}', '--num_processes=2', f'--process_id={i}',
                '--init_timeout=3'], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i, port in enumerate(ports)]
  nowhere = subprocess.Popen(export + ['--multihost'], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  outs = [p.communicate(timeout=120) for p in procs]
  elapsed = time.monotonic() - start
  out, err = nowhere.communicate(timeout=120)
  assert nowhere.returncode == 2, (out, err)
  assert err.splitlines() == [
      'error: multi-host start: --multihost / T5DUAL_MULTIHOST found no TPU pod, SLURM step '
      'or MPI job to join; give --coordinator, --num_processes and --process_id'], err
  for i, (p, port, (out, err)) in enumerate(zip(procs, ports, outs)):
    assert p.returncode == 2, (out, err)
    assert err.splitlines() == [
        f'error: multi-host start (explicit): process {i} waited 3 s at coordinator '
        f'localhost:{port} for all 2 processes to join; start the same command on every '
        'host, check that the coordinator is reachable, or raise --init_timeout / '
        'T5DUAL_INIT_TIMEOUT'], err
  # Start-up (importing JAX) plus the timeout, not JAX's own 5-minute default.
  assert elapsed < 60
  assert not (tmp_path / 'out').exists()
