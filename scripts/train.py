#!/usr/bin/env python
"""Train a dual encoder from gin files (same command on CPU, GPU and TPU).

  python scripts/train.py \
    --gin_file=gin/models/sde.gin --gin_file=gin/sizes/base.gin \
    --gin_file=configs/runs/finetune.gin \
    --gin.MODEL_DIR="'/tmp/sde'" --gin.MIXTURE_OR_TASK_NAME="'beir:/data/medquad:train'" \
    --gin.VOCABULARY_PATH="'/path/to/spiece.model'"

Multi-host (GPU clusters, TPU pods): add --multihost (jax.distributed.initialize
reads the coordinator from the environment) and run the same command on every host.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402

from t5dual import gin_utils, train_lib  # noqa: E402


def main(argv):
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's per-file chatter
  files, bindings, _ = gin_utils.parse_flags(
      [a for a in argv if a != '--multihost'])
  if '--multihost' in argv:
    jax.distributed.initialize()
  if not files:
    raise SystemExit('no --gin_file given; see the module docstring')
  gin_utils.parse_gin(files, bindings)
  model_dir = gin.query_parameter('%MODEL_DIR')
  os.makedirs(model_dir, exist_ok=True)
  try:
    result = gin_utils.call_configured(train_lib.run)
  finally:
    if jax.process_index() == 0:
      with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
        f.write(gin.operative_config_str())
  logging.info('finished at step %s: %s', result.get('step'), result)


if __name__ == '__main__':
  main(sys.argv[1:])
