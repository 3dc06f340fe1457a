#!/usr/bin/env python
"""Training and encoding throughput of t5dual on the current device, beside the PyTorch peer.

Workloads (those of ../shared/bench/peer_torch_t5.py, with its FLOP count):
  W1   SDE train step (bidirectional in-batch softmax + query-side SamToNe,
       Adafactor), batch B pairs of q_len / d_len tokens -> pairs/s.
  W2   encode, E documents x d_len tokens at a fixed length -> docs/s.
  W2b  encode a real collection (--corpus, BEIR folder; --vocab, SentencePiece)
       as the export does, length-bucketed, beside the same texts at a fixed
       length: documents at d_len, queries at q_len. The bound printed is
       max length / mean length, what perfect bucketing would give.
  W3   RankT5-EncDec train step (listwise softmax), Q queries x list N x in_len
       tokens -> sequences/s.
  W4   W1 at larger sizes (--w4_sizes; xl and xxl with full remat, xxl with
       GradCache over --w4_microbatches chunks).
--grad_strategy grad_cache trains W3's reranker with 'accumulate' (GradCache is
for contrastive models; a reranker's per-list loss accumulates exactly).

Each workload runs in its own process (its peak device memory is its own, and
one that runs out of memory does not stop the others), through the step
builder training runs (trainer.build_train_step) and the export's encoder
(encoding.make_encode_fn). With --peer PATH the PyTorch peer runs in the same
command for the same workloads, and the table puts the ratios beside it.

  python scripts/benchmark_speed.py --workloads W1,W2,W3 --size base \
      --attention cudnn --peer ../shared/bench/peer_torch_t5.py [--json out.jsonl]

The models are the gin files' (gin/models/dual_encoder.gin, reranker.gin): DROPOUT_RATE
as they set it (0.1) unless --dropout_rate says otherwise. attention='cudnn' has no
attention dropout, so it needs --dropout_rate 0 (T5Config refuses it otherwise).

Prints a table and appends it to BENCHMARKS.md (--output; '' for none). A workload that
fails gets a row with its error's own line, and the command exits with status 1.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORKLOADS = ('W1', 'W2', 'W2b', 'W3', 'W4')
# The peer's variants per workload: Hugging Face as it comes, and its best.
PEER_VARIANTS = {
    'W1': ['--attn eager --gc', '--attn sdpa --gc --compile'],
    'W2': ['--attn eager --encode_only'],
    'W3': ['--rerank --attn eager --gc'],
}


def _flags(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workloads', default='W1,W2', help=','.join(WORKLOADS))
  p.add_argument('--size', default='base')
  p.add_argument('--batch', type=int, default=512)
  p.add_argument('--encode_batch', type=int, default=1024)
  p.add_argument('--q_len', type=int, default=64)
  p.add_argument('--d_len', type=int, default=256)
  p.add_argument('--queries', type=int, default=16)
  p.add_argument('--list_size', type=int, default=32)
  p.add_argument('--in_len', type=int, default=512)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--remat', default='none')
  p.add_argument('--attention', default='xla', help='T5Config.attention: xla, jax_nn, cudnn')
  p.add_argument('--dropout_rate', type=float, default=None,
                 help="T5Config.dropout_rate (default: the model gin file's DROPOUT_RATE)")
  p.add_argument('--grad_strategy', default='full')
  p.add_argument('--num_microbatches', type=int, default=1)
  p.add_argument('--w4_sizes', default='large,xl,xxl')
  p.add_argument('--w4_microbatches', type=int, default=8)
  p.add_argument('--corpus', help='W2b: a BEIR folder (corpus.jsonl)')
  p.add_argument('--vocab', help='W2b: a SentencePiece model')
  p.add_argument('--corpus_docs', type=int, default=20000, help='W2b: first N documents')
  p.add_argument('--buckets', help="W2b: bucket lengths, e.g. '32,64,96,128' (default: "
                 'the export\'s powers of two)')
  p.add_argument('--num_partitions', type=int, default=1, help='model-parallel size')
  p.add_argument('--peak_tflops', type=float, default=989.0,
                 help='device peak for MFU (H100 bf16 dense: 989); 0 for none')
  p.add_argument('--peer', help='path of peer_torch_t5.py: run it in the same command')
  p.add_argument('--timeout', type=int, default=900, help='seconds per workload process')
  p.add_argument('--json', help='also write every row as a JSON line here')
  p.add_argument('--output', default=os.path.join(REPO, 'BENCHMARKS.md'))
  p.add_argument('--one', help=argparse.SUPPRESS)  # internal: run one workload, print JSON
  return p.parse_args(argv)


# --------------------------------------------------------------------------- one workload

# The gin file whose defaults each workload's model takes.
MODEL_GIN = {'W1': 'dual_encoder.gin', 'W2': 'dual_encoder.gin', 'W2b': 'dual_encoder.gin',
             'W3': 'reranker.gin', 'W4': 'dual_encoder.gin'}


def gin_default(workload, macro='DROPOUT_RATE'):
  """A macro's value in the workload's model gin file (`MACRO = value`), as a float."""
  path = os.path.join(REPO, 'gin', 'models', MODEL_GIN[workload])
  found = re.search(rf'^{macro}\s*=\s*([^\s#]+)', open(path).read(), re.M)
  if not found:
    raise SystemExit(f'{path}: no {macro} = ... line')
  return float(found.group(1))


def _timed(fn, steps):
  """Seconds per call of fn (after one compiling call), and the last output."""
  import jax
  out = jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps, out


def _peak_memory_gib():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / (1 << 30)


def _train_step_row(a, model, task, batch_np, lengths, name, unit, per_step, grad_strategy):
  """Times the trainer's own step (shardings, donation, guard, gradient strategy) on a
  batch shaped as the task's batcher shapes them (task.batch_spec, data/tasks.py)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from t5dual import optim, partitioning, trainer
  rows = len(next(iter(batch_np.values())))
  spec = {k: (v.shape, np.dtype(v.dtype)) for k, v in task.batch_spec(rows, lengths).items()}
  if {k: (v.shape, v.dtype) for k, v in batch_np.items()} != spec:
    raise ValueError(f'{name}: the synthetic batch is not shaped as {model.name} batches: {spec}')
  tx = optim.adafactor(1e-3)
  partitioner = partitioning.Partitioner(num_partitions=a.num_partitions)
  batch = partitioner.shard_batch(batch_np)
  step, layout = trainer.build_train_step(model, tx, partitioner, batch,
                                          grad_strategy=grad_strategy,
                                          num_microbatches=a.num_microbatches)
  state = list(trainer.init_train_state(model, tx, partitioner, layout, seed=0))
  bad_step = jax.device_put(jnp.int32(0), partitioner.replicated)

  def once():
    state[0], state[1], _, metrics = step(state[0], state[1], bad_step, batch, jnp.int32(0))
    return metrics['loss']
  seconds, loss = _timed(once, a.steps)
  return dict(workload=name, seconds=seconds, throughput=per_step / seconds, unit=unit,
              loss=float(loss), strategy=grad_strategy)


def run_one(a):
  """One workload in this process; returns its row (a dict)."""
  import numpy as np
  from t5dual import dual_encoders, planning, rerankers, t5
  from t5dual.data import tasks
  rng = np.random.default_rng(0)
  ids = lambda *shape: rng.integers(2, 32000, size=shape).astype(np.int32)
  name = a.one
  if name not in WORKLOADS:
    raise ValueError(f'unknown workload {name}')
  dropout = gin_default(name) if a.dropout_rate is None else a.dropout_rate
  cfg = t5.t5_config(a.size, dtype=a.dtype, remat=a.remat, attention=a.attention,
                     dropout_rate=dropout)
  settings = dict(size=a.size, dtype=a.dtype, remat=a.remat, attention=a.attention,
                  dropout=dropout)
  if name in ('W1', 'W4'):
    model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=cfg))
    batch = {'inputs': ids(a.batch, a.q_len), 'targets': ids(a.batch, a.d_len),
             'query_ids': np.arange(a.batch, dtype=np.int32),
             'doc_ids': np.arange(a.batch, dtype=np.int32)}
    lengths = {'inputs': a.q_len, 'targets': a.d_len}
    task = tasks.PairTask()
    row = _train_step_row(a, model, task, batch, lengths, name, 'pairs/s', a.batch,
                          a.grad_strategy)
    row['flops'] = planning.train_model_flops(model, task.batch_spec(a.batch, lengths))
    row['shape'] = f'{a.batch} x {a.q_len}/{a.d_len}'
  elif name == 'W3':
    model = rerankers.RerankerModel(
        rerankers.RerankerConfig(t5=cfg, scorer='encdec', input_length=a.in_len))
    task = tasks.ListTask(list_size=a.list_size)
    labels = np.zeros((a.queries, a.list_size), np.float32)
    labels[:, 0] = 1.0  # the peer's: first candidate relevant
    batch = {'inputs': ids(a.queries, a.list_size, a.in_len), 'labels': labels,
             'where': np.ones((a.queries, a.list_size), bool)}
    # A reranker's microbatches are accumulated (exact for its per-list losses).
    strategy = 'accumulate' if a.grad_strategy == 'grad_cache' else a.grad_strategy
    row = _train_step_row(a, model, task, batch, {'inputs': a.in_len}, name, 'sequences/s',
                          a.queries * a.list_size, strategy)
    row['flops'] = planning.train_model_flops(model, task.batch_spec(a.queries,
                                                                     {'inputs': a.in_len}))
    row['shape'] = f'{a.queries} x {a.list_size} x {a.in_len}'
  elif name in ('W2', 'W2b'):
    row = _encode_row(a, cfg, ids)
    if isinstance(row, list):  # W2b: documents and queries
      for r in row:
        r.update(settings, impl='t5dual')
      return row
  row.update(settings, peak_gib=_peak_memory_gib(), impl='t5dual')
  if 'strategy' in row:  # a train step
    strategy = row.pop('strategy')
    row['gradients'] = (strategy if strategy == 'full'
                        else f'{strategy} x{a.num_microbatches}')
  return row


def _encode_row(a, cfg, ids):
  """W2: fixed-length batches. W2b: a real corpus through the export's bucketing."""
  import jax
  import numpy as np
  from t5dual import dual_encoders, encoding, planning
  from t5dual.sides import Side
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=cfg))
  params = jax.jit(model.init_params)(jax.random.PRNGKey(0))
  encode = encoding.make_encode_fn(model, params, Side.DOCUMENT)
  per_token = lambda length: planning.encoder_flops_per_token(cfg, length)
  if a.one == 'W2':
    docs = ids(a.encode_batch, a.d_len)
    seconds, _ = _timed(lambda: encode(docs), a.steps)
    return dict(workload='W2', seconds=seconds, throughput=a.encode_batch / seconds,
                unit='docs/s', flops=a.encode_batch * a.d_len * per_token(a.d_len),
                shape=f'{a.encode_batch} x {a.d_len}')
  from t5dual import corpus, vocab
  if not (a.corpus and a.vocab):
    raise SystemExit('W2b needs --corpus (a BEIR folder) and --vocab (a SentencePiece model)')
  tokenizer = vocab.Tokenizer(a.vocab)
  buckets = [int(b) for b in a.buckets.split(',')] if a.buckets else None
  rows = []
  # Documents at d_len with the document tower, queries at q_len with the query tower.
  for part, length, side in (('corpus', a.d_len, Side.DOCUMENT), ('queries', a.q_len, Side.QUERY)):
    _, texts = corpus.read_jsonl_corpus(os.path.join(a.corpus, f'{part}.jsonl'))
    tokens = tokenizer.encode(texts[:a.corpus_docs], length)
    encode = encoding.make_encode_fn(model, params, side)
    lengths = (tokens != 0).sum(1)
    times = {}
    for label, ladder in (('bucketed', buckets), ('fixed', [length])):
      encoding.map_bucketed(encode, tokens, a.encode_batch, ladder)  # compiles every bucket
      start = time.perf_counter()
      encoding.map_bucketed(encode, tokens, a.encode_batch, ladder)  # returns numpy: synced
      times[label] = time.perf_counter() - start
    n = len(tokens)
    rows.append(dict(
        workload=f'W2b {part}', seconds=times['bucketed'], throughput=n / times['bucketed'],
        unit='texts/s', flops=float(sum(int(l) * per_token(int(l)) for l in lengths)),
        fixed_throughput=n / times['fixed'], speedup=times['fixed'] / times['bucketed'],
        # The most bucketing can give: every text at its own length.
        bound=length / lengths.mean(),
        shape=f'{n} texts, mean {lengths.mean():.0f} / max {length} tokens'))
  return rows


# --------------------------------------------------------------------------- the table

# The line that names an exception ("XlaRuntimeError: RESOURCE_EXHAUSTED: ...",
# "ValueError: ..."): a traceback's last line is often jax's note about its filtered frames.
ERROR_LINE = re.compile(r'^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)'
                        r'(?::|$)')


def error_line(output, returncode):
  """The error's own line in a failed command's output: the last line naming an exception,
  else the last line, else the exit status."""
  lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
  named = [line for line in lines if ERROR_LINE.match(line)]
  return (named or lines or [f'exit {returncode}'])[-1]


def _subprocess_rows(cmd, timeout):
  """JSON rows a command prints (lines starting with '{'), or one error row."""
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return [dict(error=f'timed out after {timeout} s')]
  rows = []
  for line in proc.stdout.splitlines():
    if line.startswith('{'):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  if proc.returncode != 0 or not rows:
    rows.append(dict(error=error_line(proc.stderr or proc.stdout, proc.returncode)[:300]))
  return rows


def _own_runs(a):
  """(workload label, argv for --one) of every t5dual run asked for."""
  skip = {'workloads', 'one', 'peer', 'json', 'output'}
  base = [f'--{k}={v}' for k, v in vars(a).items() if k not in skip and v is not None]
  runs = []
  for w in a.workloads.split(','):
    if w == 'W4':
      for size in a.w4_sizes.split(','):
        extra = ['--size', size]
        if size in ('xl', 'xxl'):
          extra += ['--remat', 'full']
        if size == 'xxl':
          extra += ['--grad_strategy', 'grad_cache', '--num_microbatches',
                    str(a.w4_microbatches)]
        runs.append((f'W4 {size}', base + extra + ['--one', 'W4']))
    elif w in WORKLOADS:
      runs.append((w, base + ['--one', w]))
    else:
      raise SystemExit(f'--workloads: unknown {w!r}; choose from {",".join(WORKLOADS)}')
  return runs


def _peer_runs(a):
  runs = []
  for w in a.workloads.split(','):
    for variant in PEER_VARIANTS.get(w, []):
      shape = (['--queries', a.queries, '--list_size', a.list_size, '--in_len', a.in_len]
               if w == 'W3' else ['--batch', a.batch, '--q_len', a.q_len, '--d_len', a.d_len])
      runs.append((w, [sys.executable, a.peer, '--size', a.size, '--steps', a.steps,
                       '--peak_tflops', a.peak_tflops] + shape + variant.split()))
  return runs


def _peer_row(row, workload):
  """A peer JSON line as a table row."""
  if 'error' in row:
    return dict(row, workload=workload, impl='peer')
  key = {'W1-train': 'pairs_per_s', 'W2-encode': 'docs_per_s', 'W3-rerank-train': 'seqs_per_s'}
  name = {'W1-train': 'W1', 'W2-encode': 'W2', 'W3-rerank-train': 'W3'}[row['workload']]
  unit = {'W1': 'pairs/s', 'W2': 'docs/s', 'W3': 'sequences/s'}[name]
  return dict(workload=name, impl=row['impl'], size=row['size'], throughput=row[key[row['workload']]],
              unit=unit, mfu=row.get('mfu'), peak_gib=row.get('peak_mem_gib'),
              loss=row.get('loss'), seconds=row.get('step_s'))


def _fmt(x, spec):
  return '-' if x is None else format(x, spec)


def table(rows, a, device, date, command):
  best_peer = {}
  for r in rows:
    if r.get('impl', '').startswith('torch') and 'throughput' in r:
      best_peer[r['workload']] = max(best_peer.get(r['workload'], 0), r['throughput'])
  lines = [f'### Speed ({date}, {device}; MFU against {a.peak_tflops} TFLOP/s, model FLOPs '
           '= 3 x forward for a train step (planning.train_model_flops, the peer\'s count))',
           '', f'`{command}`', '',
           '| workload | impl | size | shape | dtype / remat / attention / dropout / gradients | '
           'throughput | step | MFU % | peak GiB | loss | × best peer |', '|' + '---|' * 11]
  for r in rows:
    if 'error' in r:
      lines.append(f'| {r.get("workload", "?")} | {r.get("impl", "?")} | {r.get("size", "")} '
                   f'| failed: {r["error"]} |' + ' |' * 7)
      continue
    mfu = r.get('mfu')
    if mfu is None and r.get('flops') and a.peak_tflops:
      mfu = r['flops'] / r['seconds'] / (a.peak_tflops * 1e12)
    settings = ' / '.join(str(r[k]) for k in ('dtype', 'remat', 'attention', 'dropout',
                                              'gradients') if k in r) or 'peer'
    ratio = ''
    if r['impl'] == 't5dual' and r['workload'] in best_peer:
      ratio = f'{r["throughput"] / best_peer[r["workload"]]:.2f}'
    extra = ''
    if 'speedup' in r:
      extra = (f' ({r["fixed_throughput"]:,.0f} at fixed length: {r["speedup"]:.2f}x from '
               f'bucketing, at most {r["bound"]:.2f}x)')
    lines.append(
        f'| {r["workload"]} | {r["impl"]} | {r.get("size", "")} | {r.get("shape", "")} | '
        f'{settings} | {r["throughput"]:,.1f} {r["unit"]}{extra} | '
        f'{_fmt(r.get("seconds") and 1e3 * r["seconds"], ",.0f")} ms | '
        f'{_fmt(mfu and 100 * mfu, ".1f")} | {_fmt(r.get("peak_gib"), ".1f")} | '
        f'{_fmt(r.get("loss"), ".4g")} | {ratio} |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  """Runs the workloads; returns 1 when any failed (its row has the error), else 0."""
  argv = list(sys.argv[1:] if argv is None else argv)
  a = _flags(argv)
  if a.one:
    got = run_one(a)
    for row in got if isinstance(got, list) else [got]:
      print(json.dumps(row), flush=True)
    return 0
  import jax
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  rows = []
  for label, args in _own_runs(a):
    got = _subprocess_rows([sys.executable, os.path.abspath(__file__)] + args, a.timeout)
    for r in got:
      r['impl'] = 't5dual'
      if not str(r.get('workload', '')).startswith(label):
        r['workload'] = label
      print(json.dumps(r), flush=True)
    rows += got
  if a.peer:
    for workload, cmd in _peer_runs(a):
      for r in _subprocess_rows([str(c) for c in cmd], a.timeout):
        rows.append(_peer_row(r, workload))
        print(json.dumps(rows[-1]), flush=True)
  command = 'python scripts/benchmark_speed.py ' + ' '.join(shlex.quote(x) for x in argv)
  text = table(rows, a, device, datetime.date.today().isoformat(), command)
  print(text)
  if a.json:
    with open(a.json, 'a') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
  if a.output:
    old = open(a.output).read() if os.path.exists(a.output) else '# Benchmarks\n'
    with open(a.output, 'w') as f:
      f.write(old.rstrip('\n') + '\n\n' + text)
  failed = [f'{r.get("workload", "?")} ({r.get("impl", "?")}): {r["error"]}'
            for r in rows if 'error' in r]
  if failed:
    print(f'{len(failed)} run(s) failed: ' + '; '.join(failed), file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
