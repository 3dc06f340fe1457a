#!/usr/bin/env python
"""Encode a corpus with a checkpoint into sharded, resumable embedding files.

  python scripts/export.py --model_dir=/tmp/sde --tower=right \
      --beir=/data/scifact --out_dir=/tmp/sde/export/scifact-corpus

Sources (one of): --beir FOLDER (its corpus, or with --beir_part=queries its
queries), --jsonl FILE (--id_field, --text_fields), --tfds NAME --split SPLIT
or --seqio_task NAME --split SPLIT (TensorFlow extras; --id_field and
--text_fields name the features; without an id field, ids are row numbers).
The left tower encodes queries, the right tower documents. Run the same
command again to resume an interrupted export; with --multihost, run it on
every host and each writes its own shards. See t5dual/export.py for the files.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from t5dual import export  # noqa: E402


def add_source_flags(parser: argparse.ArgumentParser) -> None:
  src = parser.add_argument_group('source (one of)')
  src.add_argument('--beir', help='BEIR folder')
  src.add_argument('--beir_part', choices=('corpus', 'queries'), default=None,
                   help='default: corpus for the right tower, queries for the left')
  src.add_argument('--jsonl', help='JSONL file with an id and text fields per line')
  src.add_argument('--tfds', help='TFDS dataset name (needs tensorflow-datasets)')
  src.add_argument('--seqio_task', help='seqio task name (needs seqio); reads its raw source')
  src.add_argument('--split', default='test', help='split for --tfds / --seqio_task')
  src.add_argument('--id_field', default='_id')
  src.add_argument('--text_fields', default='title,text',
                   help='comma-separated fields joined with a space (missing ones skipped)')


def read_source(args) -> tuple[list[str], list[str]]:
  from t5dual.data import sources
  given = [n for n in ('beir', 'jsonl', 'tfds', 'seqio_task') if getattr(args, n)]
  if len(given) != 1:
    raise SystemExit(f'give exactly one source (--beir, --jsonl, --tfds, --seqio_task), '
                     f'got {given or "none"}')
  fields = [f for f in args.text_fields.split(',') if f]
  if args.beir:
    part = args.beir_part or ('queries' if args.tower == 'left' else 'corpus')
    if part == 'corpus':
      return sources.read_beir_corpus(args.beir)
    queries = sources.read_beir_queries(args.beir)
    return list(queries), list(queries.values())
  if args.jsonl:
    return export.read_jsonl_corpus(args.jsonl, args.id_field, fields)
  if args.tfds:
    import tensorflow_datasets as tfds
    dataset = tfds.load(args.tfds, split=args.split, shuffle_files=False)
    return export.read_tf_dataset(dataset, args.id_field, fields, f'{args.tfds}:{args.split}')
  import seqio
  task = seqio.get_mixture_or_task(args.seqio_task)
  dataset = task.source.get_dataset(split=args.split, shuffle=False)
  return export.read_tf_dataset(dataset, args.id_field, fields,
                                f'{args.seqio_task}:{args.split}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--step', type=int, default=None, help='default: latest checkpoint')
  parser.add_argument('--tower', choices=export.TOWERS, required=True,
                      help='left = query tower, right = document tower')
  parser.add_argument('--out_dir', required=True)
  add_source_flags(parser)
  parser.add_argument('--dtype', choices=export.DTYPES, default='float16')
  parser.add_argument('--max_length', type=int, default=None,
                      help="default: the model's inputs (left) or targets (right) length")
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--shard_size', type=int, default=50_000)
  parser.add_argument('--buckets', default=None, help='comma-separated token lengths')
  parser.add_argument('--parquet', action='store_true', help='also write id + vector parquet')
  parser.add_argument('--allow_empty_text', action='store_true')
  parser.add_argument('--no_progress', action='store_true')
  parser.add_argument('--multihost', action='store_true',
                      help='call jax.distributed.initialize() first')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's per-file chatter
  if args.multihost:
    jax.distributed.initialize()

  try:
    export_source(args)
  except (FileNotFoundError, ValueError) as e:  # bad input: the message names file and line
    raise SystemExit(f'error: {e}') from e


def export_source(args) -> None:
  from t5dual import checkpoints
  ids, texts = read_source(args)
  model, params, step, tokenizer, lengths = checkpoints.restore_for_inference(
      args.model_dir, args.step)
  options = export.ExportOptions(
      max_length=args.max_length or lengths['inputs' if args.tower == 'left' else 'targets'],
      tower=args.tower, batch_size=args.batch_size, shard_size=args.shard_size,
      dtype=args.dtype, parquet=args.parquet, allow_empty=args.allow_empty_text,
      buckets=[int(b) for b in args.buckets.split(',')] if args.buckets else None,
      progress=not args.no_progress)
  manifest = export.export_embeddings(
      export.make_encode_fn(model, params, args.tower), tokenizer, ids, texts, args.out_dir,
      options, model_info=checkpoints.read_model_json(args.model_dir), step=step)
  if manifest is not None:
    logging.info('%s: %d vectors of dimension %d (%s) in %d shards', args.out_dir,
                 manifest['count'], manifest['dimension'], manifest['dtype'],
                 len(manifest['shards']))


if __name__ == '__main__':
  main()
