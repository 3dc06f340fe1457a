"""A few training steps of a tiny ADE-SPL, for test_partitioning.

usage: sharded_train.py DATA_DIR MODEL_DIR MODEL_PARALLEL [EXPORT_DIR]
A multi-host run takes its layout from the T5DUAL_* variables
(t5dual/distributed.py), as the scripts do. With EXPORT_DIR, every process then
exports its shards of the corpus' document vectors from the checkpoint the
job wrote, and checks `distributed.gather_rows`. Process 0 prints
`LOSSES [...]`, the device and process counts, and `MANIFEST {...}`.
"""
import json
import os
import sys

import jax
import numpy as np


def run(data_dir: str, model_dir: str, model_parallel: int) -> list:
  from t5dual import checkpoints, dual_encoders, optim, partitioning, t5, trainer, vocab
  from t5dual.data import pipeline, sources
  spm, lengths = os.path.join(data_dir, 'spm.model'), {'inputs': 8, 'targets': 12}
  batcher = pipeline.PairBatcher(sources.load_examples(f'beir:{data_dir}:train'),
                                 vocab.Tokenizer(spm), 16, lengths)
  cfg = dual_encoders.DualEncoderConfig(
      t5=t5.t5_config('tiny', vocab_size=256, dtype='float32'), architecture='ade_spl',
      projection_dim=16)
  model = dual_encoders.DualEncoderModel(cfg)
  sched = optim.learning_rate_schedule(1e-2, 4)
  trainer.train(model, batcher, optim.adafactor(sched), model_dir,
                trainer.TrainerConfig(total_steps=4, log_every=1, save_every=2,
                                      progress_bar=False, tensorboard=False), sched,
                model_description=checkpoints.model_description(model, spm, lengths),
                partitioner=partitioning.Partitioner(num_partitions=model_parallel),
                batch_spec=batcher.batch_spec())
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


EXPORT_SHARD_SIZE = 64  # 200 documents: 4 shards, two per process


def export_documents(data_dir: str, model_dir: str, export_dir: str):
  """This process's shards of the document vectors; the manifest once all are written."""
  from t5dual import checkpoints, encoding, export
  from t5dual.data import sources
  ids, texts = sources.read_beir_corpus(data_dir)
  restored = checkpoints.restore_for_inference(model_dir)
  options = export.ExportOptions(max_length=restored.feature_lengths['targets'],
                                 side='document', batch_size=8, shard_size=EXPORT_SHARD_SIZE,
                                 dtype='float32', progress=False)
  return export.export_embeddings(
      encoding.make_encode_fn(restored.model, restored.params, 'document'), restored.tokenizer,
      ids, texts, export_dir, options, step=restored.step)


def check_gather():
  """distributed.gather_rows puts every process's share of 7 rows back in order."""
  from t5dual import distributed
  rows = distributed.process_rows(7)
  local = np.stack([np.arange(rows.start, rows.stop), -np.arange(rows.start, rows.stop)], 1)
  gathered = distributed.gather_rows(local.reshape(-1, 2), 7)
  return gathered.tolist() == [[i, -i] for i in range(7)]


if __name__ == '__main__':
  from t5dual import distributed
  distributed.initialize(distributed.detect())
  data_dir, model_dir, model_parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
  losses = run(data_dir, model_dir, model_parallel)
  manifest = gathered = None
  if len(sys.argv) > 4:
    manifest = export_documents(data_dir, model_dir, sys.argv[4])
    gathered = check_gather()
  if jax.process_index() == 0:
    print('LOSSES', json.dumps(losses))
    print('DEVICES', jax.device_count(), 'PROCESSES', jax.process_count())
    if manifest is not None:
      print('MANIFEST', json.dumps(manifest))
      print('GATHER', 'ok' if gathered else 'wrong')
  sys.stdout.flush()
