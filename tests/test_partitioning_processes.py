"""The Partitioner run: the same training on 1 device, 8 devices (data x model parallel, 1-D and
2-D rules) and 2 processes (then each writes its own export shards); parameters and optimizer
state laid out as the rules say; a clear error for a parameter that does not split. The rules
and mesh checks that run nothing are in test_partitioning.py.

Each process start pays for JAX's import and compilations, so there are two: one on 8
simulated devices runs every single-process case (helpers/sharded_grads.py), and one
2-process job (helpers/sharded_train.py)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'helpers'))
import sharded_train  # noqa: E402
import tolerances  # noqa: E402

# Every test reads the results of processes started by the module's fixtures.
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


# Other partitionings add in other orders: two float32 runs of the same training. Their losses
# are logits of unit vectors (up to 1 / temperature = 100) through 2 layers (4 residual blocks),
# head and loss, the widest reduction the 128-wide MLP; each of the 4 steps adds one rounding
# stage to the weights.
LOSS_ERROR = dict(magnitude=100, depth=6 + 4, width=128, both_sides=True)


@pytest.fixture(scope='module')
def data_dir(demo_collection):
  return demo_collection


@pytest.fixture(scope='module')
def reference(data_dir, launched, tmp_path_factory):
  # Computed here while the launched processes compile.
  return sharded_train.run(data_dir, str(tmp_path_factory.mktemp('one_device')), 1)


def _helper(name, args, env_extra):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **env_extra}
  return subprocess.Popen([sys.executable, os.path.join(HERE, 'helpers', name)]
                          + [str(a) for a in args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _lines(output, *keys):
  """{key: rest of the first line that starts with `key `} for each key."""
  found = {}
  for line in output.splitlines():
    key, _, rest = line.partition(' ')
    if key in keys and key not in found:
      found[key] = rest
  missing = [k for k in keys if k not in found]
  assert not missing, f'no {missing} in output:\n{output[-3000:]}'
  return found


@pytest.fixture(scope='module')
def launched(data_dir, tmp_path_factory):
  """Starts both jobs at once: helpers/sharded_grads.py on 8 simulated devices (every mesh
  and rules case, the indivisible model, training model-parallel 2), and
  helpers/sharded_train.py as 2 processes of 2 CPU devices each, joined by
  t5dual.distributed from the T5DUAL_* variables (training over the global 4-device mesh,
  data 2 x model 2, then each process exports its shards from the checkpoint)."""
  folder = tmp_path_factory.mktemp('launched')
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  eight = _helper('sharded_grads.py', [data_dir, folder / 'eight'],
                  {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  two = [_helper('sharded_train.py', [data_dir, folder / 'run', 2, folder / 'export'],
                 {'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
                  'T5DUAL_COORDINATOR': f'localhost:{port}', 'T5DUAL_NUM_PROCESSES': '2',
                  'T5DUAL_PROCESS_ID': str(i), 'T5DUAL_INIT_TIMEOUT': '120'})
         for i in range(2)]
  yield {'eight': eight, 'two': two, 'folder': folder}
  for p in [eight] + two:  # a failed test may leave them running
    if p.poll() is None:
      p.kill()
      p.communicate()


def _finish(proc, timeout=900):
  out = proc.communicate(timeout=timeout)[0]
  assert proc.returncode == 0, out[-3000:]
  return out


@pytest.fixture(scope='module')
def eight_devices(launched):
  return _lines(_finish(launched['eight']), 'RESULT', 'INDIVISIBLE', 'LOSSES')


@pytest.fixture(scope='module')
def sharded_grads(eight_devices):
  results = {(tuple(r['mesh']), tuple(r['dims'])): r
             for r in json.loads(eight_devices['RESULT'])}
  return results, eight_devices['INDIVISIBLE']


def test_eight_devices_data_and_model_parallel(eight_devices, reference):
  tolerances.assert_close(json.loads(eight_devices['LOSSES']), reference, **LOSS_ERROR)


@pytest.fixture(scope='module')
def two_processes(launched):
  outs = [_finish(p) for p in launched['two']]
  folder = launched['folder']
  return {**_lines(outs[0], 'LOSSES', 'DEVICES', 'MANIFEST', 'GATHER'),
          'model_dir': str(folder / 'run'), 'export_dir': str(folder / 'export')}


def test_two_processes_train_as_one(two_processes, reference):
  assert two_processes['DEVICES'] == '4 PROCESSES 2'
  tolerances.assert_close(json.loads(two_processes['LOSSES']), reference, **LOSS_ERROR)
  assert two_processes['GATHER'] == 'ok'


def test_two_processes_write_their_own_export_shards(two_processes, data_dir):
  from t5dual import checkpoints, encoding, export
  from t5dual.data import sources
  manifest = json.loads(two_processes['MANIFEST'])
  # 200 documents in shards of 64: shard n written by process n % 2.
  assert [s['process_index'] for s in manifest['shards']] == [0, 1, 0, 1]
  # The checkpoint the two processes wrote, read and encoded here by one process.
  ids, texts = sources.read_beir_corpus(data_dir)
  restored = checkpoints.restore_for_inference(two_processes['model_dir'])
  want = encoding.encode_texts(
      encoding.make_encode_fn(restored.model, restored.params, 'document'), restored.tokenizer,
      texts, restored.feature_lengths['targets'], 8)
  got = export.open_embeddings(two_processes['export_dir'])
  assert got.ids == list(ids)
  # The same parameters and batches; only the split of a batch over devices differs (2
  # local devices there, 1 here), which may change the order of float32 sums: unit
  # vectors through 2 layers, a few eps of 1 at most.
  np.testing.assert_allclose(got.to_numpy(), want, rtol=0, atol=1e-5)


# (data, model) x (activation, parameter) partitioning dims; see helpers/sharded_grads.py.
CASES = [((8, 1), (1, 1)), ((4, 2), (1, 1)), ((2, 4), (1, 1)), ((1, 8), (1, 1)),
         ((8, 1), (1, 2)), ((4, 2), (1, 2)), ((2, 4), (1, 2)), ((1, 8), (1, 2)),
         ((2, 4), (2, 2))]


@pytest.mark.parametrize('mesh,dims', CASES)
def test_loss_and_gradients_equal_one_device(sharded_grads, mesh, dims):
  r = sharded_grads[0][(mesh, dims)]
  np.testing.assert_allclose(r['loss'], r['ref_loss'], rtol=1e-5)
  # Differences over the float32 tolerance derived in sharded_grads.tolerance.
  assert r['grads'] <= 1, r
  if 'params_after_step' in r:  # the trainer's own jitted, donated, guarded step
    assert r['bad_step'] == 0
    assert r['params_after_step'] <= 1 and r['moments_after_step'] <= 1, r
    assert r['next_kernel_spec'] == r['kernel_param_spec']


@pytest.mark.parametrize('mesh,dims', CASES)
def test_parameters_and_adafactor_moments_are_partitioned_by_the_rules(sharded_grads, mesh,
                                                                       dims):
  r = sharded_grads[0][(mesh, dims)]
  data, model = mesh
  # wi_0 kernel [embed 32, mlp 64]: mlp over 'model'; embed over 'data' with 2-D parameters.
  embed_axis = 'data' if dims[1] == 2 else None
  assert r['kernel_param_spec'] == [embed_axis, 'model']
  assert r['kernel_grad_spec'] == r['kernel_param_spec']
  assert r['kernel_shard'] == [32 // (data if embed_axis else 1), 64 // model]
  # Adafactor factors [32, 64] into v_row [32] (the largest dim, mlp, dropped) and
  # v_col [64] (embed dropped); each keeps the spec of the dimension it keeps.
  assert (r['v_row_shape'], r['v_row_spec']) == ([32], [embed_axis])
  assert r['v_row_shard'] == [32 // (data if embed_axis else 1)]
  assert (r['v_col_shape'], r['v_col_spec']) == ([64], ['model'])
  assert r['v_col_shard'] == [64 // model]


def test_an_indivisible_axis_names_the_parameter_and_the_sizes_that_work(sharded_grads):
  # 12 heads over model_parallel 8, found from abstract shapes before any allocation.
  assert sharded_grads[1] == (
      'parameter left_tower/encoder/relpos_bias/rel_embedding: dimension 0 of size 12 cannot '
      'be split over mesh axis model of size 8 (mesh data 1 x model 8); model-parallel sizes '
      'that work with 8 devices: 1, 2, 4')
