#!/usr/bin/env python
"""Host memory of reading an initial checkpoint into a training layout (load_initial_params).

  python scripts/benchmark_restore.py [--size=large] [--work=/tmp/t5dual_restore_bench]
      [--write=BENCHMARKS.md]

Writes once (kept in --work) a random T5.1.1-shaped SDE dual encoder as a T5X
checkpoint (TensorStore zarr arrays), a Hugging Face folder (safetensors, with
t5dual's projection file) and a t5dual model directory (orbax), then restores
each, in a fresh process with 8 simulated CPU devices, into

  model-parallel 8   mesh (1, 8): the layout's shardings passed to load_initial_params;
  replicated         mesh (8, 1): every device a whole copy (what data parallelism asks);
  host, then placed  model-parallel 8, the way train_lib loaded before: the whole
                     checkpoint into host numpy (t5dual: replicated on the devices),
                     then jax.device_put.

CPU devices keep their buffers in host memory, so the process's peak RSS during
the restore includes what the devices hold (1x the parameters for model-parallel
8, 8x replicated); what matters is the host memory beyond it, the copies a
restore makes on its way, which is all a restore costs the host of a TPU or GPU.
Prints a table; --write appends it.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GiB = 1 << 30
MODES = ('model-parallel 8', 'replicated', 'host, then placed')


def _model(size):
  from t5dual import dual_encoders, t5
  return dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=t5.t5_config(size,
                                                                          dtype='float32')))


def _rss_bytes(field='VmRSS'):
  """The process's resident memory now (VmRSS) or at its peak since the last reset (VmHWM)."""
  with open('/proc/self/status') as f:
    return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ':'))


def _reset_peak():
  """Sets the peak (VmHWM) to the current RSS: the start-up's own peaks are not the restore's."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def _write(size, work):
  """The checkpoints, written once: random normal values (not the init)."""
  import jax
  import numpy as np
  from t5dual import checkpoints
  from t5dual.interop import t5x
  model = _model(size)
  paths = {'T5X (zarr)': os.path.join(work, f'{size}_t5x', 'checkpoint_0'),
           'Hugging Face (safetensors)': os.path.join(work, f'{size}_hf'),
           't5dual (orbax)': os.path.join(work, f'{size}_t5dual')}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), shapes)
  if not os.path.exists(paths['T5X (zarr)']):
    t5x.write_checkpoint(paths['T5X (zarr)'], params)
  if not os.path.exists(paths['Hugging Face (safetensors)']):
    from t5dual.interop import hf
    hf.save_encoder(paths['Hugging Face (safetensors)'], params, model.config.t5)
  if not os.path.exists(paths['t5dual (orbax)']):
    import orbax.checkpoint as ocp
    directory = paths['t5dual (orbax)']
    checkpoints.write_model_json(directory, checkpoints.model_description(
        model, 'none.model', {'inputs': 64, 'targets': 256}))
    manager = checkpoints.checkpoint_manager(directory)
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
    manager.wait_until_finished()
    manager.close()
  return paths


def _measure(size, path, mode):
  """In this process (8 CPU devices): one restore; prints `RESULT <json>`."""
  import jax
  from t5dual import partitioning
  from t5dual.interop import load_initial_params
  model = _model(size)
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  partitioner = partitioning.Partitioner(num_partitions=1 if mode == 'replicated' else 8)
  shardings = partitioner.for_model(model).param_shardings(model.logical_axes(), shapes)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  jax.block_until_ready(jax.device_put(0.0, partitioner.replicated))  # the runtime's own memory
  import gc
  gc.collect()
  _reset_peak()
  base = _rss_bytes()
  t0 = time.time()
  if mode == 'host, then placed':
    params = jax.device_put(load_initial_params(path, model), shardings)
  else:
    params = load_initial_params(path, model, shardings)
  jax.block_until_ready(params)
  seconds = time.time() - t0
  peak = _rss_bytes('VmHWM')
  device = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
  print('RESULT', json.dumps({'param_bytes': param_bytes, 'device_bytes': device,
                              'peak_above_base': peak - base,
                              'seconds': seconds}), flush=True)


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--size', default='large')
  p.add_argument('--work', default='/tmp/t5dual_restore_bench')
  p.add_argument('--write', help='append the table to this markdown file')
  p.add_argument('--measure', nargs=2, metavar=('PATH', 'MODE'), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  from t5dual import cli
  if args.measure:
    return _measure(args.size, *args.measure)
  paths = _write(args.size, args.work)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'PYTHONPATH': REPO, 'TF_CPP_MIN_LOG_LEVEL': '3'}
  rows = []
  for fmt, path in paths.items():
    for mode in MODES:
      out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--size={args.size}',
                            '--measure', path, mode], env=env, capture_output=True, text=True)
      line = next((ln for ln in out.stdout.splitlines() if ln.startswith('RESULT ')), None)
      if line is None:
        raise SystemExit(f'{fmt} / {mode} failed:\n{out.stderr[-3000:]}')
      r = json.loads(line[len('RESULT '):])
      rows.append((fmt, mode, r))
      print(fmt, mode, r, flush=True)
  full = rows[0][2]['param_bytes']
  cpu = cli.cpu_model()
  lines = [f'### Restoring an initial checkpoint into a layout: T5.1.1-{args.size} SDE, '
           f'8 CPU devices ({datetime.date.today().isoformat()}; {cpu} x{os.cpu_count()} '
           'cores, shared)', '',
           f'`python scripts/benchmark_restore.py --size={args.size}`. Parameters: '
           f'{full / GiB:.2f} GiB float32. GiB, and multiples of the parameters. Peak RSS: '
           'the process\'s peak during the restore (VmHWM) above its RSS before it. CPU '
           'devices keep their buffers in host memory, so the peak includes what the devices '
           'hold; the host memory beyond them (peak RSS - devices hold) is what a restore '
           'costs a TPU or GPU host. "host, then placed" is how train_lib read an initial '
           'checkpoint before: the whole checkpoint into host numpy (a t5dual directory: '
           'replicated on the local devices), then jax.device_put.', '',
           '| checkpoint | into | devices hold | peak RSS | host beyond the devices | s |',
           '|---|---|---|---|---|---|']
  for fmt, mode, r in rows:
    cell = lambda n: f'{n / GiB:.2f} ({n / full:.2f}x)'
    lines.append(f'| {fmt} | {mode} | {cell(r["device_bytes"])} | {cell(r["peak_above_base"])} '
                 f'| {cell(r["peak_above_base"] - r["device_bytes"])} | {r["seconds"]:.0f} |')
  table = '\n'.join(lines) + '\n'
  print(table)
  if args.write:
    old = open(args.write).read() if os.path.exists(args.write) else '# Benchmarks\n'
    with open(args.write, 'w') as f:
      f.write(old.rstrip('\n') + '\n\n' + table)


if __name__ == '__main__':
  main(sys.argv[1:])
