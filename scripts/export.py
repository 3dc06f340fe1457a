#!/usr/bin/env python
"""Encode a corpus with a checkpoint into sharded, resumable embedding files.

  python scripts/export.py --model_dir=/tmp/sde --side=document \
      --beir=/data/scifact --out_dir=/tmp/sde/export/scifact-corpus

Sources (one of): --beir FOLDER (its corpus, or with --beir_part=queries its
queries), --jsonl FILE (--id_field, --text_fields), --tfds NAME --split SPLIT
or --seqio_task NAME --split SPLIT (TensorFlow extras; --id_field and
--text_fields name the features; without an id field, ids are row numbers).
Files and TFDS datasets prepared as array_record ($TFDS_DATA_DIR) are read one
shard of texts at a time; other TFDS formats and seqio tasks are read whole.
--side=query encodes with the query side (the left tower), --side=document
with the document side (the right tower); --tower=left/right says the same.
Empty texts are encoded as EOS only, with one warning giving their count. Run
the same command again to resume an interrupted export. Multi-host (the flags
of t5dual/distributed.py): run the same command on every host; each encodes
and writes its own shards on its own devices, and process 0 writes the
manifest once all are done. See t5dual/export.py for the files.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5dual import cli, corpus, distributed, encoding, export  # noqa: E402
from t5dual.sides import Side  # noqa: E402

log = logging.getLogger('export')


def side_flag(name: str) -> Side:
  """argparse type: a Side from any of its names."""
  try:
    return Side.parse(name)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def lengths_flag(text: str) -> list[int]:
  """argparse type: comma-separated positive token lengths."""
  try:
    lengths = [int(b) for b in text.split(',') if b.strip()]
  except ValueError:
    lengths = []
  if not lengths or min(lengths) < 1:
    raise argparse.ArgumentTypeError(f'expected comma-separated positive integers, got {text!r}')
  return lengths


def add_source_flags(parser: argparse.ArgumentParser) -> None:
  src = parser.add_argument_group('source (one of)')
  src.add_argument('--beir', help='BEIR folder')
  src.add_argument('--beir_part', choices=('corpus', 'queries'), default=None,
                   help='default: corpus for the document side, queries for the query side')
  src.add_argument('--jsonl', help='JSONL file with an id and text fields per line')
  src.add_argument('--tfds', help='TFDS dataset name (needs tensorflow-datasets)')
  src.add_argument('--seqio_task', help='seqio task name (needs seqio); reads its raw source')
  src.add_argument('--split', default='test', help='split for --tfds / --seqio_task')
  src.add_argument('--id_field', default='_id')
  src.add_argument('--text_fields', default='title,text',
                   help='comma-separated fields joined with a space (missing ones skipped)')


def read_source(args) -> corpus.Corpus:
  """The corpus to export; files and TFDS datasets prepared as array_record are read a
  shard at a time, other tf.data sources (seqio tasks) whole."""
  given = [n for n in ('beir', 'jsonl', 'tfds', 'seqio_task') if getattr(args, n)]
  if len(given) != 1:
    raise cli.UserError(f'give exactly one source (--beir, --jsonl, --tfds, --seqio_task), '
                        f'got {given or "none"}')
  fields = [f for f in args.text_fields.split(',') if f]
  if args.beir:
    from t5dual.data import sources
    part = args.beir_part or args.side.beir_part
    name = os.path.join(args.beir, f'{part}.jsonl')
    if part == 'corpus':
      return corpus.beir_corpus(args.beir)
    queries = sources.read_beir_queries(args.beir)
    return corpus.InMemoryCorpus(list(queries), list(queries.values()), name)
  if args.jsonl:
    return corpus.JsonlCorpus(args.jsonl, corpus.jsonl_parser(args.id_field, fields))
  if args.tfds:
    from t5dual.data import tfds_source
    return tfds_source.tfds_corpus(args.tfds, args.split, args.id_field, fields)
  import seqio
  task = seqio.get_mixture_or_task(args.seqio_task)
  dataset = task.source.get_dataset(split=args.split, shuffle=False)
  name = f'{args.seqio_task}:{args.split}'
  return corpus.InMemoryCorpus(*corpus.read_tf_dataset(dataset, args.id_field, fields, name),
                               name)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--step', type=int, default=None, help='default: latest checkpoint')
  parser.add_argument('--side', '--tower', dest='side', type=side_flag, required=True,
                      help='query (= left tower) or document (= right tower)')
  parser.add_argument('--out_dir', required=True)
  add_source_flags(parser)
  parser.add_argument('--dtype', choices=export.DTYPES, default='float16')
  parser.add_argument('--max_length', type=int, default=None,
                      help="default: the model's query (inputs) or document (targets) length")
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--shard_size', type=int, default=50_000)
  parser.add_argument('--buckets', type=lengths_flag, default=None,
                      help='comma-separated token lengths')
  parser.add_argument('--parquet', action='store_true', help='also write id + vector parquet')
  parser.add_argument('--no_progress', action='store_true')
  distributed.add_inference_flags(parser)
  distributed.add_flags(parser)
  return parser


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  distributed.initialize_from_flags(args)
  from t5dual import checkpoints, evaluation
  args.model_dir = evaluation.require_dual_encoder(args.model_dir, 'export.py')
  source = read_source(args)
  partitioner = distributed.host_partitioner(args.model_parallel)
  restored = checkpoints.restore_for_inference(args.model_dir, args.step, partitioner)
  options = export.ExportOptions(
      max_length=args.max_length or restored.feature_lengths[args.side.feature],
      side=args.side, batch_size=args.batch_size, shard_size=args.shard_size,
      dtype=args.dtype, parquet=args.parquet,
      buckets=args.buckets,
      progress=not args.no_progress)
  manifest = export.export_corpus(
      encoding.make_encode_fn(restored.model, restored.params, args.side,
                              partitioner=partitioner), restored.tokenizer,
      source, args.out_dir, options, model_info=checkpoints.read_model_json(args.model_dir),
      step=restored.step)
  if manifest is not None:
    log.info('%s: %d vectors of dimension %d (%s) in %d shards', args.out_dir,
             manifest['count'], manifest['dimension'], manifest['dtype'],
             len(manifest['shards']))


if __name__ == '__main__':
  cli.run_main(main)
