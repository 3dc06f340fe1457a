"""The Partitioner's rules and meshes: logical axis rules place parameters as T5X's do, mesh
shapes that do not fit the devices are config errors, the partitioner comes from gin. The
trainings on 8 devices and 2 processes are in test_partitioning_processes.py."""

import pytest

from t5dual import cli, partitioning


def test_logical_axis_rules_place_parameters():
  from t5dual import dual_encoders, t5
  cfg = dual_encoders.DualEncoderConfig(t5=t5.t5_config('tiny', vocab_size=256))
  sh = partitioning.Partitioner().param_shardings(
      dual_encoders.DualEncoderModel(cfg).logical_axes())
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
