#!/usr/bin/env python
"""Rerank a first stage's top-k with a trained reranker, write the run, show the gain.

  python scripts/rerank.py --model_dir=/tmp/rankt5 --beir=../shared/data/medquad \
      --split=test --run=bm25.trec --top_k=100 --out=reranked.trec [--dtype=float32]

The first stage is any TREC run (scripts/eval.py bm25, scripts/eval.py run, ...).
Pairs are scored in length-bucketed batches on every local device; the output
run holds the reranker's raw scores. Both runs are evaluated with the same
code as scripts/eval.py. Multi-host (the flags of t5dual/distributed.py; the
same command on every host): each host scores its share of the pairs, process
0 writes the run and prints the table.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from t5dual import cli, distributed, evaluation, reranking  # noqa: E402


def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model_dir', required=True, help='a trained reranker directory')
  parser.add_argument('--beir', required=True, help='BEIR folder (corpus, queries, qrels)')
  parser.add_argument('--split', default='test')
  parser.add_argument('--run', required=True, help='first-stage TREC run')
  parser.add_argument('--top_k', type=int, default=100)
  parser.add_argument('--out', required=True, help='TREC run to write')
  parser.add_argument('--step', type=int, default=None, help='checkpoint (default: latest)')
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                      help='activation dtype (default: the one the model trained with)')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--input_length', type=int, default=None,
                      help='tokens per pair (default: the training length)')
  parser.add_argument('--measures', default='nDCG@10,RR@10,R@100')
  parser.add_argument('--no_progress', action='store_true')
  distributed.add_inference_flags(parser)
  distributed.add_flags(parser)
  args = parser.parse_args(argv)
  distributed.initialize_from_flags(args)
  measures = [m.strip() for m in args.measures.split(',') if m.strip()]
  evaluation.parse_measures(measures)  # a typo fails before any work
  summary = reranking.rerank_beir(
      args.model_dir, args.beir, args.split, args.run, args.out, top_k=args.top_k,
      step=args.step, dtype=args.dtype, batch_size=args.batch_size,
      input_length=args.input_length, measures=measures, progress=not args.no_progress,
      partitioner=distributed.host_partitioner(args.model_parallel))
  if jax.process_index() != 0:
    return 0
  name = f'{os.path.basename(os.path.normpath(args.beir))}/{args.split}'
  m = summary['metrics']
  print(evaluation.format_table({
      f'{name} first stage ({os.path.basename(args.run)})': m['first stage'],
      f'{name} reranked top-{args.top_k} (step {summary["step"]})': m['reranked']}))
  print(f'run: {summary["run"]} ({summary["pairs"]} pairs)')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
