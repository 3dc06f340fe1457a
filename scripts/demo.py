#!/usr/bin/env python
"""The built-in demo: generate a collection, train a tiny SDE with SamToNe, export,
retrieve and report nDCG@10 / MRR@10 / Recall@10 before and after training.

  python scripts/demo.py [--workdir demo_run] [--gin.TRAIN_STEPS=800 ...]

Everything is generated locally (data and SentencePiece vocabulary); nothing is
downloaded. Extra --gin_file / --gin.X flags are applied on top of the demo's.
"""

import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402

from t5dual import evaluation, gin_utils, models, train_lib, vocab  # noqa: E402
from t5dual.data import demo, sources  # noqa: E402

DEMO_GIN = ['gin/models/sde.gin', 'gin/sizes/tiny.gin', 'configs/runs/finetune.gin',
            'configs/demo.gin']
MEASURES = ('nDCG@10', 'RR@10', 'R@10')


def _evaluate(model, params, tokenizer, folder, lengths):
  corpus_ids, corpus_texts = sources.read_beir_corpus(folder)
  qrels = sources.read_qrels(folder, 'test')
  queries = {q: t for q, t in sources.read_beir_queries(folder).items() if q in qrels}
  return evaluation.evaluate_beir(model, params, tokenizer, corpus_ids, corpus_texts,
                                  queries, qrels, lengths['inputs'], lengths['targets'],
                                  measures=MEASURES)


def main(argv):
  logging.basicConfig(level=logging.WARNING)
  workdir = 'demo_run'
  if '--workdir' in argv:
    i = argv.index('--workdir')
    workdir = argv[i + 1]
    argv = argv[:i] + argv[i + 2:]
  files, bindings, _ = gin_utils.parse_flags(argv)
  t0 = time.time()
  shutil.rmtree(workdir, ignore_errors=True)
  data_dir = os.path.join(workdir, 'data')
  counts = demo.write_demo_beir(data_dir, num_docs=1500, num_concepts=150)
  spm_path = vocab.train_sentencepiece(demo.demo_texts(data_dir),
                                       os.path.join(workdir, 'spm'), vocab_size=1024)
  print(f'[demo] generated {counts} in {data_dir}; vocabulary {spm_path}')

  model_dir = os.path.join(workdir, 'model')
  gin_utils.parse_gin(DEMO_GIN + files, [
      f"MODEL_DIR = '{model_dir}'",
      f"MIXTURE_OR_TASK_NAME = 'beir:{data_dir}:train'",
      f"VOCABULARY_PATH = '{spm_path}'"] + bindings)
  # The untrained model: the configured model with the run's initial seed.
  model = gin.get_configurable(models.DualEncoderModel)()
  lengths = gin.query_parameter('%TASK_FEATURE_LENGTHS')
  tokenizer = vocab.Tokenizer(spm_path)
  before = _evaluate(model, model.init_params(jax.random.PRNGKey(0)), tokenizer, data_dir,
                     lengths)

  gin_utils.call_configured(train_lib.run)
  with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
    f.write(gin.operative_config_str())
  # The trained model goes the way of any checkpoint: sharded export of corpus and
  # queries, exact top-k, a TREC run, metrics (scripts/eval.py run does the same).
  summary = evaluation.evaluate_checkpoint_on_beir(
      model_dir, data_dir, 'test', measures=MEASURES,
      export_options=dict(shard_size=500, dtype='float32', progress=False))
  after, step = summary['metrics'], summary['step']

  print(f'\n[demo] test queries of documents unseen in training, full corpus '
        f'({counts["docs"]} docs), SDE + SamToNe, {step} steps:')
  print(f'{"":>18}' + ''.join(f'{m:>10}' for m in MEASURES))
  for name, res in (('before training', before), ('after training', after)):
    print(f'{name:>18}' + ''.join(f'{res[m]:>10.4f}' for m in MEASURES))
  print(f'[demo] done in {time.time() - t0:.0f} s; model in {model_dir}; exports and '
        f'run in {os.path.dirname(summary["run"])}')
  if after['nDCG@10'] <= before['nDCG@10'] + 0.1:
    raise SystemExit('[demo] training did not improve retrieval: something is wrong')


if __name__ == '__main__':
  main(sys.argv[1:])
