"""Training scenarios run the way a pod runs them, for test_pod_shapes.

usage: pod_job.py DATA_DIR OUT_DIR SCENARIOS MESH [STEPS]
  SCENARIOS  comma-separated names of SCENARIOS below, run in this one process start
             (each trains in OUT_DIR/<name>)
  MESH       JSON keyword arguments of partitioning.Partitioner, e.g. '{"num_partitions": 4}'
  STEPS      optimizer steps of each scenario (default 4; a checkpoint every 2)

A multi-host job takes its layout from the T5DUAL_* variables (t5dual/distributed.py), as
the scripts do; the same command on one process over as many devices is the reference.
POD_JOB_BATCH_SECONDS=s makes every batch take s seconds more (time for a test to kill or
signal the job mid-run). Every process prints `LAYOUT <process> <shard> <shards>`; each
scenario ends with `DONE <name>` on process 0; a preempted run prints `PREEMPTED <step>` on
every process and exits with the status cli.run_main gives it.
"""
import json
import os
import sys
import time

import jax
import numpy as np

EMBED = 32
BATCH = 16


def t5_config():
  from t5dual import t5
  # Every split dimension divides by 8: vocab 256, heads 8, joined_kv 48, mlp 64, embed 32.
  return t5.T5Config(vocab_size=256, emb_dim=EMBED, num_heads=8, head_dim=6, mlp_dim=64,
                     num_layers=1, relative_attention_num_buckets=8, dtype='float32')


def hf_config_kwargs():
  """A transformers.T5Config of `t5_config()`'s shape (the test writes an HF folder so)."""
  return dict(vocab_size=256, d_model=EMBED, d_kv=6, d_ff=64, num_layers=1, num_heads=8,
              relative_attention_num_buckets=8, feed_forward_proj='gated-gelu')


class SlowBatcher:
  """A batcher that takes `seconds` longer per batch (and is otherwise the same)."""

  def __init__(self, batcher, seconds):
    self.batcher, self.seconds = batcher, seconds

  def batch(self, step, shard_index=0, num_shards=1):
    time.sleep(self.seconds)
    return self.batcher.batch(step, shard_index, num_shards)

  def batch_spec(self):
    return self.batcher.batch_spec()


def pair_batcher(data_dir):
  from t5dual import vocab
  from t5dual.data import pipeline, sources
  return pipeline.PairBatcher(sources.load_examples(f'beir:{data_dir}:train'),
                              vocab.Tokenizer(os.path.join(data_dir, 'spm.model')), BATCH,
                              {'inputs': 8, 'targets': 12})


def first_stage_run(data_dir):
  """A fixed pseudo-random depth-20 'run' over the demo corpus: {query: [(doc, score)]}."""
  from t5dual.data import sources
  doc_ids, _ = sources.read_beir_corpus(data_dir)
  qrels = sources.read_qrels(data_dir, 'train')
  rng = np.random.default_rng(0)
  return {q: [(doc_ids[i], -float(r)) for r, i in enumerate(rng.permutation(len(doc_ids))[:20])]
          for q in qrels}


def list_batcher(data_dir):
  """Lists of 4 from first_stage_run."""
  from t5dual import vocab
  from t5dual.data import lists, sources
  doc_ids, documents = sources.read_beir_corpus(data_dir)
  queries = sources.read_beir_queries(data_dir)
  qrels = sources.read_qrels(data_dir, 'train')
  training = lists.build_lists({q: queries[q] for q in qrels}, list(doc_ids), list(documents),
                               qrels, first_stage_run(data_dir))
  return lists.ListBatcher(training, vocab.Tokenizer(os.path.join(data_dir, 'spm.model')), 8,
                           list_size=4, input_length=48)


def prepare_store(data_dir, out_dir):
  """The prepared store (data/store.py) of pair_batcher's pairs and list_batcher's lists,
  for the *_store scenarios (given to the job in POD_JOB_STORE); made once, beforehand."""
  from t5dual import vocab
  from t5dual.data import store
  run_path = os.path.join(out_dir, 'run.trec')
  with open(run_path, 'w') as f:
    for q, ranked in first_stage_run(data_dir).items():
      f.writelines(f'{q} Q0 {d} {r} {s} pod\n' for r, (d, s) in enumerate(ranked, 1))
  folder = os.path.join(out_dir, 'store')
  store.prepare(f'beir:{data_dir}:train', folder,
                vocab.Tokenizer(os.path.join(data_dir, 'spm.model')), max_length=47,
                shard_size=64, lists=store.ListOptions(run_path, max_rank=100))
  return folder


def store_batcher(data_dir, lists):
  """pair_batcher's or list_batcher's batches, read from POD_JOB_STORE."""
  from t5dual import vocab
  from t5dual.data import store, store_batchers
  tokenizer = vocab.Tokenizer(os.path.join(data_dir, 'spm.model'))
  prepared = store.Store(os.environ['POD_JOB_STORE'], tokenizer)
  if lists:
    return store_batchers.StoreListBatcher(prepared, tokenizer, 8, list_size=4, input_length=48)
  return store_batchers.StorePairBatcher(prepared, BATCH, {'inputs': 8, 'targets': 12})


def dual_encoder(architecture='sde'):
  from t5dual import dual_encoders
  return dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=t5_config(), architecture=architecture, projection_dim=16),
      dual_encoders.LossConfig('samtone'))


def encdec_reranker():
  from t5dual import ranking_losses, rerankers
  return rerankers.RerankerModel(
      rerankers.RerankerConfig(t5=t5_config(), scorer='encdec', scoring_token_id=250,
                               yes_token_id=251, no_token_id=252, input_length=48),
      ranking_losses.softmax_loss)


def initial_params(path, model, layout):
  from t5dual.interop import load_initial_params
  return load_initial_params(path, model, layout.param_shardings)


def fixture_model(path):
  from t5dual import dual_encoders
  from t5dual.interop import t5x
  _, config, _ = t5x.load_dual_encoder(path, dtype='float32')
  return dual_encoders.DualEncoderModel(config, dual_encoders.LossConfig('samtone'))


# name -> (model, batcher, TrainerConfig overrides, initial checkpoint: None, a path (given
# to the job in the variable POD_JOB_<NAME>), or another scenario whose directory it is).
def scenarios(data_dir, out_dir):
  env = lambda name: os.environ.get(f'POD_JOB_{name.upper()}')
  return {
      'sde': lambda: (dual_encoder(), pair_batcher(data_dir), {}, None),
      'ade_spl_gradcache': lambda: (dual_encoder('ade_spl'), pair_batcher(data_dir),
                                    dict(grad_strategy='grad_cache', num_microbatches=2), None),
      'encdec_accumulate': lambda: (encdec_reranker(), list_batcher(data_dir),
                                    dict(grad_strategy='accumulate', num_microbatches=2), None),
      'sde_store': lambda: (dual_encoder(), store_batcher(data_dir, lists=False), {}, None),
      'encdec_store': lambda: (encdec_reranker(), store_batcher(data_dir, lists=True),
                               dict(grad_strategy='accumulate', num_microbatches=2), None),
      'from_t5dual_dir': lambda: (dual_encoder(), pair_batcher(data_dir), {},
                                  os.path.join(out_dir, 'sde')),
      'from_hf': lambda: (dual_encoder(), pair_batcher(data_dir), {}, env('from_hf')),
      'from_t5x': lambda: (fixture_model(env('from_t5x')), pair_batcher(data_dir), {},
                           env('from_t5x')),
  }


def run_scenario(name, data_dir, out_dir, partitioner, steps):
  from t5dual import checkpoints, optim, trainer
  model, batcher, overrides, initial = scenarios(data_dir, out_dir)[name]()
  lengths = getattr(batcher, 'feature_lengths', {'inputs': 48})
  delay = float(os.environ.get('POD_JOB_BATCH_SECONDS', 0))
  if delay:
    batcher = SlowBatcher(batcher, delay)
  schedule = optim.learning_rate_schedule(1e-2, steps)
  optimizer = optim.adafactor(schedule, min_dim_size_to_factor=8)
  params = None
  if initial is not None:
    layout = trainer.state_layout(model, optimizer, partitioner)
    params = initial_params(initial, model, layout)
  model_dir = os.path.join(out_dir, name)
  trainer.train(model, batcher, optimizer, model_dir,
                trainer.TrainerConfig(total_steps=steps, log_every=1, save_every=2,
                                      progress_bar=False, tensorboard=False, **overrides),
                schedule, checkpoints.model_description(
                    model, os.path.join(data_dir, 'spm.model'), lengths),
                initial_params=params, partitioner=partitioner,
                batch_spec=batcher.batch_spec())


def main(argv):
  from t5dual import cli, distributed, partitioning, preemption
  cli.setup_logging()  # the trainer's INFO lines ('resuming from ...') as the scripts show them
  distributed.initialize(distributed.detect())
  data_dir, out_dir, names, mesh = argv[:4]
  steps = int(argv[4]) if len(argv) > 4 else 4
  partitioner = partitioning.Partitioner(**json.loads(mesh))
  layout = partitioner.data_layout
  print('LAYOUT', jax.process_index(), layout.shard_index, layout.num_shards, flush=True)
  for name in names.split(','):
    try:
      run_scenario(name, data_dir, out_dir, partitioner, steps)
    except preemption.PreemptedError as e:
      print('PREEMPTED', str(e).split()[3], flush=True)
      return e.exit_status
    if jax.process_index() == 0:
      print('DONE', name, flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
