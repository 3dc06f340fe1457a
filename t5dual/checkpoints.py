"""Model directories: orbax checkpoints, a description of the model, one writer at a time.

MODEL_DIR/
  model.json            the model's kind and description (model_api.Model.describe),
                        vocabulary, feature lengths
  config.gin            the operative gin config of the first start of the run;
  config-<UTC>.gin      ... and of each later start (resume), kept side by side
  checkpoints/<step>/   orbax: items 'params' and 'opt_state' (the step is the directory)
  metrics.jsonl         one line of logged metrics per log step
  writer.lock           held (flock) by the one process writing the directory

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import tempfile
from typing import Any, Iterator, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5dual import cli, fileio, model_api

log = logging.getLogger(__name__)

MODEL_JSON = 'model.json'
LOCK_FILE = 'writer.lock'
CHECKPOINTS = 'checkpoints'


class ModelDirError(cli.UserError, ValueError):
  """A model directory that cannot be used as it is (ValueError too, for callers that
  report bad input by catching ValueError)."""


# --------------------------------------------------------------------------- model.json

def model_description(model: model_api.Model, vocab_path: str, feature_lengths: dict) -> dict:
  """model.json of `model`: its kind and description, vocabulary and feature lengths."""
  return {
      'kind': model.kind,
      **model.describe(),
      'vocab_path': os.path.abspath(vocab_path) if os.path.exists(vocab_path) else vocab_path,
      'feature_lengths': dict(feature_lengths),
  }


def model_from_description(desc: dict, source: str = MODEL_JSON) -> model_api.Model:
  """The model a model.json describes, of any registered kind (`source` names the file)."""
  return model_api.from_description(desc, source)


def read_model(model_dir: str) -> model_api.Model:
  """The model a directory's model.json describes, without its parameters: what a
  command checks (its capabilities, model_api.require) before it reads anything else."""
  return model_from_description(read_model_json(model_dir),
                                os.path.join(model_dir, MODEL_JSON))


def write_model_json(model_dir: str, desc: dict) -> None:
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, MODEL_JSON)
  if os.path.exists(path):
    old = _read_json(path)
    new = json.loads(json.dumps(desc))
    if (old.get('kind'), old.get('config')) != (new.get('kind'), new.get('config')):
      raise cli.ConfigError(f'{path} describes a different model than this run; use a new '
                            'MODEL_DIR or delete the old one')
  fileio.write_json(path, desc, indent=2, sort_keys=True)


def read_model_json(model_dir: str) -> dict:
  path = os.path.join(model_dir, MODEL_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {model_dir} is not a t5dual model directory')
  return _read_json(path)


def _read_json(path: str) -> dict:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ModelDirError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None


# --------------------------------------------------------------------------- one writer

class ModelDirBusyError(ModelDirError):
  """Another process holds the model directory's writer lock."""


# Locks this process holds: real path of the lock file -> [open file, depth]. The lock
# is re-entrant within a process, so train_lib.run can take it before loading data
# and trainer.train (which direct callers use too) can take it again.
_HELD: dict[str, list] = {}


@contextlib.contextmanager
def exclusive_writer(model_dir: str) -> Iterator[None]:
  """Makes sure `model_dir` is writable and that this process is its only writer.

  Creates MODEL_DIR and MODEL_DIR/checkpoints, takes an exclusive `flock` on
  MODEL_DIR/writer.lock (its content names the holder's host, pid and start
  time) and probes that both directories accept new files, all before any
  work is done. The kernel drops a flock when its process dies, even by
  kill -9, so a lock file left behind by a dead holder never blocks: the next
  run simply takes the lock over.

  In a multi-host run only process 0 writes (metrics, model.json, config.gin;
  orbax coordinates checkpoints itself), so only it takes the lock; the other
  processes learn whether it succeeded, and stop with it if not.

  Raises:
    ModelDirBusyError: another process holds the lock.
    cli.UserError: the directory cannot be created or written.
  """
  held, error = None, None
  if jax.process_index() == 0:
    try:
      held = _acquire(model_dir)
    except cli.UserError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      raise cli.UserError(f'process 0 could not start writing {model_dir} (see its log)')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if held is not None:
      _release(held)


def _acquire(model_dir: str) -> str:
  checkpoint_dir = os.path.join(model_dir, CHECKPOINTS)
  _make_dir(model_dir)
  path = os.path.realpath(os.path.join(model_dir, LOCK_FILE))
  if path in _HELD:
    _HELD[path][1] += 1
    return path
  try:
    f = open(path, 'a+')
  except OSError as e:
    raise cli.UserError(f'cannot write to {model_dir}: {e.strerror}') from None
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip()
    f.close()
    try:
      who = json.loads(holder)
      who = f"host {who['host']}, pid {who['pid']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
      who = 'holder unknown'
    raise ModelDirBusyError(f'{model_dir} is being written by another run ({who}); lock '
                            f'file {path}. Wait for that run to end or stop it.') from None
  except OSError as e:  # e.g. a network filesystem without flock support
    log.warning('cannot lock %s (%s): nothing stops a second run from writing %s too',
                path, e.strerror, model_dir)
  f.seek(0)
  f.truncate()
  f.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                      'started': _utc_now().isoformat(timespec='seconds')}) + '\n')
  f.flush()
  _HELD[path] = [f, 1]
  try:
    _make_dir(checkpoint_dir)
    for directory in (model_dir, checkpoint_dir):
      _probe_writable(directory)
  except BaseException:
    _release(path)
    raise
  return path


def _release(path: str) -> None:
  entry = _HELD[path]
  entry[1] -= 1
  if entry[1] == 0:
    del _HELD[path]
    f = entry[0]
    # An empty lock file means "no holder"; the file itself stays, since deleting
    # it could let a waiting process lock a file that is no longer the lock.
    f.truncate(0)
    f.close()  # closing releases the flock


def _make_dir(directory: str) -> None:
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise cli.UserError(f'{directory} exists and is not a directory')
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise cli.UserError(f'cannot create {directory}: {e.strerror}') from None


def _probe_writable(directory: str) -> None:
  """Writes and removes a small file: permissions, read-only mounts and full disks show here."""
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix='.write-test-') as f:
      f.write(b'\0' * 4096)
      f.flush()
  except OSError as e:
    raise cli.UserError(f'cannot write to {directory}: {e.strerror}') from None


def _utc_now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def keep_run_config(model_dir: str, text: str) -> str:
  """Writes the config of this run start: config.gin, or config-<UTC time>.gin after
  the first start, so no start's config is ever overwritten. Returns the path."""
  path = os.path.join(model_dir, 'config.gin')
  if os.path.exists(path):
    stamp = _utc_now().strftime('%Y%m%dT%H%M%SZ')
    path = os.path.join(model_dir, f'config-{stamp}.gin')
    n = 1
    while os.path.exists(path):  # two starts within one second
      path = os.path.join(model_dir, f'config-{stamp}-{n}.gin')
      n += 1
  with fileio.atomic_write(path) as f:
    f.write(text)
  return path


# --------------------------------------------------------------------------- orbax

def checkpoint_manager(model_dir: str, save_every: int = 1000, keep: int = 3
                       ) -> ocp.CheckpointManager:
  # Orbax's default policy also saves the first step of a run with no checkpoint
  # yet (InitialSavePolicy): that wrote checkpoint 1 after one update, before any
  # loss had been checked. Here a checkpoint is due only every `save_every`
  # steps or on preemption; the trainer forces the last step.
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(save_every),
          policies.PreemptionCheckpointingPolicy()]))
  return ocp.CheckpointManager(os.path.join(os.path.abspath(model_dir), CHECKPOINTS),
                               options=options, item_names=('params', 'opt_state'))


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)),
      force=force)


class DamagedCheckpointError(ModelDirError):
  """A checkpoint that orbax cannot read back (truncated, partly deleted, ...)."""


def restore(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
            abstract_opt_state: Optional[Any] = None) -> dict:
  """Restores 'params' (and 'opt_state' when its abstract tree is given) onto their shardings.

  Raises:
    DamagedCheckpointError: the checkpoint cannot be read; the message names the
      step, its directory and the other steps that exist.
  """
  items = {'params': ocp.args.StandardRestore(abstract_params)}
  if abstract_opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax/tensorstore raise anything from KeyError to bare Exception
    if isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e):
      raise  # out of memory is not damage
    path = os.path.join(str(manager.directory), str(step))
    others = sorted(s for s in manager.all_steps() if s != step)
    reason = (str(e).strip().splitlines() or [''])[0][:160]
    hint = (f'earlier steps: {", ".join(map(str, others))}; move {path} away to use '
            f'step {others[-1]}' if others else 'no other step exists')
    raise DamagedCheckpointError(
        f'checkpoint step {step} in {path} is damaged or incomplete '
        f'({type(e).__name__}: {reason}); {hint}') from e


class RestoredModel(NamedTuple):
  """What `restore_for_inference` reads from a model directory.

  model: the model `model.json` describes (model_api.Model).
  params: its parameters at `step`, laid out as `restore_params` lays them out.
  step: the checkpoint's training step.
  tokenizer: the vocabulary the model was trained with (vocab.Tokenizer).
  feature_lengths: the training run's sequence lengths per feature, e.g.
    {'inputs': 64, 'targets': 256} for a dual encoder, {'inputs': 512} for a reranker.
  """
  model: Any
  params: Any
  step: int
  tokenizer: Any
  feature_lengths: dict[str, int]


def restore_for_inference(model_dir: str, step: Optional[int] = None, partitioner=None,
                          shardings: Optional[Any] = None) -> RestoredModel:
  """The model, parameters, step, tokenizer and feature lengths of a trained model directory.

  The parameters as `restore_params` restores them.
  """
  from t5dual.vocab import Tokenizer
  desc = read_model_json(model_dir)
  model, params, step = restore_params(model_dir, step, partitioner, shardings)
  return RestoredModel(model=model, params=params, step=step,
                       tokenizer=Tokenizer(desc['vocab_path']),
                       feature_lengths=desc['feature_lengths'])


def restore_params(model_dir: str, step: Optional[int] = None, partitioner=None,
                   shardings: Optional[Any] = None):
  """(model, params, step) of a model directory, without its vocabulary.

  `step` defaults to the latest checkpoint. The parameters are restored straight
  into their layout: `shardings` (a tree of jax.sharding.Sharding like the
  params, e.g. trainer.StateLayout.param_shardings) when given, else their
  layout on `partitioner` (default: replicated over this process's devices,
  `partitioning.local_data_parallel`). Orbax then reads each device's slice
  only, so each host of a multi-host job reads its own slices, without a
  second copy, and no device holds more of a parameter than its layout gives it.
  """
  from t5dual import partitioning
  desc = read_model_json(model_dir)
  model = model_from_description(desc, os.path.join(model_dir, MODEL_JSON))
  partitioner = partitioner or partitioning.local_data_parallel()
  manager = checkpoint_manager(model_dir)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {os.path.join(model_dir, CHECKPOINTS)}')
    if step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {step} in {model_dir}; '
                              f'available: {sorted(manager.all_steps())}')
    shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    if shardings is None:
      shardings = partitioner.for_model(model).param_shardings(model.logical_axes(), shapes)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, shardings)
    params = restore(manager, step, abstract)['params']
  finally:
    manager.close()
  return model, params, step


# --------------------------------------------------------------------------- chains

# A multi-stage chain's directory (multistage.py): its record of stages, and the link
# to its final model, which stands for the chain wherever a model directory is read.
CHAIN_RECORD = 'stages.json'
CHAIN_FINAL = 'final'


def resolve_model_dir(model_dir: str) -> str:
  """`model_dir`, or for a chain's MODEL_DIR (stages.json, no model.json) its final
  model MODEL_DIR/final, with a log line saying so.

  Raises cli.UserError for a chain whose last stage is not complete, naming the
  stage directories that hold a trained model.
  """
  if (os.path.exists(os.path.join(model_dir, MODEL_JSON)) or
      not os.path.exists(os.path.join(model_dir, CHAIN_RECORD))):
    return model_dir
  final = os.path.join(model_dir, CHAIN_FINAL)
  if os.path.exists(os.path.join(final, MODEL_JSON)):
    target = os.readlink(final) if os.path.islink(final) else CHAIN_FINAL
    log.info('%s is a chain of stages: using its final model %s (-> %s)', model_dir, final,
             target)
    return final
  record = read_chain_record(model_dir)
  trained = [os.path.join(model_dir, e['dir']) for e in record['stages']
             if e.get('status') in ('trained', 'complete')]
  raise cli.UserError(f'{model_dir} is a chain of stages whose last stage is not complete '
                      f'(no {final} yet); ' + (
                          f'give a stage directory: {", ".join(trained)}' if trained else
                          'no stage is trained yet'))


def read_chain_record(model_dir: str) -> dict:
  """A chain's record of stages (multistage.py); an empty one when it has none yet."""
  path = os.path.join(model_dir, CHAIN_RECORD)
  if not os.path.exists(path):
    return {'final_model_dir': None, 'stages': []}
  with open(path) as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise ModelDirError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None
  if not isinstance(record, dict) or not isinstance(record.get('stages'), list):
    raise ModelDirError(f'{path}: not a record of stages (no "stages" list)')
  return record
