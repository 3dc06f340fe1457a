#!/usr/bin/env python
"""Rerank a first stage's top-k with a trained reranker, write the run, show the gain.

  python scripts/rerank.py --model_dir=/tmp/rankt5 --beir=../shared/data/medquad \
      --split=test --run=bm25.trec --top_k=100 --out=reranked.trec [--dtype=float32]

The first stage is any TREC run (scripts/eval.py bm25, scripts/eval.py run, ...).
Every query of the run that has text in the folder's queries.jsonl is reranked
(the others are counted, the first named); judgements are needed only to
evaluate. Pairs are scored in length-bucketed batches on every local device.
The output run lists each query's documents in score order with ranks 1..k:
the reranked top-k with the reranker's raw scores, then (--tail=append, the
default) the first stage's other documents in its order, scored below them,
so that R@100 after reranking the top 20 counts the same 100 documents as
before; --tail=drop writes the top-k alone and leaves the measures deeper
than top-k out of the table. Both runs are evaluated with the same code as
scripts/eval.py, on the queries judged in --split (default: test, if the
folder has qrels/test.tsv; without qrels the run is written, not evaluated).
--model_dir may be a multi-stage chain's MODEL_DIR: its final model is used.
Multi-host (the flags of t5dual/distributed.py; the same command on every
host): each host scores its share of the pairs, process 0 writes the run and
prints the table.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from t5dual import cli, distributed, evaluation, rerank_runs  # noqa: E402
from t5dual.data import sources  # noqa: E402

log = logging.getLogger('rerank')
DEFAULT_SPLIT = 'test'


def _split(args) -> 'str | None':
  """The qrels split that judges the runs: --split, or 'test' if the folder has it."""
  if args.split is not None:
    return args.split
  if os.path.exists(sources.qrels_path(args.beir, DEFAULT_SPLIT)):
    return DEFAULT_SPLIT
  log.info('%s has no qrels/%s.tsv: the run is reranked and written, not evaluated (--split '
           'names other judgements)', args.beir, DEFAULT_SPLIT)
  return None


def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model_dir', required=True,
                      help='a trained reranker directory (or a chain\'s MODEL_DIR: its final)')
  parser.add_argument('--beir', required=True, help='BEIR folder (corpus, queries, qrels)')
  parser.add_argument('--split', default=None,
                      help='the qrels that judge the runs (default: test, if there is '
                           'qrels/test.tsv; else no evaluation)')
  parser.add_argument('--run', required=True, help='first-stage TREC run')
  parser.add_argument('--top_k', type=int, default=100)
  parser.add_argument('--tail', choices=rerank_runs.TAILS, default='append',
                      help="append: the first stage's documents below the reranked top-k, in "
                           'its order (measures deeper than top-k compare the same documents); '
                           'drop: the top-k alone, deeper measures left out')
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
  split = _split(args)
  summary = rerank_runs.rerank_beir(
      args.model_dir, args.beir, split, args.run, args.out, top_k=args.top_k,
      step=args.step, dtype=args.dtype, batch_size=args.batch_size,
      input_length=args.input_length, measures=measures, progress=not args.no_progress,
      partitioner=distributed.host_partitioner(args.model_parallel), tail=args.tail)
  if jax.process_index() != 0:
    return 0
  name = f'{os.path.basename(os.path.normpath(args.beir))}/{split}'
  k, depth = args.top_k, summary['first_stage_depth']
  m = summary['metrics']
  if m is not None:
    below = (f' + first stage {k + 1}-{depth}' if args.tail == 'append' and depth > k
             else ' only' if args.tail == 'drop' else '')
    print(evaluation.format_table({
        f'{name} first stage ({os.path.basename(args.run)})': m['first stage'],
        f'{name} reranked top-{k}{below} (step {summary["step"]})': m['reranked']}))
  else:
    print(f'not evaluated: {summary["not_evaluated"]}')
  if summary['left_out']:
    print(f'left out: {", ".join(summary["left_out"])} (deeper than --top_k={k}; '
          '--tail=append keeps the first stage\'s documents below the reranked ones)')
  notes = [(summary['skipped'], 'without text in queries.jsonl, not reranked'),
           (summary['unjudged'], f'without judgements in {split}, reranked, not evaluated'),
           (summary['missing'], f'judged in {split}, not in the run: 0 in both rows')]
  for what, why in notes:
    if what:
      print(f'{cli.plural(what["count"], "query", "queries")} {why} (first: {what["first"]!r})')
  kept = (f'; ranks {k + 1}.. keep the first stage\'s order' if args.tail == 'append' and
          depth > k else '')
  print(f'run: {summary["run"]} ({cli.plural(summary["queries"], "query", "queries")}, '
        f'{cli.plural(summary["pairs"], "pair")} reranked{kept})')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
