#!/usr/bin/env python
"""Train a model from gin files (same command on CPU, GPU and TPU).

  python scripts/train.py \
    --gin_file=gin/models/sde.gin --gin_file=gin/sizes/base.gin \
    --gin_file=configs/runs/finetune.gin \
    --gin.MODEL_DIR="'/tmp/sde'" --gin.MIXTURE_OR_TASK_NAME="'beir:/data/medquad:train'" \
    --gin.VOCABULARY_PATH="'/path/to/spiece.model'"

Every --gin.X / --gin_bindings binding must be used by the configuration, and
every setting is checked before anything is written. The run holds
MODEL_DIR/writer.lock while it trains; MODEL_DIR/config.gin keeps the
configuration of the first start, config-<UTC time>.gin that of each later one.
A mistake the user can fix ends with one `error: ...` line (exit status 2).

Multi-stage fine-tuning: add a run file that configures multistage.run_chain,
e.g. --gin_file=configs/runs/two_stage_rerank.gin after the reranker files. The
same command then trains each stage in MODEL_DIR/stages/<i>-<name>/, each from
the previous one's final checkpoint, evaluates each, records them in
MODEL_DIR/stages.json, and, run again, resumes at the right stage and step
(t5dual/multistage.py). The final model is MODEL_DIR/final.

Multi-host (TPU pods, GPU clusters): run the same command on every host, with
--multihost on a TPU VM pod; SLURM steps and --coordinator=HOST:PORT
--num_processes=N --process_id=I need no flag (t5dual/distributed.py;
scripts/launch_tpu_pod.sh and scripts/launch_gpu_slurm.sh do this). Each host
loads the rows of every global batch that its devices hold (hosts sharing a data
shard load the same rows: partitioning.DataLayout); checkpoints are written by all
hosts together into MODEL_DIR, which must be a path all hosts share (gs://, NFS).

SIGTERM (preemption) saves a checkpoint at the next step boundary, the same step on
every host, and ends the run with exit status 75 (preemption.PREEMPTED_EXIT_STATUS):
run the same command again to resume.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5dual import cli, distributed, gin_utils, multistage, train_lib  # noqa: E402


def main(argv):
  multihost_flags, argv = distributed.parse_known_flags(argv)
  files, bindings, _ = gin_utils.parse_flags(argv)
  distributed.initialize_from_flags(multihost_flags)
  if not files:
    raise cli.ConfigError('no --gin_file given; see the usage in scripts/train.py')
  gin_utils.parse_gin(files, bindings)
  # A run file that configures multistage.run_chain (configs/runs/two_stage_rerank.gin)
  # makes this a chain of stages; otherwise it is one train_lib.run.
  chain = gin_utils.is_bound(multistage.run_chain)
  root = multistage.run_chain if chain else train_lib.run
  gin_utils.check_bindings_used(bindings, root)
  result = gin_utils.call_configured(root, run_config=gin_utils.operative_config)
  if not chain:
    shown = ', '.join(f'{k} {v:.4g}' for k, v in result.items() if k != 'step')
    logging.info('finished at step %s: %s', result.get('step'), shown)


if __name__ == '__main__':
  cli.run_main(main)
