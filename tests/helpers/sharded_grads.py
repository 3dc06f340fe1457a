"""Loss, gradients and one train step of a tiny ADE-SPL on several meshes, for test_partitioning.

usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 sharded_grads.py [DATA_DIR MODEL_DIR]
Prints one line `RESULT <json>` with, per (mesh, rules) case, the largest
differences from one device (already divided by the tolerance of each array)
and the partition specs and shard shapes of a parameter and its Adafactor
moments; and `INDIVISIBLE <message>` for a model whose 12 heads do not split
over model_parallel 8. With DATA_DIR and MODEL_DIR it also trains as
sharded_train.py does, model-parallel 2 over the 8 devices, and prints
`LOSSES [...]` (one process start for every 8-device case).
"""
import functools
import json
import sys

import jax
import numpy as np

from t5dual import dual_encoders, optim, partitioning, t5, trainer

# (data, model) mesh shapes x (activation, parameter) partitioning dims.
CASES = [((8, 1), (1, 1)), ((4, 2), (1, 1)), ((2, 4), (1, 1)), ((1, 8), (1, 1)),
         ((8, 1), (1, 2)), ((4, 2), (1, 2)), ((2, 4), (1, 2)), ((1, 8), (1, 2)),
         ((2, 4), (2, 2))]
STEP_MESH = (2, 4)  # where the whole train step is compared too
MLP_KERNEL = ('left_tower', 'encoder', 'layers_0', 'mlp', 'wi_0', 'kernel')  # [embed, mlp]


def tiny_model(num_heads=8):
  # Every split dimension divides by 8: vocab 256, heads 8, joined_kv 48, mlp 64, embed 32.
  cfg = t5.T5Config(vocab_size=256, emb_dim=32, num_heads=num_heads, head_dim=6, mlp_dim=64,
                    num_layers=1, relative_attention_num_buckets=8, dtype='float32')
  return dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=cfg, architecture='ade_spl',
                                                          projection_dim=16))


def batch(size=16):
  rng = np.random.default_rng(0)
  return {'inputs': rng.integers(2, 256, (size, 8)).astype(np.int32),
          'targets': rng.integers(2, 256, (size, 12)).astype(np.int32),
          'query_ids': np.arange(size, dtype=np.int32),
          'doc_ids': np.arange(size, dtype=np.int32)}


def tolerance(reference):
  """Allowed |sharded - one device| of each array.

  Sharding changes only the order of float32 sums (partial matmuls over the
  model axis, then an all-reduce; gradient sums over the data axis). Each sum's
  rounding error is at most ~ n * eps * sum|terms| for n terms; with n <= 64
  here (the mlp width), eps = 2**-24 and a few such sums in sequence, that is
  ~1e-5 of the magnitude of what is summed. The array's largest magnitude
  bounds that scale (gradient entries with cancellations get the same absolute
  allowance as the largest entry).
  """
  return 1e-5 * max(float(np.max(np.abs(reference))), 1e-30)


def worst(got, want):
  """max over leaves of max|got - want| / tolerance(want); <= 1 passes."""
  return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) / tolerance(w)
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def factored_state(opt_state):
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, 'v_row'))
              if hasattr(s, 'v_row'))


def at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def main():
  assert jax.device_count() == 8, jax.device_count()
  model, data = tiny_model(), batch()
  # Factor the 32 x 64 kernels too (the default factors only dims >= 128).
  opt = optim.adafactor(1e-2, min_dim_size_to_factor=8)
  loss_and_grad = jax.value_and_grad(lambda p, b: model.loss_fn(p, b, None)[0])

  # The reference: plain jit on one device, no partitioner involved.
  ref_params = jax.device_get(jax.jit(model.init_params)(jax.random.PRNGKey(0)))
  ref_loss, ref_grads = jax.device_get(jax.jit(loss_and_grad)(ref_params, data))
  ref_step = jax.jit(functools.partial(trainer.guarded_train_step, model, opt, 0))
  ref_new, ref_opt, _, _ = jax.device_get(ref_step(ref_params, opt.init(ref_params),
                                                   np.int32(0), data, np.int32(0)))

  results = []
  for (data_size, model_size), (act_dims, param_dims) in CASES:
    p = partitioning.Partitioner(ici_mesh_shape=(data_size, model_size),
                                 activation_partitioning_dims=act_dims,
                                 parameter_partitioning_dims=param_dims)
    step, layout = trainer.build_train_step(model, opt, p, data)
    params, opt_state = trainer.init_train_state(model, opt, p, layout, seed=0,
                                                 initial_params=ref_params)
    sharded_batch = p.shard_batch(data)
    grad_fn = p.partition(loss_and_grad, in_shardings=(layout.param_shardings,
                                                       p.batch_shardings(data)),
                          out_shardings=(p.replicated, layout.param_shardings))
    loss, grads = grad_fn(params, sharded_batch)
    kernel, state = at(params, MLP_KERNEL), factored_state(opt_state)
    v_row, v_col = at(state.v_row, MLP_KERNEL), at(state.v_col, MLP_KERNEL)
    layout_seen = {  # before the step donates (deletes) params and opt_state
        'kernel_param_spec': list(kernel.sharding.spec),
        'kernel_grad_spec': list(at(grads, MLP_KERNEL).sharding.spec),
        'kernel_shard': list(kernel.addressable_shards[0].data.shape),
        'v_row_shape': list(v_row.shape), 'v_row_spec': list(v_row.sharding.spec),
        'v_row_shard': list(v_row.addressable_shards[0].data.shape),
        'v_col_shape': list(v_col.shape), 'v_col_spec': list(v_col.sharding.spec),
        'v_col_shard': list(v_col.addressable_shards[0].data.shape),
    }
    result = {'mesh': [data_size, model_size], 'dims': [act_dims, param_dims],
              'loss': float(loss), 'ref_loss': float(ref_loss),
              'grads': worst(grads, ref_grads), **layout_seen}
    if (data_size, model_size) == STEP_MESH:  # compiling the step is the slow part
      flag = jax.device_put(np.int32(0), p.replicated)
      new, new_opt, bad, _ = step(params, opt_state, flag, sharded_batch, np.int32(0))
      new_state, ref_state = factored_state(new_opt), factored_state(ref_opt)
      result.update({
          'params_after_step': worst(new, ref_new),
          'moments_after_step': worst((new_state.v_row, new_state.v_col, new_state.v),
                                      (ref_state.v_row, ref_state.v_col, ref_state.v)),
          'bad_step': int(bad), 'next_kernel_spec': list(at(new, MLP_KERNEL).sharding.spec)})
    results.append(result)
  print('RESULT', json.dumps(results))

  try:
    trainer.state_layout(tiny_model(num_heads=12), opt, partitioning.Partitioner(num_partitions=8))
  except partitioning.PartitioningError as e:
    print('INDIVISIBLE', e)
  if len(sys.argv) > 2:
    import sharded_train  # this folder is on the path of a script run from it
    print('LOSSES', json.dumps(sharded_train.run(sys.argv[1], sys.argv[2], 2)))
  sys.stdout.flush()


if __name__ == '__main__':
  main()
