#!/usr/bin/env python
"""Reranking quality from scratch on medquad: BM25 and a dual encoder as first stages,
RankT5-EncDec / RankT5-Enc / yes-no rerankers over their top-k. Prints a table and
appends it to BENCHMARKS.md.

  python scripts/benchmark_rerank.py --shared ../shared --workdir /tmp/t5dual_rerank \
      [--grid priority | --grid encdec/softmax/8,enc/softmax/8@de,encdec/softmax/8+kl]
      [--sample 400 --steps 300 --batch 16 --size cpu_small --input_length 160]

A grid row is SCORER/LOSS/LIST[@de][+kl][~NEG]:
  SCORER  encdec (RankT5-EncDec), enc (RankT5-Enc), yes_no (monoT5-style)
  LOSS    pointwise, pairwise, softmax, poly1 (t5dual.ranking_losses)
  LIST    candidates per training list (1 positive + BM25 negatives of ranks 1..100)
  @de     token embedder and encoder start from the benchmark's dual encoder
          (INITIAL_CHECKPOINT_PATH, interop.mapping.graft) instead of random values
  +kl     a second stage: from the row's final checkpoint, KL distillation
          (ranking_losses.kl_distillation_loss) from the dual encoder's scores on
          its own top-100 of the training queries, for --stage2_steps steps.
  ~NEG    where the training negatives come from: ~bm25 (the default) BM25's
          top-100 of the training queries, ~de the dual encoder's, ~mix both
          interleaved rank by rank (the reranker then sees the hard negatives of
          both first stages it will rerank).

Everything is cached in --workdir, so a re-run (or a larger grid) reuses it: the BM25
runs (t5dual.bm25), the dual encoder (trained with scripts/train.py and
configs/runs/medquad_cpu.gin unless --de_dir names one) and its runs, the test-query
sample, and each trained reranker (keyed by its training settings). Rerankers train
with scripts/train.py's gin path (gin/models/<scorer>.gin + configs/runs/finetune.gin +
configs/runs/rerank.gin). Each reranker scores the union of the two first stages'
top-k of the sampled queries once (t5dual.rerank_runs.rerank); both reranked runs and
the first stages on the same sample are evaluated with pytrec_eval (ir_measures).
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from t5dual import evaluation, fileio, retrieval  # noqa: E402

SCORER_GIN = {'encdec': 'gin/models/rankt5_encdec.gin', 'enc': 'gin/models/rankt5_enc.gin',
              'yes_no': 'gin/models/monot5.gin'}
SCORER_NAME = {'encdec': 'RankT5-EncDec', 'enc': 'RankT5-Enc', 'yes_no': 'yes/no (monoT5)'}
LOSSES = {'pointwise': 'pointwise_sigmoid_loss', 'pairwise': 'pairwise_logistic_loss',
          'softmax': 'softmax_loss', 'poly1': 'poly1_softmax_loss'}
# What the issue asks for first (EncDec x losses at list 8, softmax at lists 2/8/32,
# the other scorers with softmax, one two-stage row), in the order they run.
PRIORITY = ('encdec/softmax/8,encdec/pointwise/8,encdec/pairwise/8,encdec/poly1/8,'
            'encdec/softmax/2,encdec/softmax/32,enc/softmax/8,yes_no/softmax/8,'
            'encdec/softmax/8+kl')
MEASURES = ('nDCG@10', 'RR@10', 'R@100')
SPEC = re.compile(r'^(?P<scorer>\w+)/(?P<loss>\w+)/(?P<list>\d+)(?P<init>@de)?(?P<kl>\+kl)?'
                  r'(?:~(?P<neg>bm25|de|mix))?$')
NEGATIVES = {'bm25': 'BM25', 'de': 'SDE', 'mix': 'BM25 + SDE'}


@dataclasses.dataclass(frozen=True)
class Row:
  """One grid row: a reranker recipe."""

  scorer: str
  loss: str
  list_size: int
  from_de: bool = False
  second_stage: bool = False
  negatives: str = 'bm25'   # one of NEGATIVES

  @classmethod
  def parse(cls, spec: str) -> 'Row':
    m = SPEC.match(spec.strip())
    if not m:
      raise SystemExit(f'--grid: {spec!r} is not SCORER/LOSS/LIST[@de][+kl][~bm25|~de|~mix]')
    if m['scorer'] not in SCORER_GIN:
      raise SystemExit(f'--grid: {spec!r}: scorer must be one of {sorted(SCORER_GIN)}')
    if m['loss'] not in LOSSES:
      raise SystemExit(f'--grid: {spec!r}: loss must be one of {sorted(LOSSES)}')
    if not 2 <= int(m['list']) <= 100:
      raise SystemExit(f'--grid: {spec!r}: list size must be in [2, 100]')
    return cls(m['scorer'], m['loss'], int(m['list']), bool(m['init']), bool(m['kl']),
               m['neg'] or 'bm25')

  @property
  def spec(self) -> str:
    return (f'{self.scorer}/{self.loss}/{self.list_size}' + ('@de' if self.from_de else '')
            + ('+kl' if self.second_stage else '')
            + ('' if self.negatives == 'bm25' else f'~{self.negatives}'))

  @property
  def stage1(self) -> 'Row':
    return dataclasses.replace(self, second_stage=False)


def parse_grid(text: str) -> list[Row]:
  return [Row.parse(s) for s in (PRIORITY if text == 'priority' else text).split(',')
          if s.strip()]


def cpu_model() -> str:
  from t5dual import cli
  return f'{cli.cpu_model()} x{os.cpu_count()} cores'


def size_flags(size: str) -> list[str]:
  return [f'--gin_file=gin/sizes/{size}.gin']


def run_logged(cmd: list[str], log_path: str) -> float:
  """Runs cmd in the repository root, output to log_path; returns wall seconds."""
  print('$ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
  t0 = time.time()
  with open(log_path, 'a') as log:
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f'command failed ({proc.returncode}), see {log_path}')
  return time.time() - t0


def cached_json(path: str, make):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  value = make()
  fileio.write_json(path, value, indent=2)
  return value


# --------------------------------------------------------------------------- first stages

def bm25_run(args, split: str) -> str:
  path = os.path.join(args.workdir, f'bm25_{split}.trec')
  if not os.path.exists(path):
    from t5dual import bm25
    retrieval.write_trec_run(path, bm25.beir_run(args.beir, split, k=args.top_k), tag='bm25')
  return path


def dual_encoder(args) -> dict:
  """The dual encoder first stage: {'dir', 'train_s'} (trained here unless --de_dir)."""
  if args.de_dir:
    return {'dir': args.de_dir, 'train_s': None}
  model_dir = os.path.join(args.workdir, 'de')

  def train():
    cmd = [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
           '--gin_file=gin/models/sde.gin', '--gin_file=gin/sizes/cpu_small.gin',
           '--gin_file=configs/runs/finetune.gin', '--gin_file=configs/runs/medquad_cpu.gin',
           f"--gin.MODEL_DIR='{model_dir}'",
           f"--gin.MIXTURE_OR_TASK_NAME='beir:{args.beir}:train'",
           f"--gin.VOCABULARY_PATH='{args.vocab}'"]
    return {'dir': model_dir, 'train_s': run_logged(cmd, model_dir + '.log')}
  return cached_json(os.path.join(args.workdir, 'de.json'), train)


def de_run(args, de: dict, split: str) -> str:
  out = os.path.join(args.workdir, f'de_{split}')
  path = os.path.join(out, 'run.trec')
  if not os.path.exists(path):
    evaluation.evaluate_checkpoint_on_beir(
        de['dir'], args.beir, split, out_dir=out, measures=MEASURES, k=args.top_k,
        export_options=dict(dtype='float32', progress=False))
  return path


def teacher_run(args, de: dict) -> str:
  """The dual encoder's train-split run with scores / its training temperature.

  The dual encoder was trained on softmax(cosine / temperature), so that is the
  distribution its scores stand for; KL distillation (temperature 1) reads them so.
  """
  path = os.path.join(args.workdir, 'de_train_teacher.trec')
  if not os.path.exists(path):
    from t5dual import checkpoints
    temperature = checkpoints.read_model_json(de['dir'])['loss']['temperature']
    run = retrieval.read_trec_run(de_run(args, de, 'train'))
    scaled = {q: {d: s / temperature for d, s in docs.items()} for q, docs in run.items()}
    retrieval.write_trec_run(path, scaled, tag='de-teacher')
  return path


def negatives_run(args, negatives: str, de: dict) -> str:
  """The training-split run the reranker's negatives are sampled from (see ~NEG)."""
  if negatives == 'bm25':
    return bm25_run(args, 'train')
  if negatives == 'de':
    return de_run(args, de, 'train')
  path = os.path.join(args.workdir, 'mix_train.trec')
  if not os.path.exists(path):
    runs = [retrieval.read_trec_run(bm25_run(args, 'train')),
            retrieval.read_trec_run(de_run(args, de, 'train'))]
    mixed = {}
    for q in runs[0].keys() | runs[1].keys():
      ranked = [sorted(r.get(q, {}), key=lambda d, r=r: -r[q][d]) for r in runs]
      order = {}  # an ordered set
      for pair in zip(*ranked):  # rank by rank: bm25's 1st, the SDE's 1st, bm25's 2nd, ...
        order.update(dict.fromkeys(pair))
      order = list(order)
      # The run format needs scores: descending by interleaved rank.
      mixed[q] = {d: float(len(order) - i) for i, d in enumerate(order[:args.top_k])}
    retrieval.write_trec_run(path, mixed, tag='bm25+de')
  return path


def test_sample(args, qrels) -> list[str]:
  import numpy as np
  qids = sorted(qrels)
  if args.sample and args.sample < len(qids):
    picked = np.random.default_rng(args.seed).choice(len(qids), args.sample, replace=False)
    qids = sorted(qids[i] for i in picked)
  return qids


def restrict(run, qids):
  return {q: run[q] for q in qids if q in run}


# --------------------------------------------------------------------------- rerankers

def lists_per_step(args, row: Row) -> int:
  """--batch, or --pairs_per_step // list size (same compute per step for every list size)."""
  if args.pairs_per_step:
    return max(1, args.pairs_per_step // row.list_size)
  return args.batch


def train_settings(args, row: Row) -> dict:
  return {'scorer': row.scorer, 'loss': row.loss, 'list': row.list_size,
          'from_de': row.from_de, 'steps': args.steps, 'batch': lists_per_step(args, row),
          'lr': args.lr,
          'size': args.size, 'input_length': args.input_length, 'seed': args.train_seed,
          **({} if row.negatives == 'bm25' else {'negatives': row.negatives}),
          **({'gin': args.gin} if args.gin else {})}


def train_reranker(args, row: Row, de: dict) -> dict:
  """Trains (or finds) the row's reranker: {'dir', 'train_s', 'stage1_s', 'steps'}."""
  settings = train_settings(args, row.stage1)
  key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
  name = row.stage1.spec.replace('/', '_').replace('@', '_').replace('~', '_')
  stage1_dir = os.path.join(args.workdir, 'rerankers', f'{name}-{key}')
  extra = [f'--gin.LOSS_FN=@ranking_losses.{LOSSES[row.loss]}',
           f"--gin.FIRST_STAGE_RUN='{negatives_run(args, row.negatives, de)}'"]
  if row.from_de:
    extra.append(f"--gin.INITIAL_CHECKPOINT_PATH='{de['dir']}'")
  stage1 = cached_json(stage1_dir + '.json', lambda: {
      'dir': stage1_dir, 'settings': settings,
      'train_s': train_stage(args, stage1_dir, row, args.steps, args.lr, extra)})
  if not row.second_stage:
    return {'dir': stage1_dir, 'train_s': stage1['train_s'], 'steps': str(args.steps)}
  stage2_dir = f'{stage1_dir}+kl{args.stage2_steps}'
  teacher = teacher_run(args, de)
  extra = ['--gin.LOSS_FN=@ranking_losses.kl_distillation_loss',
           f"--gin.FIRST_STAGE_RUN='{de_run(args, de, 'train')}'",
           f"--gin.TEACHER='{teacher}'", f"--gin.INITIAL_CHECKPOINT_PATH='{stage1_dir}'"]
  stage2 = cached_json(stage2_dir + '.json', lambda: {
      'dir': stage2_dir, 'train_s': train_stage(args, stage2_dir, row, args.stage2_steps,
                                                args.stage2_lr, extra)})
  return {'dir': stage2_dir, 'train_s': stage1['train_s'] + stage2['train_s'],
          'steps': f'{args.steps}+{args.stage2_steps}'}


def train_stage(args, model_dir: str, row: Row, steps: int, lr: float,
                extra: list[str]) -> float:
  cmd = [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
         f'--gin_file={SCORER_GIN[row.scorer]}'] + size_flags(args.size) + [
         '--gin_file=configs/runs/finetune.gin', '--gin_file=configs/runs/rerank.gin',
         f"--gin.MODEL_DIR='{model_dir}'",
         f"--gin.MIXTURE_OR_TASK_NAME='beir:{args.beir}:train'",
         f"--gin.VOCABULARY_PATH='{args.vocab}'", f'--gin.LIST_SIZE={row.list_size}',
         f'--gin.INPUT_LENGTH={args.input_length}',
         f'--gin.BATCH_SIZE={lists_per_step(args, row)}',
         f'--gin.TRAIN_STEPS={steps}', f'--gin.LEARNING_RATE={lr}',
         f'--gin.SEED={args.train_seed}', "--gin.ACTIVATION_DTYPE='float32'",
         '--gin.DROPOUT_RATE=0.0', '--gin.trainer.TrainerConfig.log_every=25',
         f'--gin.trainer.TrainerConfig.save_every={steps}'] + extra + args.gin
  return run_logged(cmd, model_dir + '.log')


def rerank_row(args, model_dir: str, firsts: dict, queries, documents, qrels) -> dict:
  """Scores the union of the first stages' top-k once; metrics of each reranked run."""
  from t5dual import rerank_runs
  model, params, _, tokenizer, length = rerank_runs.load_reranker(model_dir)
  union = {}
  for run in firsts.values():
    for q, d in rerank_runs.top_k_pairs(run, args.top_k):
      union.setdefault(q, {})[d] = 0.0
  pairs = sum(len(d) for d in union.values())
  t0 = time.time()
  scores = rerank_runs.rerank(rerank_runs.make_score_fn(model, params), tokenizer, queries,
                            documents, union, args.top_k * len(firsts), length,
                            model.template, args.rerank_batch, progress=False)
  seconds = time.time() - t0
  import jax
  out = {'pairs': pairs, 'rerank_s': seconds, 'pairs_per_s': pairs / seconds,
         'params': int(sum(x.size for x in jax.tree_util.tree_leaves(params)))}
  for name, run in firsts.items():
    reranked = {q: {d: scores[q][d] for d, _ in
                    sorted(docs.items(), key=lambda kv: -kv[1])[:args.top_k]}
                for q, docs in run.items()}
    retrieval.write_trec_run(os.path.join(model_dir, f'reranked_{name}.trec'), reranked,
                             tag=f't5dual-{model.config.scorer}')
    out[name] = evaluation.evaluate(reranked, qrels, MEASURES)
  return out


# --------------------------------------------------------------------------- main

def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--shared', default=os.path.join(REPO, '..', 'shared'))
  parser.add_argument('--workdir', default='/tmp/t5dual_rerank')
  parser.add_argument('--grid', default='priority', help="'priority' or rows, comma-separated")
  parser.add_argument('--sample', type=int, default=400, help='test queries (0: all)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the test-query sample')
  parser.add_argument('--top_k', type=int, default=100)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch', type=int, default=16, help='queries (lists) per step')
  parser.add_argument('--pairs_per_step', type=int, default=0,
                      help='if set, lists per step = this // list size (overrides --batch)')
  parser.add_argument('--budget_s', type=float, default=0,
                      help='start no further row once this many seconds have passed '
                           '(0: no limit); the table names the rows left out')
  parser.add_argument('--lr', type=float, default=1e-2)
  parser.add_argument('--stage2_steps', type=int, default=100)
  parser.add_argument('--stage2_lr', type=float, default=1e-3)
  parser.add_argument('--size', default='cpu_small', help='a gin/sizes/*.gin name')
  parser.add_argument('--input_length', type=int, default=160)
  parser.add_argument('--train_seed', type=int, default=0)
  parser.add_argument('--rerank_batch', type=int, default=64)
  parser.add_argument('--de_dir', default=None,
                      help='a trained dual encoder (default: train one in WORKDIR/de)')
  parser.add_argument('--device', default=None, help='label for the table')
  parser.add_argument('--output', default=os.path.join(REPO, 'BENCHMARKS.md'))
  parser.add_argument('--gin', action='append', default=[],
                      help='extra scripts/train.py flag for every reranker, e.g. '
                           "--gin=--gin.rerankers.RerankerConfig.pooling=\\'mean\\'")
  args = parser.parse_args()
  grid = parse_grid(args.grid)
  args.beir = os.path.abspath(os.path.join(args.shared, 'data', 'medquad'))
  args.vocab = os.path.abspath(os.path.join(args.shared, 'vocab', 't5_spiece.model'))
  for path in (args.beir, args.vocab):
    if not os.path.exists(path):
      raise SystemExit(f'{path} not found (needs the shared data)')
  args.workdir = os.path.abspath(args.workdir)
  os.makedirs(os.path.join(args.workdir, 'rerankers'), exist_ok=True)
  device = args.device or cpu_model()

  from t5dual.data import sources
  qrels_all = evaluation.load_qrels(args.beir, 'test')
  qids = test_sample(args, qrels_all)
  qrels = restrict(qrels_all, qids)
  queries = sources.read_beir_queries(args.beir)
  doc_ids, doc_texts = sources.read_beir_corpus(args.beir)
  documents = dict(zip(doc_ids, doc_texts))
  de = dual_encoder(args)
  firsts = {'bm25': restrict(retrieval.read_trec_run(bm25_run(args, 'test')), qids),
            'de': restrict(retrieval.read_trec_run(de_run(args, de, 'test')), qids)}
  first_metrics = {name: evaluation.evaluate(run, qrels, MEASURES)
                   for name, run in firsts.items()}
  print(json.dumps({'first stages': first_metrics, 'queries': len(qids)}), flush=True)

  results_path = os.path.join(args.workdir, 'results.json')
  rows, left_out, t_start = [], [], time.time()
  for row in grid:
    if args.budget_s and time.time() - t_start > args.budget_s:
      left_out.append(row.spec)
      continue
    trained = train_reranker(args, row, de)
    result = {'spec': row.spec, 'steps': trained['steps'], 'train_s': trained['train_s'],
              'lists_per_step': lists_per_step(args, row),
              **rerank_row(args, trained['dir'], firsts, queries, documents, qrels)}
    rows.append(result)
    print(json.dumps(result), flush=True)
    with open(results_path, 'w') as f:
      json.dump({'first stages': first_metrics, 'de': de, 'rows': rows}, f, indent=2)
  write_table(args, device, len(qids), de, first_metrics, grid, rows, left_out)


def write_table(args, device, num_queries, de, first_metrics, grid, rows, left_out):
  date = datetime.date.today().isoformat()
  batch_text = (f'{args.pairs_per_step} candidates per step (lists per step = '
                f'{args.pairs_per_step} / list size)' if args.pairs_per_step else
                f'{args.batch} lists per step')
  de_time = '' if de['train_s'] is None else f' (trained in {de["train_s"]:.0f} s)'
  command = ('python scripts/benchmark_rerank.py ' + ' '.join(shlex.quote(a) for a in [
      f'--grid={",".join(r.spec for r in grid)}', f'--sample={args.sample}',
      f'--seed={args.seed}', f'--steps={args.steps}', f'--batch={args.batch}',
      f'--pairs_per_step={args.pairs_per_step}', f'--budget_s={args.budget_s:g}',
      f'--lr={args.lr}', f'--stage2_steps={args.stage2_steps}',
      f'--stage2_lr={args.stage2_lr}', f'--size={args.size}',
      f'--input_length={args.input_length}'] + [f'--gin={g}' for g in args.gin]))
  head = (
      f'### Reranking from scratch on medquad ({date}, {device})\n\n'
      f'{num_queries} medquad test queries (a fixed random sample, numpy seed {args.seed}; '
      f'every row and both first stages are measured on the same queries). First stages: '
      f'BM25 (bm25s) and the `cpu_small` SDE of configs/runs/medquad_cpu.gin'
      f'{de_time}'
      f'. Each reranker reorders the top-{args.top_k} of each first stage. Rerankers are '
      f'trained from random initialisation (`@de`: token embedder and encoder from the '
      f'SDE) on medquad train, `{args.size}` T5 dimensions for encoder and decoder, '
      f'{batch_text}, 1 positive + BM25 negatives of ranks 1-100, input '
      f'`Query: q Document: d` of {args.input_length} tokens, Adafactor lr {args.lr} '
      f'linear decay, float32; `+kl` adds {args.stage2_steps} steps (lr {args.stage2_lr}) of '
      f'KL distillation from the SDE\'s scores (cosine / its training temperature) on its '
      f'train-query top-100. Train seconds include start-up and compilation; pairs/s '
      f'counts the union of both first stages\' top-{args.top_k} pairs, scored once. '
      f'Command: `{command}`.\n\n')
  lines = ['| first stage → reranker | loss | list | stages | size (params) | steps × lists | '
           'train s | '
           'rerank pairs/s | BM25→ nDCG@10 | BM25→ MRR@10 | BM25→ R@100 | DE→ nDCG@10 | '
           'DE→ MRR@10 | DE→ R@100 |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  b, d = first_metrics['bm25'], first_metrics['de']
  lines.append(f'| first stage alone | - | - | - | - | - | - | - | {b["nDCG@10"]:.4f} | '
               f'{b["RR@10"]:.4f} | {b["R@100"]:.4f} | {d["nDCG@10"]:.4f} | '
               f'{d["RR@10"]:.4f} | {d["R@100"]:.4f} |')
  for r in rows:
    row = Row.parse(r['spec'])
    b, d = r['bm25'], r['de']
    name = SCORER_NAME[row.scorer] + (' (encoder from SDE)' if row.from_de else '')
    stages = f'2 ({row.loss} → KL from SDE)' if row.second_stage else '1'
    if row.negatives != 'bm25':
      name += f', {NEGATIVES[row.negatives]} negatives'
    lines.append(f'| {name} | {row.loss} | {row.list_size} | {stages} | '
                 f'{args.size} ({r["params"] / 1e6:.1f}M) | {r["steps"]} × {r["lists_per_step"]} | '
                 f'{r["train_s"]:.0f} | {r["pairs_per_s"]:.0f} | {b["nDCG@10"]:.4f} | '
                 f'{b["RR@10"]:.4f} | {b["R@100"]:.4f} | {d["nDCG@10"]:.4f} | '
                 f'{d["RR@10"]:.4f} | {d["R@100"]:.4f} |')
  table = head + '\n'.join(lines) + '\n'
  if left_out:
    table += (f'\nNot run within --budget_s={args.budget_s:g}: '
              + ', '.join(f'`{s}`' for s in left_out) + '.\n')
  print(table)
  old = open(args.output).read() if os.path.exists(args.output) else '# Benchmarks\n\n'
  with open(args.output, 'w') as f:
    f.write(old.rstrip('\n') + '\n\n' + table)


if __name__ == '__main__':
  main()
