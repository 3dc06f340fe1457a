"""Training end to end on generated data: learning, resuming, failure modes, gin entry point."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from t5dual import checkpoints, dual_encoders, optim, t5, trainer, vocab
from t5dual.data import pipeline, sources, tasks
import tolerances  # tests/helpers
from metrics_log import metrics_by_step  # tests/helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {'inputs': 12, 'targets': 16}
# Every test here trains (in process or in a subprocess) for more than a handful of steps.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def demo_data(demo_beir):
  return demo_beir(400, 60, 512)


def _setup(demo_data, arch='sde', loss='samtone', batch_size=32):
  data, spm = demo_data
  tok = vocab.Tokenizer(spm)
  batcher = pipeline.PairBatcher(sources.load_examples(f'beir:{data}:train'), tok,
                                 batch_size, LENGTHS)
  cfg = dual_encoders.DualEncoderConfig(t5=t5.t5_config('tiny', vocab_size=512, dtype='float32'),
                                 architecture=arch, projection_dim=32)
  return dual_encoders.DualEncoderModel(cfg, dual_encoders.LossConfig(name=loss)), batcher


def _logged_steps(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f]


def _train(model, batcher, model_dir, steps, lr=1e-2, description=None, **cfg):
  sched = optim.learning_rate_schedule(lr, steps)
  config = trainer.TrainerConfig(total_steps=steps, progress_bar=False, tensorboard=False,
                                 **cfg)
  return trainer.train(model, batcher, optim.adafactor(sched), model_dir, config, sched,
                       description, batch_spec=batcher.batch_spec())


@pytest.mark.parametrize('arch,loss', [('sde', 'samtone'), ('ade_spl', 'pair')])
def test_training_lowers_loss_and_raises_p_at_1(demo_data, tmp_path, arch, loss):
  model, batcher = _setup(demo_data, arch, loss)
  _train(model, batcher, str(tmp_path), 150, log_every=25, save_every=1000)
  m = metrics_by_step(str(tmp_path))
  first, last = m[25], m[150]
  assert last['loss'] < 0.5 * first['loss']
  assert last['p_at_1'] > first['p_at_1'] + 0.3


class _Interrupt(Exception):
  pass


class _InterruptingBatcher:
  def __init__(self, batcher, at_step):
    self.batcher, self.at_step = batcher, at_step

  def batch(self, step, *args):
    if step == self.at_step:
      raise _Interrupt()
    return self.batcher.batch(step, *args)

  def batch_spec(self):
    return self.batcher.batch_spec()


def test_resume_reproduces_uninterrupted_run(demo_data, tmp_path):
  model, batcher = _setup(demo_data, batch_size=16)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  _train(model, batcher, straight, 12, log_every=1, save_every=4)
  with pytest.raises(_Interrupt):
    _train(model, _InterruptingBatcher(batcher, 7), resumed, 12, log_every=1, save_every=4)
  assert max(checkpoints.checkpoint_manager(resumed).all_steps()) == 4
  assert _logged_steps(resumed) == list(range(1, 8))  # steps 5..7 past the checkpoint
  _train(model, batcher, resumed, 12, log_every=1, save_every=4)
  # The resumed run dropped the lines of steps 5..7 before logging them again.
  assert _logged_steps(straight) == _logged_steps(resumed) == list(range(1, 13))
  a, b = metrics_by_step(straight), metrics_by_step(resumed)
  for step in a:
    # Two float32 runs: logits up to 1 / temperature = 100 through 2 layers (4 residual blocks),
    # head and loss (widest reduction the 128-wide MLP); each of the 12 steps adds a rounding to
    # the weights.
    tolerances.assert_close(b[step]['loss'], a[step]['loss'], magnitude=100, depth=6 + 12,
                            width=128, both_sides=True, err_msg=f'step {step}')


def test_grad_cache_trains_as_the_full_batch(demo_data, tmp_path):
  """GradCache through the trainer: the same losses and parameters as the whole batch at once
  (without dropout, whose masks would differ), step after step."""
  data, spm = demo_data
  batcher = pipeline.PairBatcher(sources.load_examples(f'beir:{data}:train'),
                                 vocab.Tokenizer(spm), 16, LENGTHS)
  cfg = dual_encoders.DualEncoderConfig(
      t5=t5.t5_config('tiny', vocab_size=512, dtype='float32', dropout_rate=0.0),
      architecture='sde', projection_dim=32)
  model = dual_encoders.DualEncoderModel(cfg, dual_encoders.LossConfig(name='samtone'))
  desc = checkpoints.model_description(model, spm, LENGTHS)
  full, cached = str(tmp_path / 'full'), str(tmp_path / 'cached')
  _train(model, batcher, full, 4, description=desc, log_every=1, save_every=4)
  _train(model, batcher, cached, 4, description=desc, log_every=1, save_every=4,
         grad_strategy='grad_cache', num_microbatches=4)
  a, b = metrics_by_step(full), metrics_by_step(cached)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    # As for resuming: two float32 runs, logits up to 100 through 2 layers, head and loss.
    tolerances.assert_close(b[step]['loss'], a[step]['loss'], magnitude=100, depth=6 + 4,
                            width=128, both_sides=True, err_msg=f'step {step}')
  (_, pa), (_, pb) = _all_params(full), _all_params(cached)
  for x, y in zip(pa, pb):
    # Adafactor divides each gradient by its running RMS, so the gradients' relative
    # rounding error reaches the updates (at most the learning rate, 1e-2, each) as a
    # relative one, and each of the 4 steps rounds the parameters once more.
    tolerances.assert_close(y, x, magnitude=np.max(np.abs(x)), depth=6 + 4, width=128,
                            both_sides=True)


def _all_params(model_dir):
  import jax
  restored = checkpoints.restore_for_inference(model_dir)
  return restored.step, [np.asarray(x) for x in jax.tree.leaves(restored.params)]


def test_exploding_learning_rate_saves_nothing_past_the_last_good_step(demo_data, tmp_path):
  model, batcher = _setup(demo_data, batch_size=16)
  desc = checkpoints.model_description(model, demo_data[1], LENGTHS)
  # From scratch: with lr 1e9 step 1 multiplies the parameters by ~1e9 (still finite)
  # and step 2's gradients are NaN. Orbax's default policy used to save step 1.
  fresh = str(tmp_path / 'fresh')
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'at step 2 .*; .*fresh has no checkpoint'):
    _train(model, batcher, fresh, 6, lr=1e9, description=desc, log_every=3, save_every=2)
  assert checkpoints.checkpoint_manager(fresh).all_steps() == []
  # After a good start the error names the good checkpoint, which stays as it was.
  run = str(tmp_path / 'run')
  _train(model, batcher, run, 2, description=desc, save_every=2)
  step, good = _all_params(run)
  assert step == 2 and all(np.isfinite(x).all() for x in good)
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'at step 4 .*the last good checkpoint is step 2 in'):
    _train(model, batcher, run, 6, lr=1e9, log_every=1, save_every=2)
  assert sorted(checkpoints.checkpoint_manager(run).all_steps()) == [2]
  step, kept = _all_params(run)
  assert step == 2
  for a, b in zip(good, kept):
    np.testing.assert_array_equal(a, b)


def _train_cmd(model_dir, data, spm, steps):
  return [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
          '--gin_file=gin/models/sde.gin', '--gin_file=gin/sizes/tiny.gin',
          '--gin_file=configs/runs/finetune.gin', '--gin_file=configs/demo.gin',
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.MIXTURE_OR_TASK_NAME='beir:{data}:train'",
          f"--gin.VOCABULARY_PATH='{spm}'", f'--gin.TRAIN_STEPS={steps}',
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 12, 'targets': 16}", '--gin.VOCAB_SIZE=512',
          '--gin.BATCH_SIZE=16', '--gin.trainer.TrainerConfig.save_every=5',
          '--gin.trainer.TrainerConfig.log_every=1']


@pytest.mark.multiprocess
def test_gin_train_script_survives_kill_9(demo_data, tmp_path):
  data, spm = demo_data
  model_dir = str(tmp_path / 'run')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(_train_cmd(model_dir, data, spm, 400), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(model_dir, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline:
    steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if os.path.isdir(ckpt) else []
    if max(steps, default=0) >= 10:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = checkpoints.checkpoint_manager(model_dir).latest_step()
  assert killed_at is not None and killed_at >= 10
  total = killed_at + 5
  resumed = subprocess.run(_train_cmd(model_dir, data, spm, total), cwd=REPO, env=env,
                           check=True, capture_output=True)
  assert checkpoints.checkpoint_manager(model_dir).latest_step() == total
  # The killed run may have logged steps past its last checkpoint; the resumed run
  # dropped them before logging them again, so each step appears once.
  assert _logged_steps(model_dir) == list(range(1, total + 1))
  log = resumed.stderr.decode()
  assert f"training sde dual encoder on beir:{data}:train" in log
  assert f'resuming from {model_dir} at step {killed_at}' in log
  assert f'finished at step {total}' in log
  # config.gin is the first start's (400 steps), the resumed start has its own copy.
  configs = sorted(f for f in os.listdir(model_dir) if f.startswith('config'))
  assert len(configs) == 2 and configs[0].startswith('config-'), configs
  with open(os.path.join(model_dir, 'config.gin')) as f:
    first = f.read()
  with open(os.path.join(model_dir, configs[0])) as f:
    second = f.read()
  assert "architecture = 'sde'" in first and 'TRAIN_STEPS = 400' in first
  assert f'TRAIN_STEPS = {total}' in second


def test_train_lib_on_a_seqio_task_module(demo_data, tmp_path, monkeypatch):
  pytest.importorskip('t5dual.data.seqio_tasks', reason='seqio extra not installed')
  from t5dual import train_lib
  data, spm = demo_data
  (tmp_path / 'my_tasks.py').write_text(
      'from t5dual.data import seqio_tasks\n'
      f"seqio_tasks.register_pair_task('my_demo_task', 'beir:{data}:train', '{spm}')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  model, _ = _setup(demo_data)
  result = train_lib.run(
      str(tmp_path / 'run'), model, 'my_demo_task', spm, task=tasks.PairTask(), batch_size=8,
      task_feature_lengths=LENGTHS, train_steps=3, mixture_or_task_module='my_tasks',
      trainer_config=trainer.TrainerConfig(log_every=1, progress_bar=False,
                                           tensorboard=False))
  assert result['step'] == 3 and np.isfinite(result['loss'])
  assert sorted(metrics_by_step(str(tmp_path / 'run'))) == [1, 2, 3]
