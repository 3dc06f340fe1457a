#!/usr/bin/env python
"""Tokenize training data once into a prepared store that training reads by index.

  python scripts/prepare_data.py --source=beir:/data/msmarco:train \
      --vocabulary=/vocab/t5_spiece.model --out_dir=/data/msmarco-store \
      --run=/data/msmarco/bm25-train-top1000.trec --max_rank=1000
  python scripts/prepare_data.py --source=jsonl:/data/msmarco/negatives.jsonl \
      --vocabulary=... --out_dir=/data/msmarco-negatives-store
  (or bash scripts/run.sh prepare_data ...)

Sources: beir:<folder>[:<split>] (the split's positive pairs; with --run, reranker
training lists from that first-stage TREC run over the split's queries, in the
window [--min_rank, --max_rank], with --teacher scores for distillation) or
jsonl:<path> ({"query", "positive", "negatives"?} lines: pairs with hard negatives)
or tfds:<name>[:<version>][:<split>] (a prepared TFDS dataset in $TFDS_DATA_DIR whose
examples have those features: 'query', 'positive' texts, 'negatives' a sequence of texts)
or seqio:<task>[:<split>] (a pair task's output, 'inputs' the query's and 'targets' the
document's token ids, every preprocessor run; --module imports what registers it, as
MIXTURE_OR_TASK_MODULE does for training: a store is how a seqio run resumes without
re-reading).
Train from it with MIXTURE_OR_TASK_NAME='store:<out_dir>' (the reranker's MIN_RANK /
MAX_RANK / TEACHER must be those prepared, and INPUT_LENGTH / TASK_FEATURE_LENGTHS at
most --max_length + 1). Run the same command again to continue an
interrupted prepare; --verify checks every file's checksum of a prepared store.
See t5dual/data/store.py for the layout.
"""

import argparse
import importlib
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5dual import cli, vocab  # noqa: E402
from t5dual.data import store  # noqa: E402

log = logging.getLogger('prepare_data')


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--source', required=True,
                 help='beir:<folder>[:<split>], jsonl:<path>, tfds:<name>[:<version>][:<split>] '
                 'or seqio:<task>[:<split>]')
  p.add_argument('--module', action='append', default=[],
                 help='a Python module to import first (one that registers seqio tasks); '
                 'repeatable')
  p.add_argument('--vocabulary', required=True, help='SentencePiece model (VOCABULARY_PATH)')
  p.add_argument('--out_dir', required=True)
  p.add_argument('--max_length', type=int, default=store.DEFAULT_MAX_LENGTH,
                 help='ids kept per text; feature lengths up to max_length + 1 read from it')
  p.add_argument('--shard_size', type=int, default=store.DEFAULT_SHARD_SIZE,
                 help='rows per corpus / queries shard (the unit an interrupted prepare '
                 'keeps)')
  p.add_argument('--run', help='first-stage TREC run: reranker training lists')
  p.add_argument('--min_rank', type=int, default=1)
  p.add_argument('--max_rank', type=int, default=100)
  p.add_argument('--min_relevance', type=int, default=1)
  p.add_argument('--teacher', help='teacher scores (TREC run or JSONL, data/lists.py)')
  p.add_argument('--verify', action='store_true',
                 help='check every file of the prepared store against its checksum')
  args = p.parse_args(argv)
  if args.teacher and not args.run:
    raise cli.ConfigError('--teacher scores the candidates of a --run; give the run too')
  for module in args.module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise cli.ConfigError(f'--module {module}: {e}') from None
  tokenizer = vocab.Tokenizer(args.vocabulary)
  lists = None
  if args.run:
    lists = store.ListOptions(args.run, args.min_rank, args.max_rank, args.min_relevance,
                              args.teacher)
  manifest = store.prepare(args.source, args.out_dir, tokenizer, max_length=args.max_length,
                           shard_size=args.shard_size, lists=lists, progress=log.info)
  if args.verify:
    store.Store(args.out_dir, tokenizer, verify=True)
    log.info('%s: every checksum matches', args.out_dir)
  counts = manifest['counts']
  print(f'{args.out_dir}: {counts["corpus"]["rows"]} documents, {counts["queries"]["rows"]} '
        f'queries, {counts["pairs"]["rows"]} pairs'
        + (f', {counts["lists"]["rows"]} lists' if 'lists' in counts else '')
        + f', {store.size_bytes(args.out_dir) / 2**20:.1f} MiB')


if __name__ == '__main__':
  cli.run_main(main)
