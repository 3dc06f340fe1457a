"""scripts/benchmark_speed.py end to end on CPU: every workload runs through the trainer's step
and the export's encoder, and the peer's rows come back with the ratios. The workloads run as
on the GPU host, without TensorFlow, seqio, bm25s or the trec_eval bindings
(helpers/gpu_host.py)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'helpers'))
import gpu_host  # noqa: E402
import script_modules  # noqa: E402

FAKE_PEER = '''
import argparse, json
p = argparse.ArgumentParser()
for f in ("--size", "--steps", "--peak_tflops", "--batch", "--q_len", "--d_len", "--queries",
          "--list_size", "--in_len", "--attn"):
    p.add_argument(f)
for f in ("--gc", "--compile", "--encode_only", "--rerank"):
    p.add_argument(f, action="store_true")
a = p.parse_args()
if a.rerank:
    print(json.dumps(dict(workload="W3-rerank-train", impl="torch-hf-eager-gc", size=a.size,
                          seqs_per_s=2.0, mfu=0.01, step_s=1.0, peak_mem_gib=1.0, loss=1.0)))
elif not a.encode_only:
    print(json.dumps(dict(workload="W1-train", impl="torch-hf-" + a.attn, size=a.size,
                          pairs_per_s=4.0 if a.compile else 2.0, mfu=0.01, step_s=1.0,
                          peak_mem_gib=1.0, loss=1.0)))
'''


@pytest.mark.slow
def test_workloads_and_peer_ratios(tmp_path, shared_dir, monkeypatch):
  bench = script_modules.load_script('benchmark_speed')
  # Each workload runs in a child process with this environment.
  for key, value in gpu_host.env(tmp_path).items():
    monkeypatch.setenv(key, value)
  peer = tmp_path / 'peer.py'
  peer.write_text(FAKE_PEER)
  rows_file, md = tmp_path / 'rows.jsonl', tmp_path / 'BENCH.md'
  bench.main(['--workloads', 'W1,W2b,W3,W4', '--size', 'tiny', '--dtype', 'float32',
              '--batch', '8', '--encode_batch', '16', '--q_len', '8', '--d_len', '64',
              '--queries', '2', '--list_size', '4', '--in_len', '16', '--steps', '1',
              '--w4_sizes', 'tiny', '--grad_strategy', 'grad_cache', '--num_microbatches', '2',
              '--corpus', os.path.join(shared_dir, 'data', 'medquad'),
              '--vocab', os.path.join(shared_dir, 'vocab', 't5_spiece.model'),
              '--corpus_docs', '64', '--peer', str(peer), '--json', str(rows_file),
              '--output', str(md)])
  rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
  own = {r['workload']: r for r in rows if r['impl'] == 't5dual'}
  assert set(own) == {'W1', 'W2b corpus', 'W2b queries', 'W3', 'W4 tiny'}, rows
  assert not [r for r in rows if 'error' in r], rows
  for name in ('W1', 'W3', 'W4 tiny'):
    assert own[name]['loss'] > 0 and own[name]['throughput'] > 0 and own[name]['flops'] > 0
  assert own['W1']['gradients'] == 'grad_cache x2'
  assert own['W3']['gradients'] == 'accumulate x2'
  # W2b: the same corpus, bucketed and at fixed length.
  for part in ('corpus', 'queries'):
    w2b = own[f'W2b {part}']
    assert w2b['fixed_throughput'] > 0 and w2b['bound'] >= 1 and 'mean' in w2b['shape']
  text = md.read_text()
  # The ratio is against the best peer variant (the compiled one: 4 pairs/s).
  w1 = next(line for line in text.splitlines() if line.startswith('| W1 | t5dual'))
  assert w1.rstrip(' |').endswith(f'{own["W1"]["throughput"] / 4.0:.2f}')
  assert '| W1 | torch-hf-sdpa |' in text and '| W3 | torch-hf-eager-gc |' in text
  assert own['W1']['dropout'] == 0.1 and own['W3']['dropout'] == 0.1  # the gin files' default
  assert '| float32 / none / xla / 0.1 / grad_cache x2 |' in w1


# What a failed JAX workload prints: the error's own line, then jax's note as the last line.
JAX_STDERR = '''Traceback (most recent call last):
  File "scripts/benchmark_speed.py", line 120, in once
    state[0], state[1], _, metrics = step(state[0], state[1], bad_step, batch, jnp.int32(0))
jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB.
--------------------
For simplicity, JAX has removed its internal frames from the traceback of the following exception. Set JAX_TRACEBACK_FILTERING=off to include these.
'''


def test_error_line_is_the_errors_own():
  bench = script_modules.load_script('benchmark_speed')
  assert bench.error_line(JAX_STDERR, 1) == (
      'jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to '
      'allocate 81.2GiB.')
  assert bench.error_line('W2b needs --corpus\n', 1) == 'W2b needs --corpus'  # SystemExit
  assert bench.error_line('', -9) == 'exit -9'


@pytest.mark.slow
@pytest.mark.multiprocess
def test_failed_workloads_keep_their_error_and_exit_1(tmp_path, monkeypatch):
  """attention='cudnn' as the GPU host would get it wrong on the gin defaults (dropout 0.1),
  and on a machine without cuDNN (this one): each row says why, the command exits 1."""
  for key, value in gpu_host.env(tmp_path).items():
    monkeypatch.setenv(key, value)
  flags = ['--workloads', 'W1', '--size', 'tiny', '--batch', '4', '--q_len', '8',
           '--d_len', '8', '--steps', '1', '--attention', 'cudnn', '--output', '']
  cmd = [sys.executable, os.path.join(gpu_host.REPO, 'scripts', 'benchmark_speed.py')]
  errors = {}
  for dropout in ([], ['--dropout_rate', '0']):
    proc = subprocess.run(cmd + flags + dropout, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    [row] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    errors[bool(dropout)] = row['error']
    assert proc.stderr.strip().splitlines()[-1].startswith('1 run(s) failed: W1 (t5dual): ')
  assert errors[False] == (
      "ValueError: T5Config.attention 'cudnn' has no attention dropout, but dropout_rate is "
      "0.1: set DROPOUT_RATE = 0.0 (t5.t5_config.dropout_rate) or t5.t5_config.attention = "
      "'xla'")
  assert errors[True].startswith(
      "t5dual.cli.ConfigError: T5Config.attention 'cudnn' needs cuDNN, which this process "
      "lacks (JAX's backend is 'cpu', not a CUDA GPU)"), errors[True]
