#!/usr/bin/env python
"""Training and encoding throughput of t5dual on the current device.

W1 train: SDE train step (bidirectional in-batch softmax + query-side SamToNe,
   Adafactor), batch B pairs of q_len / d_len tokens -> pairs/s.
W2 encode: document embeddings, batch E x d_len tokens -> docs/s.
The workloads and the FLOP count are those of ../shared/bench/peer_torch_t5.py
(the PyTorch peer), so the two tables compare on the same device.

  python scripts/benchmark_speed.py --size base --batch 512 --q_len 64 --d_len 256 \
      --peak_tflops 989 [--dtype bfloat16] [--remat full] [--attention jax_nn]

Prints a table and appends it to BENCHMARKS.md (--output).
"""

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from t5dual import models, optim, partitioning, t5, trainer  # noqa: E402
from t5dual.sides import Side  # noqa: E402


def flops_per_token_fwd(cfg: t5.T5Config, seq: int) -> float:
  """Same count as the peer: dense matmuls of qkvo + gated FFN, plus QK^T and AV."""
  dense = 2 * (4 * cfg.emb_dim * cfg.num_heads * cfg.head_dim + 3 * cfg.emb_dim * cfg.mlp_dim)
  attn = 2 * 2 * seq * cfg.num_heads * cfg.head_dim
  return cfg.num_layers * (dense + attn)


def _timed(fn, steps):
  out = fn()  # compile + warm-up
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--size', default='base')
  p.add_argument('--batch', type=int, default=512)
  p.add_argument('--encode_batch', type=int, default=1024)
  p.add_argument('--q_len', type=int, default=64)
  p.add_argument('--d_len', type=int, default=256)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--remat', default='none')
  p.add_argument('--attention', default='xla')
  p.add_argument('--num_partitions', type=int, default=1, help='model-parallel size')
  p.add_argument('--peak_tflops', type=float, default=989.0,
                 help='device peak for MFU (H100 bf16 dense: 989); 0 for none')
  p.add_argument('--output', default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'BENCHMARKS.md'))
  a = p.parse_args()

  cfg = t5.t5_config(a.size, dtype=a.dtype, remat=a.remat, attention=a.attention)
  model = models.DualEncoderModel(models.DualEncoderConfig(t5=cfg))
  tx = optim.adafactor(1e-3)
  partitioner = partitioning.Partitioner(num_partitions=a.num_partitions)
  rng = np.random.default_rng(0)
  ids = lambda n, length: rng.integers(2, 32000, size=(n, length)).astype(np.int32)
  batch = partitioner.shard_batch({'inputs': ids(a.batch, a.q_len),
                                   'targets': ids(a.batch, a.d_len),
                                   'query_ids': np.arange(a.batch, dtype=np.int32),
                                   'doc_ids': np.arange(a.batch, dtype=np.int32)})
  # The trainer's own step: same shardings, donation and finiteness guard.
  step, layout = trainer.build_train_step(model, tx, partitioner, batch)
  state = list(trainer.init_train_state(model, tx, partitioner, layout, seed=0))
  bad_step = jax.device_put(jnp.int32(0), partitioner.replicated)

  def train_once():
    state[0], state[1], _, metrics = step(state[0], state[1], bad_step, batch, jnp.int32(0))
    return metrics['loss']
  t_train = _timed(train_once, a.steps)
  docs = jax.device_put(ids(a.encode_batch, a.d_len), partitioner.batch_sharding(2))
  encode = partitioner.partition(
      lambda p, d: model.encode(p, d, Side.DOCUMENT.tower),
      in_shardings=(layout.param_shardings, partitioner.batch_sharding(2)),
      out_shardings=partitioner.batch_sharding(2))
  t_enc = _timed(lambda: encode(state[0], docs), a.steps)

  peak = a.peak_tflops * 1e12
  mfu = lambda flops, t: f'{100 * flops / t / peak:.1f}%' if peak > 0 else 'n/a'
  train_flops = 3 * a.batch * (a.q_len * flops_per_token_fwd(cfg, a.q_len) +
                               a.d_len * flops_per_token_fwd(cfg, a.d_len))
  enc_flops = a.encode_batch * a.d_len * flops_per_token_fwd(cfg, a.d_len)
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  date = datetime.date.today().isoformat()
  rows = [
      f'| W1 train step | {a.size} | {a.batch} x {a.q_len}/{a.d_len} | {a.dtype} | '
      f'{a.batch / t_train:,.1f} pairs/s | {t_train * 1e3:,.0f} ms | '
      f'{mfu(train_flops, t_train)} |',
      f'| W2 encode | {a.size} | {a.encode_batch} x {a.d_len} | {a.dtype} | '
      f'{a.encode_batch / t_enc:,.1f} docs/s | {t_enc * 1e3:,.0f} ms | '
      f'{mfu(enc_flops, t_enc)} |',
  ]
  table = (f'### Throughput ({date}, {device}; remat {a.remat}, attention {a.attention}, '
           f'MFU against {a.peak_tflops} TFLOP/s)\n\n'
           '| workload | size | batch x length | dtype | throughput | step | MFU |\n'
           '|---|---|---|---|---|---|---|\n' + '\n'.join(rows) + '\n')
  print(table)
  old = open(a.output).read() if os.path.exists(a.output) else '# Benchmarks\n\n'
  with open(a.output, 'w') as f:
    f.write(old.rstrip('\n') + '\n\n' + table)


if __name__ == '__main__':
  main()
