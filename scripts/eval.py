#!/usr/bin/env python
"""Evaluate checkpoints on BEIR, score runs, mine hard negatives, draw diagnostics.

  # export corpus + queries -> exact top-k -> run.trec -> metrics table
  python scripts/eval.py run --model_dir=/tmp/sde --beir=/data/scifact --split=test

  # run file(s) + qrels -> table
  python scripts/eval.py score --run=a.trec --run=b.trec --qrels=/data/scifact/qrels/test.tsv

  # hard negatives from a run of the training split -> JSONL that training reads
  python scripts/eval.py mine --run=train.trec --beir=/data/scifact --split=train \
      --out=/data/scifact/hard_negatives.jsonl --min_rank=3 --max_rank=50 --margin=0.05

  # BM25 first stage (bm25s, Lucene scoring, English stemming + stopwords)
  python scripts/eval.py bm25 --beir=/data/scifact --split=test --out=bm25.trec --k=100

  # t-SNE, top-1 cosine and query/document similarity-ratio pictures, side by side
  python scripts/eval.py diagnose --model_dir=/tmp/softmax --model_dir=/tmp/samtone \
      --beir=/data/scifact --split=test --out_dir=/tmp/diagnostics

`run` keeps its exports under --out_dir (default MODEL_DIR/eval/<folder>-<split>-<step>),
so running it again resumes an interrupted export and reuses finished ones. Empty
queries and documents are encoded (as EOS only) with a warning; judgements citing
documents missing from the corpus are scored as BEIR scores them, with a warning
(`mine` skips them).

`run` on a multi-host job (the flags of t5dual/distributed.py; the same command
on every host): each host exports its shards of the corpus and the queries,
then process 0 searches, writes the run and prints the table.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5dual import cli, distributed, evaluation, export, hard_negatives, retrieval  # noqa: E402
from t5dual.sides import Side  # noqa: E402

log = logging.getLogger('eval')


def _measures(text: str) -> list[str]:
  names = [m.strip() for m in text.split(',') if m.strip()]
  evaluation.parse_measures(names)  # fail early on a typo
  return names


def _search_kwargs(args) -> dict:
  if args.backend == 'faiss':
    return dict(index=args.faiss_index, nprobe=args.nprobe)
  return dict(chunk_size=args.chunk_size, query_block=args.query_block)


def cmd_run(args) -> dict:
  summary = evaluation.evaluate_checkpoint_on_beir(
      args.model_dir, args.beir, args.split, step=args.step, out_dir=args.out_dir,
      measures=_measures(args.measures), k=args.k, backend=args.backend,
      exclude_identical_ids=args.exclude_identical_ids, search_kwargs=_search_kwargs(args),
      export_options=dict(batch_size=args.batch_size, shard_size=args.shard_size,
                          dtype=args.dtype, progress=not args.no_progress),
      tag=args.tag, partitioner=distributed.host_partitioner(args.model_parallel))
  if summary['metrics'] is None:  # a multi-host job's other processes
    return summary
  name = os.path.basename(os.path.normpath(args.beir))
  print(evaluation.format_table({f'{name}/{args.split} step {summary["step"]}':
                                 summary['metrics']}))
  print(f'run: {summary["run"]}')
  return summary


def cmd_score(args) -> dict:
  if bool(args.qrels) == bool(args.beir):
    raise cli.UserError('give --qrels FILE or --beir FOLDER (with --split)')
  qrels = (evaluation.load_qrels(args.qrels) if args.qrels
           else evaluation.load_qrels(args.beir, args.split))
  measures = _measures(args.measures)
  table = {path: evaluation.evaluate(retrieval.read_trec_run(path), qrels, measures)
           for path in args.run}
  print(evaluation.format_table(table))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(table, f, indent=2)
  return table


def cmd_mine(args) -> dict:
  from t5dual.data import sources
  run = retrieval.read_trec_run(args.run)
  qrels = evaluation.load_qrels(args.beir, args.split)
  doc_ids, doc_texts = sources.read_beir_corpus(args.beir)
  corpus = dict(zip(doc_ids, doc_texts))
  # As in training: a judged document without text cannot be a positive.
  evaluation.warn_missing_documents(qrels, corpus, sources.qrels_path(args.beir, args.split),
                                    'those pairs are skipped')
  qrels = {q: {d: r for d, r in judged.items() if d in corpus} for q, judged in qrels.items()}
  config = hard_negatives.MiningConfig(
      num_negatives=args.num_negatives, min_rank=args.min_rank, max_rank=args.max_rank,
      margin=args.margin, relative_margin=args.relative_margin,
      min_relevance=args.min_relevance, min_negatives=args.min_negatives,
      sample=args.sample, seed=args.seed)
  positive_scores = None
  if args.embeddings:
    positive_scores = hard_negatives.positive_scores_from_embeddings(
        export.open_embeddings(os.path.join(args.embeddings, 'queries')),
        export.open_embeddings(os.path.join(args.embeddings, 'corpus')), qrels,
        args.min_relevance)
  records, stats = hard_negatives.mine_hard_negatives(run, qrels, config, positive_scores)
  count = hard_negatives.write_triples(args.out, records, sources.read_beir_queries(args.beir),
                                       corpus)
  print(json.dumps(stats))
  print(f'{count} examples with hard negatives: {args.out}')
  return stats


def cmd_bm25(args) -> dict:
  from t5dual import bm25
  run = bm25.beir_run(args.beir, args.split, k=args.k, k1=args.k1, b=args.b)
  retrieval.write_trec_run(args.out, run, tag='bm25')
  metrics = evaluation.evaluate(run, evaluation.load_qrels(args.beir, args.split),
                                _measures(args.measures))
  name = os.path.basename(os.path.normpath(args.beir))
  print(evaluation.format_table({f'{name}/{args.split} bm25': metrics}))
  print(f'run: {args.out}')
  return metrics


def _diagnose_inputs(model_dir: str, args) -> tuple:
  """(query vectors, positive vectors, corpus vectors) of one checkpoint, in memory."""
  import numpy as np
  from t5dual import checkpoints, corpus, diagnostics, encoding
  from t5dual.data import sources
  qrels = evaluation.load_qrels(args.beir, args.split)
  doc_ids, doc_texts = sources.read_beir_corpus(args.beir)
  qids, qtexts = evaluation.beir_queries_with_qrels(args.beir, qrels)
  q_rows, d_rows = diagnostics.query_positive_pairs(qids, doc_ids, qrels)
  restored = checkpoints.restore_for_inference(model_dir, args.step)

  def encode(side, ids, texts):
    corpus.validate_corpus(ids, texts, os.path.join(args.beir, f'{side.beir_part}.jsonl'))
    return encoding.encode_texts(
        encoding.make_encode_fn(restored.model, restored.params, side), restored.tokenizer,
        texts, restored.feature_lengths[side.feature], args.batch_size)
  docs = encode(Side.DOCUMENT, doc_ids, doc_texts)
  queries = encode(Side.QUERY, [qids[i] for i in q_rows], [qtexts[i] for i in q_rows])
  return queries, docs[np.asarray(d_rows)], docs, restored.step


def cmd_diagnose(args) -> dict:
  from t5dual import diagnostics
  labels = args.label or []
  if labels and len(labels) != len(args.model_dir):
    raise cli.UserError(f'{len(labels)} --label for {len(args.model_dir)} --model_dir')
  model_dirs = [evaluation.require_dual_encoder(d, 'eval.py diagnose') for d in args.model_dir]
  diags = []
  for i, model_dir in enumerate(model_dirs):
    queries, positives, docs, step = _diagnose_inputs(model_dir, args)
    label = labels[i] if labels else f'{os.path.basename(os.path.normpath(model_dir))} @{step}'
    diags.append(diagnostics.compute(label, queries, positives, docs, sample=args.sample,
                                     seed=args.seed))
  paths = diagnostics.save_all(diags, args.out_dir)
  for d in diags:
    print(d.label, json.dumps(d.stats))
  print('\n'.join(paths.values()))
  return paths


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  measures = dict(default=','.join(evaluation.DEFAULT_MEASURES),
                  help='comma-separated, e.g. nDCG@10,RR@10,R@100,P@5,AP')

  run = sub.add_parser('run', help='export -> retrieve -> evaluate a checkpoint on BEIR')
  run.add_argument('--model_dir', required=True)
  run.add_argument('--step', type=int, default=None)
  run.add_argument('--beir', required=True)
  run.add_argument('--split', default='test')
  run.add_argument('--out_dir', default=None)
  run.add_argument('--measures', **measures)
  run.add_argument('--k', type=int, default=None, help='default: what the measures need')
  run.add_argument('--backend', choices=('exact', 'faiss'), default='exact')
  run.add_argument('--faiss_index', default='flat', help='flat | ivf<nlist> | hnsw<M> | '
                   'FAISS factory string')
  run.add_argument('--nprobe', type=int, default=32)
  run.add_argument('--chunk_size', type=int, default=32768)
  run.add_argument('--query_block', type=int, default=4096)
  run.add_argument('--exclude_identical_ids', action='store_true',
                   help='drop a document whose id equals the query id (BEIR ArguAna, Quora)')
  run.add_argument('--dtype', choices=export.DTYPES, default='float16')
  run.add_argument('--batch_size', type=int, default=128)
  run.add_argument('--shard_size', type=int, default=50_000)
  run.add_argument('--tag', default='t5dual')
  run.add_argument('--no_progress', action='store_true')
  distributed.add_inference_flags(run)
  distributed.add_flags(run)
  run.set_defaults(fn=cmd_run)

  score = sub.add_parser('score', help='run file(s) + qrels -> table')
  score.add_argument('--run', action='append', required=True)
  score.add_argument('--qrels', help='qrels file (BEIR tsv or TREC)')
  score.add_argument('--beir', help='BEIR folder (qrels/<split>.tsv)')
  score.add_argument('--split', default='test')
  score.add_argument('--measures', **measures)
  score.add_argument('--json', help='also write the table as JSON here')
  score.set_defaults(fn=cmd_score)

  mine = sub.add_parser('mine', help='hard negatives from a run -> training JSONL')
  mine.add_argument('--run', required=True)
  mine.add_argument('--beir', required=True)
  mine.add_argument('--split', default='train')
  mine.add_argument('--out', required=True)
  mine.add_argument('--embeddings', help='out_dir of `run` (corpus/ and queries/ exports), '
                    'to score positives the run did not retrieve')
  defaults = hard_negatives.MiningConfig()
  for flag in ('num_negatives', 'min_rank', 'max_rank', 'min_relevance', 'min_negatives',
               'seed'):
    mine.add_argument(f'--{flag}', type=int, default=getattr(defaults, flag))
  mine.add_argument('--margin', type=float, default=None)
  mine.add_argument('--relative_margin', action='store_true',
                    help='margin is a fraction of the positive score, not an absolute gap')
  mine.add_argument('--sample', action='store_true', help='sample within the window')
  mine.set_defaults(fn=cmd_mine)

  bm25 = sub.add_parser('bm25', help='BM25 (bm25s) top-k of a BEIR split -> run file + table')
  bm25.add_argument('--beir', required=True)
  bm25.add_argument('--split', default='test')
  bm25.add_argument('--out', required=True, help='TREC run file to write')
  bm25.add_argument('--k', type=int, default=100)
  bm25.add_argument('--k1', type=float, default=1.5)
  bm25.add_argument('--b', type=float, default=0.75)
  bm25.add_argument('--measures', **measures)
  bm25.set_defaults(fn=cmd_bm25)

  diag = sub.add_parser('diagnose', help='SamToNe diagnostics pictures')
  diag.add_argument('--model_dir', action='append', required=True,
                    help='repeat to draw checkpoints side by side')
  diag.add_argument('--label', action='append', help='one per --model_dir')
  diag.add_argument('--step', type=int, default=None)
  diag.add_argument('--beir', required=True)
  diag.add_argument('--split', default='test')
  diag.add_argument('--out_dir', required=True)
  diag.add_argument('--sample', type=int, default=1000, help='points per tower in t-SNE')
  diag.add_argument('--batch_size', type=int, default=128)
  diag.add_argument('--seed', type=int, default=0)
  diag.set_defaults(fn=cmd_diagnose)
  return parser


def main(argv=None):
  """Runs one command; returns what it computed (summary, table, stats or paths)."""
  args = build_parser().parse_args(argv)
  if args.fn is cmd_run:
    distributed.initialize_from_flags(args)
  return args.fn(args)


def _entry_point(argv) -> None:
  main(argv)  # the result is printed; the exit status is 0


if __name__ == '__main__':
  cli.run_main(_entry_point)
