#!/usr/bin/env python
"""The built-in demo: the whole retrieval stack on a generated collection, on CPU.

  python scripts/demo.py [--workdir demo_run] [--gin.TRAIN_STEPS=800 ...]
                         [--rerank_gin.TRAIN_STEPS=400 ...]

1. generates a collection (t5dual/data/demo.py) and a SentencePiece vocabulary;
2. first stage 1: BM25 (bm25s, t5dual/bm25.py);
3. first stage 2: a tiny SDE dual encoder trained with SamToNe (configs/demo.gin),
   exported and searched like any checkpoint;
4. trains a tiny RankT5-Enc reranker through the same trainer
   (configs/demo_rerank.gin), started from the dual encoder's encoder, on lists
   (t5dual/data/lists.py) whose negatives both first stages found for the
   training queries;
5. reranks each first stage's top-20 (t5dual/rerank_runs.py) and prints nDCG@10,
   MRR@10 and R@100 of every stage.

Everything is generated locally (data and vocabulary); nothing is downloaded.
All artefacts go under --workdir. Extra --gin_file / --gin.X flags apply to the
dual encoder, --rerank_gin_file / --rerank_gin.X flags to the reranker, on top of
the demo's configuration.
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402

from t5dual import (bm25, cli, distributed, evaluation, gin_utils, dual_encoders,  # noqa: E402
                    rerank_runs, rerankers, retrieval, train_lib, vocab)
from t5dual.data import demo, sources  # noqa: E402

DUAL_ENCODER_GIN = ['gin/models/sde.gin', 'gin/sizes/tiny.gin', 'configs/runs/finetune.gin',
                    'configs/demo.gin']
RERANKER_GIN = ['gin/models/rankt5_enc.gin', 'gin/sizes/tiny.gin', 'configs/runs/finetune.gin',
                'configs/runs/rerank.gin', 'configs/demo_rerank.gin']
MEASURES = ('nDCG@10', 'RR@10', 'R@100')
SHOWN = {'nDCG@10': 'nDCG@10', 'RR@10': 'MRR@10', 'R@100': 'R@100'}
# The collection: half of the concepts a query names are written with the
# document's own word, so BM25 has something to find (see t5dual/data/demo.py).
COLLECTION = dict(num_docs=1500, num_concepts=150, lexical_overlap=0.5)
DEPTH = 100           # documents each first stage retrieves per query
# Of which the reranker rescores the top TOP_K; ranks TOP_K+1..DEPTH follow in the
# first stage's order, so R@100 is the first stage's. The reranker's training lists
# draw negatives from ranks 1..100; deeper candidates than 20 cost time and, on the
# demo data, gain nothing (the dual encoder's top-50 reranked scores below it).
TOP_K = 20
# The dual encoder must beat its untrained self by this much nDCG@10.
MIN_DUAL_ENCODER_GAIN = 0.1


def _split_flags(argv):
  """(workdir, dual-encoder flags, reranker flags) of the demo's command line."""
  workdir, de_flags, rr_flags = 'demo_run', [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg == '--workdir':
      if not args:
        raise cli.ConfigError('--workdir needs a directory')
      workdir = args.pop(0)
    elif arg.startswith('--workdir='):
      workdir = arg.split('=', 1)[1]
    elif arg.startswith('--rerank_gin'):
      rr_flags.append('--gin' + arg[len('--rerank_gin'):])
    else:
      de_flags.append(arg)
  if not workdir:
    raise cli.ConfigError('--workdir needs a directory')
  return workdir, de_flags, rr_flags


def _configure(files, flags):
  """A fresh gin configuration: the demo's files, then the user's flags (all checked)."""
  user_files, bindings, _ = gin_utils.parse_flags(flags)
  gin.clear_config()
  gin_utils.parse_gin(files + user_files, bindings)
  gin_utils.check_bindings_used(bindings, train_lib.run)


def _train():
  """train_lib.run as configured; the trainer keeps config.gin in the model directory."""
  return gin_utils.call_configured(train_lib.run, run_config=gin_utils.operative_config)


def _training_negatives(data_dir, runs, path, k=60):
  """A TREC run for the reranker's training lists: reciprocal rank fusion of `runs`.

  Only training documents (those judged in qrels/train.tsv) are kept: the
  held-out test documents must not appear as training negatives, or the
  reranker learns to push exactly the test answers down. Fusion (score = sum
  over runs of 1 / (k + rank)) lets both first stages, whose mistakes differ,
  supply negatives.
  """
  qrels = evaluation.load_qrels(data_dir, 'train')
  training_docs = {d for judged in qrels.values() for d in judged}
  fused = {}
  for run in runs:
    for qid, docs in run.items():
      ranked = sorted(docs.items(), key=lambda kv: -kv[1])
      kept = [d for d, _ in ranked if d in training_docs]
      scores = fused.setdefault(qid, {})
      for rank, d in enumerate(kept, 1):
        scores[d] = scores.get(d, 0.0) + 1.0 / (k + rank)
  fused = {q: s for q, s in fused.items() if s}
  retrieval.write_trec_run(path, fused, tag='fused')
  return path


def _rerank(rr_dir, data_dir, first_stage_path, out):
  """The reranker's scores for each test query's top-TOP_K of a first-stage run, the
  rest of the run after them in its own order; writes `out` and returns the run."""
  qrels = evaluation.load_qrels(data_dir, 'test')
  first = {q: d for q, d in retrieval.read_trec_run(first_stage_path).items() if q in qrels}
  model, params, _, tokenizer, length = rerank_runs.load_reranker(rr_dir)
  doc_ids, doc_texts = sources.read_beir_corpus(data_dir)
  reranked = rerank_runs.rerank(rerank_runs.make_score_fn(model, params), tokenizer,
                              sources.read_beir_queries(data_dir), dict(zip(doc_ids, doc_texts)),
                              first, TOP_K, length, model.template, progress=False)
  # The tail ranks below the lowest reranker score, in first-stage order.
  run = rerank_runs.append_tail(reranked, first)
  retrieval.write_trec_run(out, run, tag=f't5dual-{model.config.scorer}')
  return run


def _print_table(rows):
  """rows: {stage: {measure: value}}."""
  width = max(len(name) for name in rows) + 2
  print(f'{"stage":{width}}' + ''.join(f'{SHOWN[m]:>9}' for m in MEASURES))
  for name, res in rows.items():
    print(f'{name:{width}}' + ''.join(f'{res[m]:>9.4f}' for m in MEASURES))


class _Timer:
  """Each stage's own time (since the previous stage ended), and the total."""

  def __init__(self):
    self.start = self.last = time.time()

  def stage(self) -> str:
    now, last = time.time(), self.last
    self.last = now
    return f'{now - last:.0f} s'

  def total(self) -> str:
    return f'{time.time() - self.start:.0f} s'


def main(argv):
  workdir, de_flags, rr_flags = _split_flags(argv)
  distributed.check_backend()  # the start-up line; an accelerator JAX cannot see stops here
  timer = _Timer()
  data_dir, runs_dir = os.path.join(workdir, 'data'), os.path.join(workdir, 'runs')
  de_dir, rr_dir = os.path.join(workdir, 'dual_encoder'), os.path.join(workdir, 'reranker')
  spm_prefix = os.path.join(workdir, 'spm')
  spm_path = spm_prefix + '.model'  # what vocab.train_sentencepiece writes
  lists_run = os.path.join(runs_dir, 'train-negatives.trec')
  configure_dual_encoder = lambda: _configure(DUAL_ENCODER_GIN, [
      f"--gin.MODEL_DIR='{de_dir}'", f"--gin.MIXTURE_OR_TASK_NAME='beir:{data_dir}:train'",
      f"--gin.VOCABULARY_PATH='{spm_path}'"] + de_flags)
  configure_reranker = lambda: _configure(RERANKER_GIN, [
      f"--gin.MODEL_DIR='{rr_dir}'", f"--gin.MIXTURE_OR_TASK_NAME='beir:{data_dir}:train'",
      f"--gin.VOCABULARY_PATH='{spm_path}'", f"--gin.INITIAL_CHECKPOINT_PATH='{de_dir}'",
      f"--gin.FIRST_STAGE_RUN='{lists_run}'"] + rr_flags)
  # Both configurations are checked before anything is written or trained.
  configure_reranker()
  configure_dual_encoder()
  # A demo starts afresh, but deletes only what an earlier demo left.
  if os.path.isdir(workdir) and os.listdir(workdir):
    if not os.path.isfile(os.path.join(data_dir, 'corpus.jsonl')):
      raise cli.UserError(f'--workdir {workdir} is not empty and holds no earlier demo: '
                          'choose a new directory')
    shutil.rmtree(workdir)
  counts = demo.write_demo_beir(data_dir, **COLLECTION)
  # The reranker's template words go into the vocabulary too (no unknown pieces).
  vocab.train_sentencepiece(
      demo.demo_texts(data_dir) + [rerankers.DEFAULT_TEMPLATE.format(query='', document='')],
      spm_prefix, vocab_size=1024)
  print(f'[demo] generated {counts} in {data_dir}; vocabulary {spm_path} ({timer.stage()})',
        flush=True)
  qrels = evaluation.load_qrels(data_dir, 'test')
  corpus_ids, corpus_texts = sources.read_beir_corpus(data_dir)
  test_queries = dict(zip(*evaluation.beir_queries_with_qrels(data_dir, qrels)))
  rows = {}

  # ---------------------------------------------------------- first stage 1: BM25
  bm25_test = os.path.join(runs_dir, 'bm25-test.trec')
  retrieval.write_trec_run(bm25_test, bm25.beir_run(data_dir, 'test', k=DEPTH), tag='bm25')
  rows['BM25'] = evaluation.evaluate(retrieval.read_trec_run(bm25_test), qrels, MEASURES)
  print(f'[demo] BM25 first stage ({timer.stage()})', flush=True)

  # ---------------------------------------------------------- first stage 2: dual encoder
  configure_dual_encoder()
  # The untrained model: the configured model with the run's initial seed.
  de_model = gin.get_configurable(dual_encoders.DualEncoderModel)()
  lengths = gin.query_parameter('%TASK_FEATURE_LENGTHS')
  rows['SDE dual encoder, untrained'] = evaluation.evaluate_beir(
      de_model, de_model.init_params(jax.random.PRNGKey(0)), vocab.Tokenizer(spm_path),
      corpus_ids, corpus_texts, test_queries, qrels, lengths['inputs'], lengths['targets'],
      measures=MEASURES)
  _train()
  # The trained model goes the way of any checkpoint: sharded export of corpus and
  # queries, exact top-k, a TREC run, metrics (scripts/eval.py run does the same).
  export_options = dict(shard_size=1000, dtype='float32', progress=False)
  de_test = evaluation.evaluate_checkpoint_on_beir(
      de_dir, data_dir, 'test', measures=MEASURES, k=DEPTH, export_options=export_options)
  de_train = evaluation.evaluate_checkpoint_on_beir(
      de_dir, data_dir, 'train', measures=MEASURES, k=DEPTH, export_options=export_options)
  rows['SDE dual encoder'] = de_test['metrics']
  print(f'[demo] dual encoder trained ({de_test["step"]} steps), exported and searched '
        f'({timer.stage()})', flush=True)

  # ---------------------------------------------------------- the reranker
  _training_negatives(data_dir, [bm25.beir_run(data_dir, 'train', k=DEPTH),
                                 retrieval.read_trec_run(de_train['run'])], lists_run)
  configure_reranker()
  rr_result = _train()
  print(f'[demo] reranker trained ({rr_result.get("step")} steps) ({timer.stage()})',
        flush=True)
  first_stages = {'BM25': bm25_test, 'SDE dual encoder': de_test['run']}
  gains = {}
  for name, path in first_stages.items():
    out = os.path.join(runs_dir, f'{name.split()[0].lower()}-test-reranked.trec')
    reranked = evaluation.evaluate(_rerank(rr_dir, data_dir, path, out), qrels, MEASURES)
    rows[f'{name} -> RankT5-Enc top-{TOP_K}'] = reranked
    gains[name] = reranked['nDCG@10'] - rows[name]['nDCG@10']
  print(f'[demo] both first stages reranked ({timer.stage()})', flush=True)

  print(f'\n[demo] {len(qrels)} test queries of documents unseen in training, full corpus '
        f'({counts["docs"]} docs); each first stage retrieves {DEPTH}, the reranker '
        f'rescores their top {TOP_K}:')
  _print_table(rows)
  for name, gain in gains.items():
    verdict = 'improves' if gain > 0 else 'does NOT improve'
    print(f'[demo] the reranker {verdict} {name}: {gain:+.4f} nDCG@10')
  print(f'[demo] done in {timer.total()}; models in {de_dir} and {rr_dir}; runs in {runs_dir} '
        f'and {os.path.dirname(de_test["run"])}')
  if rows['SDE dual encoder']['nDCG@10'] <= (rows['SDE dual encoder, untrained']['nDCG@10']
                                             + MIN_DUAL_ENCODER_GAIN):
    raise SystemExit('[demo] training did not improve the dual encoder: something is wrong')


if __name__ == '__main__':
  cli.run_main(main)
