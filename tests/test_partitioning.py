"""The same training run on 1 device, 8 devices (data x model parallel) and 2 processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from t5dual import partitioning, vocab
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


def test_logical_axis_rules_place_parameters():
  import jax
  from t5dual import models, t5
  cfg = models.DualEncoderConfig(t5=t5.t5_config('tiny', vocab_size=256))
  mesh = partitioning.make_mesh(1)
  sh = partitioning.param_shardings(models.DualEncoderModel(cfg).logical_axes(), mesh)
  def spec_of(tree, path):
    for p in path:
      tree = tree[p]
    return tuple(tree.spec)
  assert spec_of(sh, ['token_embedder', 'embedding']) == ('model', None)
  assert spec_of(sh, ['encoder', 'layers_0', 'attention', 'query', 'kernel']) == (None, 'model')
  assert spec_of(sh, ['encoder', 'layers_0', 'mlp', 'wo', 'kernel']) == ('model', None)
  assert spec_of(sh, ['encoder', 'relpos_bias', 'rel_embedding']) == ('model', None)
  with pytest.raises(ValueError, match='model_parallel'):
    partitioning.make_mesh(3, jax.devices() * 2)
