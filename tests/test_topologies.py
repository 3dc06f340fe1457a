"""configs/topologies/*.gin: each preset parses, its mesh has as many devices as its
topology, its remat / scan settings are valid T5 settings, and T5.1.1-XXL's parameters
split over its mesh (checked from abstract shapes; nothing is allocated)."""

import functools
import glob
import math
import os

import gin
import jax
import pytest

from t5dual import dual_encoders, gin_utils, partitioning, t5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'topologies', '*.gin')))

# JAX devices of each topology, from the vendors' names: TPU v4 and v5p names count
# TensorCores, two per chip, and JAX has one device per chip (megacore); v5e names count
# chips, one TensorCore each; 'NxH100' counts GPUs; a 'Kx' prefix is K slices or nodes.
DEVICES = {'v4-8': 4, 'v4-128': 64, 'v5e-256': 256, '2xv5e-256': 512, 'v5p-512': 256,
           '1xh100': 1, '8xh100': 8, '2x8xh100': 16}


def _name(path):
  return os.path.basename(path)[:-len('.gin')]


def test_every_preset_has_a_known_device_count():
  assert sorted(map(_name, PRESETS)) == sorted(DEVICES)


@functools.lru_cache(maxsize=None)
def _xxl_shapes():
  """Abstract parameters of a T5.1.1-XXL ADE-SPL (two towers) and their logical axes.

  Scanned: the same split dimensions as unrolled plus a replicated 'layers' axis, and
  tracing 24 unrolled layers would take seconds for nothing more.
  """
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=t5.t5_config('xxl', scan_layers=True), architecture='ade_spl'))
  return model.logical_axes(), jax.eval_shape(model.init_params, jax.random.PRNGKey(0))


@pytest.mark.parametrize('path', PRESETS, ids=_name)
def test_preset_mesh_fits_its_topology(path):
  devices = DEVICES[_name(path)]
  gin.clear_config()
  try:
    gin_utils.parse_gin([path], [f'partitioning.Partitioner.devices = {tuple(range(devices))}'])
    partitioner = gin.get_configurable(partitioning.Partitioner)()
    config = gin.get_configurable(t5.t5_config)(size='xxl')
  finally:
    gin.clear_config()
  assert partitioner.ici_mesh_shape is not None  # every preset states its mesh
  assert math.prod(partitioner.mesh_shape) == devices
  if partitioner.dcn_mesh_shape is not None:
    # Multi-slice / multi-node: the data axis alone crosses the slower network.
    assert partitioner.dcn_mesh_shape[1] == 1 and partitioner.dcn_mesh_shape[0] > 1
  assert config.remat in t5.REMAT_POLICIES
  logical_axes, shapes = _xxl_shapes()
  partitioner.check_divisible(logical_axes, shapes)  # raises PartitioningError otherwise
