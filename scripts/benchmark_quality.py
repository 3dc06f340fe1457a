#!/usr/bin/env python
"""Retrieval quality from scratch: SDE / ADE-SPL x {softmax, SamToNe, PAIR} on medquad,
zero-shot on scifact, next to BM25. Prints a table and writes it into BENCHMARKS.md.

  python scripts/benchmark_quality.py --shared ../shared --workdir /tmp/quality \
      [--steps 400 --batch 64 --size cpu_small] [--gin.X=...]

Each configuration trains with scripts/train.py's gin path (gin/models/<arch>.gin +
configs/runs/finetune.gin) and is evaluated with the same export -> exact top-k ->
pytrec_eval path as `scripts/eval.py run`.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from t5dual import evaluation  # noqa: E402

# Small enough to train on 2 CPU cores in minutes; 'base' etc. on an accelerator.
SIZES = {
    'cpu_small': ['--gin.t5.t5_config.emb_dim=128', '--gin.t5.t5_config.num_heads=4',
                  '--gin.t5.t5_config.head_dim=32', '--gin.t5.t5_config.mlp_dim=512',
                  '--gin.t5.t5_config.num_layers=2', '--gin.PROJECTION_DIM=128',
                  '--gin_file=gin/sizes/tiny.gin'],
}
BM25 = {'medquad': {'nDCG@10': 0.5529, 'R@100': 0.9808, 'RR': 0.4582},
        'scifact': {'nDCG@10': 0.6863, 'R@100': 0.9127, 'RR': 0.6528}}
MEASURES = ('nDCG@10', 'RR@10', 'R@100')
GRID = [(arch, loss) for arch in ('sde', 'ade_spl') for loss in ('softmax', 'samtone', 'pair')]


def train(args, arch, loss, model_dir, extra):
  cmd = [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
         f'--gin_file=gin/models/{arch}.gin', '--gin_file=configs/runs/finetune.gin',
         f"--gin.MODEL_DIR='{model_dir}'",
         f"--gin.MIXTURE_OR_TASK_NAME='beir:{args.shared}/data/medquad:train'",
         f"--gin.VOCABULARY_PATH='{args.shared}/vocab/t5_spiece.model'",
         f"--gin.LOSS='{loss}'", f'--gin.TRAIN_STEPS={args.steps}',
         f'--gin.BATCH_SIZE={args.batch}', f'--gin.LEARNING_RATE={args.lr}',
         f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {args.query_length}, "
         f"'targets': {args.doc_length}}}",
         f"--gin.ACTIVATION_DTYPE='{args.dtype}'", '--gin.DROPOUT_RATE=0.0',
         '--gin.trainer.TrainerConfig.log_every=50'] + SIZES.get(args.size, [
             f'--gin_file=gin/sizes/{args.size}.gin']) + extra
  subprocess.run(cmd, cwd=REPO, check=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--shared', default=os.path.join(REPO, '..', 'shared'))
  parser.add_argument('--workdir', default='/tmp/t5dual_quality')
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--lr', type=float, default=1e-2)
  parser.add_argument('--size', default='cpu_small')
  parser.add_argument('--query_length', type=int, default=32)
  parser.add_argument('--doc_length', type=int, default=64)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--device', default=None, help='label for the table')
  parser.add_argument('--only', default=None, help='arch:loss,... subset of the grid')
  parser.add_argument('--output', default=os.path.join(REPO, 'BENCHMARKS.md'))
  args, extra = parser.parse_known_args()
  if not os.path.isdir(os.path.join(args.shared, 'data', 'medquad')):
    raise SystemExit(f'{args.shared}/data/medquad not found (needs the shared data)')
  grid = GRID if not args.only else [tuple(x.split(':')) for x in args.only.split(',')]
  import jax
  device = args.device or f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  rows = []
  for arch, loss in grid:
    model_dir = os.path.join(args.workdir, f'{arch}_{loss}')
    t0 = time.time()
    train(args, arch, loss, model_dir, extra)
    train_s = time.time() - t0
    row = {'arch': arch, 'loss': loss, 'train_s': train_s}
    for data in ('medquad', 'scifact'):
      summary = evaluation.evaluate_checkpoint_on_beir(
          model_dir, os.path.join(args.shared, 'data', data), 'test', measures=MEASURES,
          export_options=dict(dtype='float32', progress=False))
      row[data] = summary['metrics']
    rows.append(row)
    print(json.dumps(row), flush=True)
  with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  write_table(args, device, rows)


def write_table(args, device, rows):
  date = datetime.date.today().isoformat()
  head = (f'### Retrieval quality from scratch ({date}, {device}, {platform.machine()})\n\n'
          f'Model `{args.size}` trained from random initialisation on medquad train '
          f'({args.steps} steps x batch {args.batch} pairs, Adafactor lr {args.lr} linear '
          f'decay, query/doc lengths {args.query_length}/{args.doc_length}, T5 SentencePiece '
          f'vocabulary, {args.dtype}); evaluated on the test splits (full corpora, exact '
          f'top-k, pytrec_eval via ir_measures). scifact is zero-shot. Command: '
          f'`python scripts/benchmark_quality.py --steps {args.steps} --batch {args.batch} '
          f'--size {args.size}`.\n\n')
  lines = ['| model | loss | medquad nDCG@10 | medquad MRR@10 | medquad R@100 | '
           'scifact nDCG@10 | scifact R@100 | train time |',
           '|---|---|---|---|---|---|---|---|']
  for data in ('bm25',):
    lines.append(f'| BM25 (shared/README) | - | {BM25["medquad"]["nDCG@10"]:.4f} | '
                 f'(MRR {BM25["medquad"]["RR"]:.4f}) | {BM25["medquad"]["R@100"]:.4f} | '
                 f'{BM25["scifact"]["nDCG@10"]:.4f} | {BM25["scifact"]["R@100"]:.4f} | - |')
  for r in rows:
    m, s = r['medquad'], r['scifact']
    lines.append(f'| {r["arch"].upper()} | {r["loss"]} | {m["nDCG@10"]:.4f} | '
                 f'{m["RR@10"]:.4f} | {m["R@100"]:.4f} | {s["nDCG@10"]:.4f} | '
                 f'{s["R@100"]:.4f} | {r["train_s"]:.0f} s |')
  table = head + '\n'.join(lines) + '\n'
  print(table)
  old = open(args.output).read() if os.path.exists(args.output) else '# Benchmarks\n\n'
  with open(args.output, 'w') as f:
    f.write(old.rstrip('\n') + '\n\n' + table)


if __name__ == '__main__':
  main()
