"""scripts/benchmark_speed.py end to end on CPU: every workload runs through the trainer's step
and the export's encoder, and the peer's rows come back with the ratios. The workloads run as
on the GPU host, without TensorFlow, seqio, bm25s or the trec_eval bindings
(helpers/gpu_host.py)."""

import json
import os
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
