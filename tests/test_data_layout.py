"""partitioning.DataLayout: which rows of each global batch a process loads, from the mesh.

Pods are laid out with fake devices (only `process_index` matters), in the shapes real ones
have; the batchers' slices put back together are the one-process batch."""

import dataclasses

import numpy as np
import pytest

from t5dual import cli, partitioning


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int


class FakeMesh:
  """What data_layout reads of a jax Mesh: .devices [data, model] and .shape."""

  def __init__(self, processes, per_process, data, model, order=None):
    devices = [FakeDevice(i, i // per_process) for i in range(processes * per_process)]
    if order is not None:
      devices = [devices[i] for i in order]
    self.devices = np.array(devices, dtype=object).reshape(data, model)
    self.shape = {'data': data, 'model': model}


def _layouts(mesh, processes):
  return [partitioning.data_layout(mesh, p) for p in range(processes)]


def test_v4_128_with_model_parallel_8_two_hosts_share_each_shard():
  # 16 hosts x 4 chips, mesh (8, 8): each data row is 8 chips, i.e. two hosts.
  layouts = _layouts(FakeMesh(16, 4, 8, 8), 16)
  assert [(l.shard_index, l.num_shards) for l in layouts] == [(p // 2, 8) for p in range(16)]
  assert layouts[5].rows(512) == range(128, 192)


def test_data_parallel_hosts_each_load_their_own_block():
  layouts = _layouts(FakeMesh(16, 4, 64, 1), 16)  # 4 data rows a host
  assert [(l.shard_index, l.num_shards) for l in layouts] == [(p, 16) for p in range(16)]
  # Model-parallel 2 inside each host: 2 data rows a host.
  assert [(l.shard_index, l.num_shards) for l in _layouts(FakeMesh(4, 4, 8, 2), 4)] == [
      (p, 4) for p in range(4)]


def test_the_model_axis_across_all_processes_makes_one_shard():
  assert [(l.shard_index, l.num_shards) for l in _layouts(FakeMesh(2, 2, 1, 4), 2)] == [
      (0, 1), (0, 1)]
  one = partitioning.data_layout(FakeMesh(1, 8, 4, 2), 0)
  assert (one.shard_index, one.num_shards) == (0, 1) and one.rows(16) == range(16)


def test_meshes_no_batch_can_follow_are_one_line_config_errors():
  # Process 0 holds data rows 0 and 2, process 1 rows 1 and 3.
  scattered = FakeMesh(2, 2, 4, 1, order=[0, 2, 1, 3])
  with pytest.raises(cli.ConfigError, match=r'partitioning.Partitioner: the mesh .* uneven or '
                     r'non-contiguous data rows \(\{0: \[0, 2\], 1: \[1, 3\]\}\)'):
    partitioning.data_layout(scattered, 0)
  # 3 processes of 2 devices on a (3, 2) mesh is fine; on (2, 3) process 1 straddles rows.
  with pytest.raises(cli.ConfigError, match='uneven or non-contiguous'):
    partitioning.data_layout(FakeMesh(3, 2, 2, 3), 0)
  with pytest.raises(cli.ConfigError, match='process 2 holds no device'):
    partitioning.data_layout(FakeMesh(2, 2, 2, 2), 2)


def test_a_real_partitioner_on_one_process():
  layout = partitioning.Partitioner().data_layout
  assert (layout.shard_index, layout.num_shards) == (0, 1)


def _pair_batcher(tmp_path, num_negatives):
  import json
  from t5dual import vocab
  from t5dual.data import pipeline, sources
  words = 'alpha beta gamma delta epsilon zeta eta theta iota kappa'.split()
  path = tmp_path / 'pairs.jsonl'
  with open(path, 'w') as f:
    for i in range(36):
      f.write(json.dumps({'query': f'q {words[i % 10]} {i}', 'positive': f'd {words[i % 7]} {i}',
                          'negatives': [f'n {words[(i + k) % 10]} {k}' for k in range(1 + i % 4)]
                          }) + '\n')
  texts = [f'{w} {i} q d n' for w in words for i in range(40)]
  tokenizer = vocab.Tokenizer(vocab.train_sentencepiece(texts, str(tmp_path / 'spm'), 80))
  return pipeline.PairBatcher(sources.load_examples(f'jsonl:{path}'), tokenizer, 8,
                              {'inputs': 8, 'targets': 8}, num_negatives=num_negatives, seed=3)


@pytest.mark.parametrize('num_shards', [2, 4, 8])
def test_pair_batch_slices_put_together_are_the_one_process_batch(tmp_path, num_shards):
  """Hard negatives included: a row's negatives do not depend on how many slices there are."""
  batcher = _pair_batcher(tmp_path, num_negatives=2)
  for step in (0, 4, 9):  # 36 pairs, 8 a batch: batches 4 and 9 span two epochs
    whole = batcher.batch(step)
    parts = [batcher.batch(step, k, num_shards) for k in range(num_shards)]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key],
                                    err_msg=key)


def test_a_batch_the_shards_do_not_divide_is_a_config_error(tmp_path):
  with pytest.raises(cli.ConfigError, match='batch size 8 is not divisible by the 3 data shards'):
    _pair_batcher(tmp_path, 0).batch(0, 0, 3)
