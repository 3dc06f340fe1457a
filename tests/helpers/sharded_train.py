"""A few training steps of a tiny ADE-SPL, for test_partitioning.

usage: sharded_train.py DATA_DIR MODEL_DIR MODEL_PARALLEL [PROCESS_ID NUM_PROCESSES PORT]
Prints `LOSSES [...]` and the sharding of one parameter on process 0.
"""
import json
import os
import sys

import jax


def run(data_dir: str, model_dir: str, model_parallel: int) -> list:
  from t5dual import models, optim, partitioning, t5, trainer, vocab
  from t5dual.data import pipeline, sources
  batcher = pipeline.PairBatcher(sources.load_examples(f'beir:{data_dir}:train'),
                                 vocab.Tokenizer(os.path.join(data_dir, 'spm.model')), 16,
                                 {'inputs': 8, 'targets': 12})
  cfg = models.DualEncoderConfig(
      t5=t5.t5_config('tiny', vocab_size=256, dtype='float32'), architecture='ade_spl',
      projection_dim=16)
  model = models.DualEncoderModel(cfg)
  sched = optim.learning_rate_schedule(1e-2, 4)
  trainer.train(model, batcher, optim.adafactor(sched), model_dir,
                trainer.TrainerConfig(total_steps=4, log_every=1, save_every=2,
                                      progress_bar=False, tensorboard=False), sched,
                partitioner=partitioning.Partitioner(num_partitions=model_parallel))
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


if __name__ == '__main__':
  if len(sys.argv) > 4:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'localhost:{sys.argv[6]}', int(sys.argv[5]), int(sys.argv[4]))
  losses = run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
  if jax.process_index() == 0:
    print('LOSSES', json.dumps(losses))
    print('DEVICES', jax.device_count(), 'PROCESSES', jax.process_count())
