"""GradCache and microbatch accumulation on 8 simulated devices, for test_grad_strategies.

usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 grad_strategies.py
Prints one line `RESULT <json>`: per case, the loss and the gradients (as max
|difference| per leaf) of a strategy on a sharded mesh (data 4 x model 2, 2-D
parameter partitioning: every kernel split over both axes) beside a one-device
reference that differentiates the plain loss with jax.value_and_grad; and the
trainer's own jitted GradCache step there against the reference's metrics.
"""
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from t5dual import dual_encoders, gradients, optim, partitioning, ranking_losses, rerankers, t5
from t5dual import trainer

EMBED = 32  # emb_dim: no other dimension of these models has this size
CHUNKS = 4
BATCH = 16


def t5_config(dropout_rate=0.0):
  # Every split dimension divides by 8: vocab 256, heads 8, joined_kv 48, mlp 64, embed 32.
  return t5.T5Config(vocab_size=256, emb_dim=EMBED, num_heads=8, head_dim=6, mlp_dim=64,
                     num_layers=1, relative_attention_num_buckets=8, dtype='float32',
                     dropout_rate=dropout_rate)


def dual_encoder(architecture, loss, dropout_rate=0.0):
  return dual_encoders.DualEncoderModel(
      dual_encoders.DualEncoderConfig(t5=t5_config(dropout_rate), architecture=architecture,
                               projection_dim=16), loss)


def contrastive_batch():
  """Hard negatives and duplicates: queries 0 and 1 share an id, documents 2 and 3 too,
  and row 5's first hard negative is its own positive document."""
  rng = np.random.default_rng(0)
  query_ids = np.arange(BATCH, dtype=np.int32)
  query_ids[1] = 0
  doc_ids = np.arange(BATCH, dtype=np.int32)
  doc_ids[3] = 2
  negative_ids = np.arange(100, 100 + 2 * BATCH, dtype=np.int32).reshape(BATCH, 2)
  negative_ids[5, 0] = doc_ids[5]
  return {'inputs': rng.integers(2, 256, (BATCH, 8)).astype(np.int32),
          'targets': rng.integers(2, 256, (BATCH, 12)).astype(np.int32),
          'negative_targets': rng.integers(2, 256, (BATCH, 2, 12)).astype(np.int32),
          'query_ids': query_ids, 'doc_ids': doc_ids, 'negative_ids': negative_ids}


def list_batch():
  rng = np.random.default_rng(1)
  labels = np.zeros((BATCH, 4), np.float32)
  labels[np.arange(BATCH), rng.integers(0, 4, BATCH)] = 1.0
  return {'inputs': rng.integers(2, 256, (BATCH, 4, 10)).astype(np.int32),
          'labels': labels, 'where': np.ones((BATCH, 4), bool)}


def chunked_reference(model, params, batch, dropout_rng):
  """GradCache's objective written plainly: chunk k (rows k::CHUNKS) embedded with the k-th
  split of the rng, the embeddings put back in batch order, the loss differentiated through
  all of it by jax.value_and_grad (no cache, no scan, no vjp)."""
  rngs = jax.random.split(dropout_rng, CHUNKS)

  def loss(p):
    parts = [model.embed(p, jax.tree.map(lambda x: x[k::CHUNKS], batch), rngs[k])
             for k in range(CHUNKS)]
    full = jax.tree.map(lambda *xs: jnp.zeros((BATCH,) + xs[0].shape[1:]), *parts)
    for k, part in enumerate(parts):
      full = jax.tree.map(lambda f, x: f.at[k::CHUNKS].set(x), full, part)
    return model.loss_from_embeddings(full, batch)
  return jax.value_and_grad(loss, has_aux=True)(params)


def compare(got, want):
  """Per-leaf max |got - want| of the gradients, the reference's largest |gradient|, losses."""
  (loss, _), grads = got
  (ref_loss, _), ref_grads = want
  return {'loss': float(loss), 'ref_loss': float(ref_loss),
          'grad_diffs': [float(np.max(np.abs(np.asarray(g) - np.asarray(w))))
                         for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))],
          'grad_scale': max(float(np.max(np.abs(w))) for w in jax.tree.leaves(ref_grads))}


def on_mesh(p, model, fn, params, batch, *args):
  """fn(params, batch, *args) jitted on partitioner p, parameters in their shardings."""
  layout = trainer.state_layout(model, optim.adafactor(1e-2), p)
  params = jax.device_put(params, layout.param_shardings)
  return jax.device_get(p.partition(fn)(params, p.shard_batch(batch), *args))


def main():
  assert jax.device_count() == 8, jax.device_count()
  mesh = partitioning.Partitioner(ici_mesh_shape=(4, 2), parameter_partitioning_dims=2)
  opt = optim.adafactor(1e-2, min_dim_size_to_factor=8)  # factor the small kernels too
  results = {}

  # GradCache without dropout against the whole batch: query- and document-side SamToNe,
  # hard negatives, duplicate masks; gradients, then the trainer's own step.
  model = dual_encoder('ade_spl', dual_encoders.LossConfig('samtone', same_tower_negatives='both'))
  batch = contrastive_batch()
  params = jax.device_get(jax.jit(model.init_params)(jax.random.PRNGKey(0)))
  reference = jax.device_get(jax.jit(gradients.full_batch(model))(params, batch, None))
  results['grad_cache'] = compare(
      on_mesh(mesh, model, gradients.grad_cache(model, CHUNKS), params, batch, None), reference)

  step, layout = trainer.build_train_step(model, opt, mesh, batch, grad_strategy='grad_cache',
                                          num_microbatches=CHUNKS)
  state = trainer.init_train_state(model, opt, mesh, layout, 0, initial_params=params)
  new_params, _, bad, metrics = jax.device_get(step(
      *state, jax.device_put(np.int32(0), mesh.replicated), mesh.shard_batch(batch),
      np.int32(0)))  # dropout is off (rate 0): the step's rng does not matter
  (_, ref_metrics), ref_grads = reference
  ref_metrics['grad_norm'] = np.sqrt(sum(np.sum(np.square(g.astype(np.float64)))
                                         for g in jax.tree.leaves(ref_grads)))
  results['grad_cache_step'] = {
      'bad_step': int(bad), 'metrics': {k: float(v) for k, v in metrics.items()},
      'ref_metrics': {k: float(v) for k, v in ref_metrics.items()},
      'params_moved': min(float(np.max(np.abs(a - b))) for a, b in
                          zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))}

  # GradCache with dropout (SDE, PAIR loss) against the same chunks differentiated plainly.
  model = dual_encoder('sde', dual_encoders.LossConfig('pair'), dropout_rate=0.1)
  params = jax.device_get(jax.jit(model.init_params)(jax.random.PRNGKey(1)))
  rng = jax.random.PRNGKey(7)
  reference = jax.device_get(jax.jit(functools.partial(chunked_reference, model))(
      params, batch, rng))
  results['grad_cache_dropout'] = compare(
      on_mesh(mesh, model, gradients.grad_cache(model, CHUNKS), params, batch, rng), reference)
  results['grad_cache_dropout']['no_dropout_loss'] = float(
      jax.jit(model.loss_fn)(params, batch, None)[0])

  # Accumulation over 4 microbatches of a RankT5-Enc reranker's listwise softmax loss.
  model = rerankers.RerankerModel(
      rerankers.RerankerConfig(t5=t5_config(), scorer='enc', input_length=10),
      ranking_losses.softmax_loss)
  batch = list_batch()
  params = jax.device_get(jax.jit(model.init_params)(jax.random.PRNGKey(2)))
  reference = jax.device_get(jax.jit(gradients.full_batch(model))(params, batch, None))
  got = on_mesh(mesh, model, gradients.accumulate(model, CHUNKS), params, batch, None)
  results['accumulate'] = compare(got, reference)
  results['accumulate'].update(metrics={k: float(v) for k, v in got[0][1].items()},
                               ref_metrics={k: float(v) for k, v in reference[0][1].items()})

  print('RESULT', json.dumps(results))
  sys.stdout.flush()


if __name__ == '__main__':
  main()
