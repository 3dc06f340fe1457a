"""Model directories: orbax checkpoints plus a description of the model.

MODEL_DIR/
  model.json            DualEncoderConfig, LossConfig, vocabulary, feature lengths
  config.gin            the operative gin config of the run (written by scripts/train.py)
  checkpoints/<step>/   orbax: items 'params' and 'opt_state' (the step is the directory)
  metrics.jsonl         one line of logged metrics per log step

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from t5dual import models, t5

MODEL_JSON = 'model.json'


# --------------------------------------------------------------------------- model.json

def model_description(model: models.DualEncoderModel, vocab_path: str,
                      feature_lengths: dict) -> dict:
  return {
      'kind': 'dual_encoder',
      'config': dataclasses.asdict(model.config),
      'loss': dataclasses.asdict(model.loss),
      'vocab_path': os.path.abspath(vocab_path) if os.path.exists(vocab_path) else vocab_path,
      'feature_lengths': dict(feature_lengths),
  }


def model_from_description(desc: dict) -> models.DualEncoderModel:
  cfg = dict(desc['config'])
  t5_fields = dict(cfg.pop('t5'))
  t5_fields['mlp_activations'] = tuple(t5_fields['mlp_activations'])
  config = models.DualEncoderConfig(t5=t5.T5Config(**t5_fields), **cfg)
  return models.DualEncoderModel(config, models.LossConfig(**desc.get('loss', {})))


def write_model_json(model_dir: str, desc: dict) -> None:
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, MODEL_JSON)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get('config') != json.loads(json.dumps(desc['config'])):
      raise ValueError(f'{path} describes a different model than this run; use a new '
                       'MODEL_DIR or delete the old one')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(desc, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_model_json(model_dir: str) -> dict:
  path = os.path.join(model_dir, MODEL_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {model_dir} is not a t5dual model directory')
  with open(path) as f:
    return json.load(f)


# --------------------------------------------------------------------------- orbax

def checkpoint_manager(model_dir: str, save_every: int = 1000, keep: int = 3
                       ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(model_dir), 'checkpoints'),
                               options=options, item_names=('params', 'opt_state'))


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)),
      force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
            abstract_opt_state: Optional[Any] = None) -> dict:
  """Restores 'params' (and 'opt_state' when its abstract tree is given) onto their shardings."""
  items = {'params': ocp.args.StandardRestore(abstract_params)}
  if abstract_opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  return manager.restore(step, args=ocp.args.Composite(**items))


def restore_for_inference(model_dir: str, step: Optional[int] = None):
  """(model, params, step, tokenizer, feature_lengths) of a trained model directory.

  `step` defaults to the latest checkpoint.
  """
  from t5dual.vocab import Tokenizer
  desc = read_model_json(model_dir)
  model = model_from_description(desc)
  manager = checkpoint_manager(model_dir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {os.path.join(model_dir, "checkpoints")}')
  if step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint for step {step} in {model_dir}; '
                            f'available: {sorted(manager.all_steps())}')
  abstract = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  params = restore(manager, step, abstract)['params']
  manager.close()
  return model, params, step, Tokenizer(desc['vocab_path']), desc['feature_lengths']
