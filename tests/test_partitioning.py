"""The Partitioner: the same training on 1 device, 8 devices (data x model parallel, 1-D and
2-D rules) and 2 processes; parameters and optimizer state laid out as the rules say; clear
errors for meshes and parameters that do not split."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from t5dual import cli, partitioning, vocab
from t5dual.data import demo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'helpers'))
import sharded_train  # noqa: E402
import tolerances  # noqa: E402

# Other partitionings add in other orders: two float32 runs of the same training. Their losses
# are logits of unit vectors (up to 1 / temperature = 100) through 2 layers (4 residual blocks),
# head and loss, the widest reduction the 128-wide MLP; each of the 4 steps adds one rounding
# stage to the weights.
LOSS_ERROR = dict(magnitude=100, depth=6 + 4, width=128, both_sides=True)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('sharding') / 'data')
  demo.write_demo_beir(folder, num_docs=200, num_concepts=40)
  vocab.train_sentencepiece(demo.demo_texts(folder), os.path.join(folder, 'spm'), 256)
  return folder


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  return sharded_train.run(data_dir, str(tmp_path_factory.mktemp('one_device')), 1)


def _launch(args, env_extra=None):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env_extra or {})}
  return subprocess.Popen([sys.executable, os.path.join(HERE, 'helpers', 'sharded_train.py')]
                          + [str(a) for a in args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _losses(output):
  for line in output.splitlines():
    if line.startswith('LOSSES '):
      return json.loads(line[len('LOSSES '):])
  raise AssertionError(f'no losses in output:\n{output[-3000:]}')


def test_eight_devices_data_and_model_parallel(data_dir, reference, tmp_path):
  proc = _launch([data_dir, tmp_path / 'run', 2],
                 {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert 'DEVICES 8' in out
  tolerances.assert_close(_losses(out), reference, **LOSS_ERROR)


def test_two_processes(data_dir, reference, tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [_launch([data_dir, tmp_path / 'run', 1, i, 2, port]) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert 'PROCESSES 2' in outs[0]
  tolerances.assert_close(_losses(outs[0]), reference, **LOSS_ERROR)


@pytest.fixture(scope='module')
def sharded_grads():
  """Runs helpers/sharded_grads.py once on 8 simulated devices (all cases, one start-up)."""
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'helpers', 'sharded_grads.py')],
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                             'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:]
  lines = dict(line.split(' ', 1) for line in proc.stdout.splitlines()
               if line.startswith(('RESULT ', 'INDIVISIBLE ')))
  results = {(tuple(r['mesh']), tuple(r['dims'])): r for r in json.loads(lines['RESULT'])}
  return results, lines['INDIVISIBLE']


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


def test_logical_axis_rules_place_parameters():
  from t5dual import models, t5
  cfg = models.DualEncoderConfig(t5=t5.t5_config('tiny', vocab_size=256))
  sh = partitioning.Partitioner().param_shardings(
      models.DualEncoderModel(cfg).logical_axes())
  def spec_of(tree, path):
    for p in path:
      tree = tree[p]
    return tuple(tree.spec)
  assert spec_of(sh, ['token_embedder', 'embedding']) == ('model', None)
  assert spec_of(sh, ['encoder', 'layers_0', 'attention', 'query', 'kernel']) == (None, 'model')
  assert spec_of(sh, ['encoder', 'layers_0', 'mlp', 'wo', 'kernel']) == ('model', None)
  assert spec_of(sh, ['encoder', 'relpos_bias', 'rel_embedding']) == ('model', None)


def test_standard_rules_are_t5x_rules():
  rules = partitioning.standard_logical_axis_rules
  assert dict(rules(1, 1))['embed'] is None
  assert [m for name, m in rules(1, 2) if name == 'embed'] == ['data']
  assert [m for name, m in rules(2, 1) if name == 'embed'] == ['model']
  assert [m for name, m in rules(2, 2) if name == 'embed'] == ['model', 'data']
  with pytest.raises(cli.ConfigError, match='must each be 1 or 2'):
    rules(3, 1)


def test_mesh_shapes_that_do_not_fit_the_devices_are_config_errors():
  fake = tuple(range(8))  # sizes only: no mesh is built
  assert partitioning.Partitioner(num_partitions=2, devices=fake).mesh_shape == (4, 2)
  assert partitioning.Partitioner(ici_mesh_shape=[2, 2], dcn_mesh_shape=[2, 1],
                                  devices=fake).mesh_shape == (4, 2)
  with pytest.raises(cli.ConfigError, match=r'Partitioner.num_partitions: 3 does not divide '
                     r'the 8 devices'):
    partitioning.Partitioner(num_partitions=3, devices=fake).mesh_shape
  with pytest.raises(cli.ConfigError, match=r'ici_mesh_shape \(2, 2\) has 4 devices, but '
                     r'there are 8'):
    partitioning.Partitioner(ici_mesh_shape=(2, 2), devices=fake).mesh_shape
  with pytest.raises(cli.ConfigError, match='dcn_mesh_shape: needs ici_mesh_shape'):
    partitioning.Partitioner(dcn_mesh_shape=(2, 1))
  with pytest.raises(cli.ConfigError, match='num_partitions: must be a positive integer'):
    partitioning.Partitioner(num_partitions=0)


GIN_FILES = ['gin/models/sde.gin', 'gin/sizes/tiny.gin', 'configs/runs/finetune.gin']


@pytest.mark.parametrize('binding,message', [
    ('partitioning.Partitioner.num_partitions = 3', r'Partitioner.num_partitions: 3 does not '
                                                    r'divide the 4 devices'),
    ('partitioning.Partitioner.ici_mesh_shape = (2, 2)',
     r'^BATCH_SIZE .*3 is not divisible by the data-parallel size 2 \(4 devices / '
     r'model_parallel 2\)'),
    ('partitioning.Partitioner.parameter_partitioning_dims = 3', r'must each be 1 or 2'),
])
def test_the_partitioner_comes_from_gin(tmp_path, monkeypatch, binding, message):
  import gin
  import jax
  from t5dual import gin_utils, train_lib
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  gin.clear_config()
  try:
    gin_utils.parse_gin(GIN_FILES, [f"MODEL_DIR = '{tmp_path / 'run'}'",
                                    "MIXTURE_OR_TASK_NAME = 'beir:/nonexistent'",
                                    'BATCH_SIZE = 3', binding])
    with pytest.raises(cli.ConfigError, match=message):
      gin_utils.call_configured(train_lib.run)
  finally:
    gin.clear_config()
  assert not (tmp_path / 'run').exists()
