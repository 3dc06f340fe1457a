"""Initial checkpoints of every format read straight into a model-parallel layout, for
test_initial_checkpoint.

usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 sharded_restore.py WORK_DIR
Writes tiny checkpoints (T5X, Hugging Face, t5dual directories, scanned and
unrolled) under WORK_DIR, loads each into a model on a (2, 4) mesh with and
without the layout's shardings, and prints one line `RESULT <json>`: per case,
the parameters whose values differ from the unsharded load, those whose
sharding is not the layout's, and those of which some device holds another
shape than its shard (one process start for every case).
"""
import dataclasses
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5dual import checkpoints, dual_encoders, layer_layout, partitioning, rerankers, t5
from t5dual.interop import hf, load_initial_params, t5x, trees

# Every split dimension divides by the model axis (4): vocab, heads, mlp, embed.
T5 = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32, num_layers=2,
                 relative_attention_num_buckets=8, dtype='float32')


def dual_encoder(architecture='sde', scan=False):
  cfg = dataclasses.replace(T5, scan_layers=scan)
  return dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=cfg, architecture=architecture,
                                                          projection_dim=8))


def reranker(scorer='encdec'):
  return rerankers.RerankerModel(rerankers.RerankerConfig(t5=T5, scorer=scorer,
                                                          scoring_token_id=5))


def random_params(model, seed):
  """Random values (not the init's: every parameter differs from a fresh one)."""
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)


def t5dual_dir(path, model, params):
  checkpoints.write_model_json(path, checkpoints.model_description(model, 'none.model',
                                                                   {'inputs': 8}))
  manager = checkpoints.checkpoint_manager(path)
  manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
  manager.wait_until_finished()
  manager.close()
  return path


def check(name, path, model, partitioner):
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  shardings = partitioner.param_shardings(model.logical_axes(), shapes)
  want = jax.device_get(load_initial_params(path, model))
  got = load_initial_params(path, model, shardings)
  flat_got, flat_want = trees.flatten(got), trees.flatten(want)
  flat_sh, flat_shapes = trees.flatten(shardings), trees.flatten(shapes)
  unequal, misplaced, wrong_shards = [], [], []
  for k, leaf in flat_got.items():
    if not np.array_equal(np.asarray(jax.device_get(leaf)), np.asarray(flat_want[k])):
      unequal.append(k)
    if not isinstance(leaf, jax.Array) or not leaf.sharding.is_equivalent_to(flat_sh[k],
                                                                              leaf.ndim):
      misplaced.append(k)
      continue
    split = flat_sh[k].shard_shape(flat_shapes[k].shape)
    if any(s.data.shape != split for s in leaf.addressable_shards):
      wrong_shards.append(k)
  split_params = sum(flat_sh[k].shard_shape(v.shape) != v.shape for k, v in flat_shapes.items())
  return {'case': name, 'params': len(flat_got), 'split': int(split_params),
          'unequal': unequal, 'misplaced': misplaced, 'wrong_shards': wrong_shards,
          'same_keys': sorted(flat_got) == sorted(flat_want)}


def main(work):
  assert jax.device_count() == 8, jax.device_count()
  partitioner = partitioning.Partitioner(num_partitions=4)
  sde, sde_scanned = dual_encoder(), dual_encoder(scan=True)
  encdec = reranker()
  sde_params = random_params(sde, 1)
  encdec_params = random_params(encdec, 2)
  t5x_sde = t5x.write_checkpoint(os.path.join(work, 't5x_sde', 'checkpoint_3'), sde_params,
                                 step=3, tensorstore_min_bytes=256)
  t5x_encdec = t5x.write_checkpoint(os.path.join(work, 't5x_encdec', 'checkpoint_5'),
                                    encdec_params, step=5, tensorstore_min_bytes=256)
  hf_dir = hf.save_encoder(os.path.join(work, 'hf'), sde_params, T5)
  dir_sde = t5dual_dir(os.path.join(work, 'sde'), sde, sde_params)
  dir_scanned = t5dual_dir(os.path.join(work, 'sde_scanned'), sde_scanned,
                           layer_layout.unrolled_to_scan(sde_params))
  cases = [
      ('t5x -> sde', t5x_sde, sde),
      ('t5x -> scanned sde', t5x_sde, sde_scanned),
      ('t5x -> ade (both towers, projection)', t5x_sde, dual_encoder('ade')),
      ('t5x encoder-decoder -> encdec reranker', t5x_encdec, encdec),
      ('t5x encoder-decoder -> scanned yes_no reranker', t5x_encdec,
       rerankers.RerankerModel(rerankers.RerankerConfig(
           t5=dataclasses.replace(T5, scan_layers=True), scorer='yes_no', yes_token_id=5,
           no_token_id=6))),
      ('hf -> ade_spl (fresh projection)', hf_dir, dual_encoder('ade_spl')),
      ('hf -> scanned sde', hf_dir, sde_scanned),
      ('t5dual sde -> same sde', dir_sde, sde),
      ('t5dual scanned sde -> same', dir_scanned, sde_scanned),
      ('t5dual sde -> scanned sde', dir_sde, sde_scanned),
      ('t5dual scanned sde -> sde', dir_scanned, sde),
      ('t5dual sde -> encdec reranker (fresh decoder)', dir_sde, encdec),
  ]
  print('RESULT', json.dumps([check(name, path, model, partitioner)
                              for name, path, model in cases]))
  sys.stdout.flush()


if __name__ == '__main__':
  main(sys.argv[1])
