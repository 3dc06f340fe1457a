"""A run's metrics.jsonl (written by t5dual/trainer.py) read back by the tests that train."""

import json
import os


def metrics_by_step(directory):
  """metrics.jsonl by step; a step logged twice is an error."""
  by_step = {}
  with open(os.path.join(directory, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      assert rec['step'] not in by_step, f'step {rec["step"]} logged twice'
      by_step[rec['step']] = rec
  return by_step
