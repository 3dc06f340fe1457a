"""What stops a training run from doing harm or misleading: gin bindings nobody uses,
settings that cannot work, a second writer on one model directory, an unwritable
directory, damaged checkpoints; config.gin of every start; one-line errors of
scripts/train.py; and the model contract (declared metrics, rebuilding by kind)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from t5dual import (checkpoints, cli, gin_utils, model_api, dual_encoders, partitioning, t5, train_lib,
                    trainer)
from t5dual.data import tasks
import cli_output  # tests/helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {'inputs': 12, 'targets': 16}
GIN_FILES = ['gin/models/sde.gin', 'gin/sizes/tiny.gin', 'configs/runs/finetune.gin']


@pytest.fixture(scope='module')
def demo_data(demo_beir):
  return demo_beir(200, 40, 512)


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _model():
  cfg = dual_encoders.DualEncoderConfig(t5=t5.t5_config('tiny', vocab_size=512, dtype='float32'),
                                 projection_dim=16)
  return dual_encoders.DualEncoderModel(cfg)


def _run(model_dir, demo_data, steps, **kw):
  data, spm = demo_data
  kw.setdefault('trainer_config', trainer.TrainerConfig(
      log_every=1, save_every=2, progress_bar=False, tensorboard=False))
  kw.setdefault('task_feature_lengths', LENGTHS)
  kw.setdefault('learning_rate', 1e-2)
  kw.setdefault('task', tasks.PairTask())
  return train_lib.run(model_dir, kw.pop('model', _model()),
                       kw.pop('source', f'beir:{data}:train'), kw.pop('vocab', spm),
                       batch_size=8, train_steps=steps, **kw)


# --------------------------------------------------------------------------- gin bindings

def _parse(*bindings):
  required = ["MODEL_DIR = '/nonexistent/run'", "MIXTURE_OR_TASK_NAME = 'beir:/nonexistent'"]
  gin_utils.parse_gin(GIN_FILES, required + list(bindings))
  return list(bindings)


def test_bindings_that_are_used_pass(clean_gin):
  gin_utils.check_bindings_used(
      _parse('TRAIN_STEPS = 5', 'trainer.TrainerConfig.save_every = 5',
             'dual_encoders.LossConfig.temperature = 0.05'), train_lib.run)


@pytest.mark.parametrize('binding,message', [
    ('TRAIN_STEPSS = 5', r'`TRAIN_STEPSS = 5`: nothing .* uses TRAIN_STEPSS '
                         r'\(did you mean TRAIN_STEPS\?\)'),
    # A scope that is never entered: the binding would be ignored.
    ('eval/trainer.TrainerConfig.log_every = 5',
     r'uses eval/trainer.TrainerConfig \(did you mean trainer.TrainerConfig\?\)'),
    ('train_lib.run.batch_size = %BATCH_SIZZE',
     r'macro %BATCH_SIZZE \(used by train_lib.run\) is never defined; did you mean BATCH_SIZE'),
])
def test_unused_bindings_are_refused_naming_the_nearest_name(clean_gin, binding, message):
  bindings = _parse(binding)
  with pytest.raises(cli.ConfigError, match=message):
    gin_utils.check_bindings_used(bindings, train_lib.run)


def test_a_required_macro_left_unset_is_named(clean_gin):
  gin_utils.parse_gin(GIN_FILES, ["MIXTURE_OR_TASK_NAME = 'x'"])
  with pytest.raises(cli.ConfigError, match=r'^MODEL_DIR must be set'):
    gin_utils.check_bindings_used([], train_lib.run)


def test_gin_typos_suggest_the_known_name(clean_gin):
  with pytest.raises(cli.ConfigError, match=r'did you mean trainer.TrainerConfig\?') as e:
    gin_utils.parse_gin(GIN_FILES, ['trainer.TrainerConfg.save_every = 2'])
  assert '\n' not in str(e.value)
  with pytest.raises(cli.ConfigError, match=r'did you mean save_every'):
    gin_utils.parse_gin(GIN_FILES, ['trainer.TrainerConfig.save_everyy = 2'])


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize('binding,message', [
    ('BATCH_SIZE = 0', r'^BATCH_SIZE \(train_lib.run.batch_size\): must be a positive integer, '
                       r'got 0$'),
    ('BATCH_SIZE = -4', r'^BATCH_SIZE \(train_lib.run.batch_size\): .* got -4$'),
    ('TRAIN_STEPS = 0', r'^TRAIN_STEPS \(train_lib.run.train_steps\): '),
    ('LEARNING_RATE = -0.1', r'^LEARNING_RATE \(train_lib.run.learning_rate\): '),
    ("TASK_FEATURE_LENGTHS = {'inputs': 8}", r"^TASK_FEATURE_LENGTHS .*'inputs', 'targets'"),
    ('trainer.TrainerConfig.save_every = 0', r'^trainer.TrainerConfig.save_every: must be a '),
    ('trainer.TrainerConfig.num_microbatches = 2',
     r"^trainer.TrainerConfig.grad_strategy: 'full' takes the batch at once; "),
    ("trainer.TrainerConfig.grad_strategy = 'accumulate'",
     r"^trainer.TrainerConfig.grad_strategy: 'accumulate' would shrink"),
])
def test_settings_that_cannot_work_stop_before_anything_runs(clean_gin, tmp_path, binding,
                                                             message):
  model_dir = tmp_path / 'run'
  gin_utils.parse_gin(GIN_FILES, [f"MODEL_DIR = '{model_dir}'",
                                  "MIXTURE_OR_TASK_NAME = 'beir:/nonexistent'", binding])
  with pytest.raises(cli.ConfigError, match=message):
    gin_utils.call_configured(train_lib.run)
  assert not model_dir.exists()


RERANKER_FILES = ['gin/models/rankt5_encdec.gin', 'gin/sizes/tiny.gin',
                  'configs/runs/finetune.gin', 'configs/runs/rerank.gin']


@pytest.mark.parametrize('binding,message', [
    ('LIST_SIZE = 1', r'^LIST_SIZE \(data.tasks.ListTask.list_size\): must be in \[2, 100\] '),
    ('MIN_RANK = 101', r'^MAX_RANK \(data.tasks.ListTask.max_rank\): must be >= min_rank 101 '),
    ('tasks.ListTask.num_positives = 8',
     r'^data.tasks.ListTask.num_positives: must be in \[1, list_size 8\), got 8$'),
    ('LOSS_FN = @ranking_losses.kl_distillation_loss',
     r'^TEACHER \(data.tasks.ListTask.teacher\): the loss kl_distillation_loss distils from '
     r'teacher scores, and none are given: set TEACHER'),
    ("TEACHER = '{teacher}'", r"^TEACHER \(data.tasks.ListTask.teacher\): is '.*t.trec', but "
                              r'the loss softmax_loss does not use teacher scores'),
    ("FIRST_STAGE_RUN = '/nonexistent/run.trec'",
     r'^FIRST_STAGE_RUN \(data.tasks.ListTask.first_stage_run\): /nonexistent/run.trec: '
     r'file not found$'),
])
def test_reranker_settings_that_cannot_work_stop_before_anything_runs(clean_gin, tmp_path,
                                                                      binding, message):
  """Found before BM25 over the training split runs and before MODEL_DIR (and its
  writer.lock) exists, naming the macro."""
  model_dir = tmp_path / 'run'
  teacher = tmp_path / 't.trec'
  teacher.write_text('q1 Q0 d1 1 1.0 t\n')
  gin_utils.parse_gin(RERANKER_FILES, [f"MODEL_DIR = '{model_dir}'",
                                       "MIXTURE_OR_TASK_NAME = 'beir:/nonexistent'",
                                       binding.format(teacher=teacher)])
  gin_utils.check_bindings_used([binding.format(teacher=teacher)], train_lib.run)
  with pytest.raises(cli.ConfigError, match=message) as e:
    gin_utils.call_configured(train_lib.run)
  assert '\n' not in str(e.value)
  assert not model_dir.exists()


@pytest.mark.parametrize('files,message', [
    (RERANKER_FILES[:3], r"reads the features \['inputs'\], but TASK_FEATURE_LENGTHS gives "
                         r"lengths of \['inputs', 'targets'\]: add configs/runs/rerank.gin after "
                         r'configs/runs/finetune.gin'),
    (GIN_FILES + ['configs/runs/rerank.gin'],
     r"reads the features \['inputs', 'targets'\], but TASK_FEATURE_LENGTHS gives lengths of "
     r"\['inputs'\]: configs/runs/finetune.gin alone is the run file of a dual encoder "
     r'\(configs/runs/rerank.gin is for rerankers: drop it\)'),
])
def test_a_model_with_the_other_familys_run_file_is_named(clean_gin, files, message):
  """Not 'macro %INPUT_LENGTH is never defined': which file to add or drop."""
  gin_utils.parse_gin(files, ["MODEL_DIR = '/nonexistent/run'",
                              "MIXTURE_OR_TASK_NAME = 'beir:/nonexistent'"])
  with pytest.raises(cli.ConfigError, match=message) as e:
    gin_utils.check_bindings_used([], train_lib.run)
  assert '\n' not in str(e.value)


def test_batch_size_must_split_over_the_data_parallel_devices(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  with pytest.raises(trainer.ParameterError, match=r'6 is not divisible by the data-parallel '
                     r'size 4 \(4 devices / model_parallel 1\)'):
    train_lib.run(str(tmp_path / 'a'), _model(), 'beir:/x', '/no/spm.model',
                  task=tasks.PairTask(), batch_size=6,
                  task_feature_lengths=LENGTHS)
  with pytest.raises(cli.ConfigError, match='Partitioner.num_partitions: 3 does not divide'):
    train_lib.run(str(tmp_path / 'a'), _model(), 'beir:/x', '/no/spm.model',
                  task=tasks.PairTask(), batch_size=6,
                  task_feature_lengths=LENGTHS,
                  partitioner=partitioning.Partitioner(num_partitions=3))
  assert not (tmp_path / 'a').exists()
  # 2 data-parallel groups of 2 devices: the settings pass, the vocabulary is next.
  with pytest.raises(FileNotFoundError, match='/no/spm.model'):
    train_lib.run(str(tmp_path / 'a'), _model(), 'beir:/x', '/no/spm.model',
                  task=tasks.PairTask(), batch_size=6,
                  task_feature_lengths=LENGTHS,
                  partitioner=partitioning.Partitioner(num_partitions=2))


# --------------------------------------------------------------------------- one writer

_HOLDER = '''
import sys
from t5dual import checkpoints
with checkpoints.exclusive_writer(sys.argv[1]):
  print('locked', flush=True)
  sys.stdin.read()
'''


def test_a_second_writer_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
  model_dir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, model_dir], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == b'locked'
    lock = os.path.realpath(os.path.join(model_dir, 'writer.lock'))
    with pytest.raises(checkpoints.ModelDirBusyError) as e:
      with checkpoints.exclusive_writer(model_dir):
        pass
    message = str(e.value)
    assert f'host {socket.gethostname()}, pid {holder.pid}, started ' in message
    assert f'lock file {lock}' in message and '\n' not in message
    # trainer.train stops there too, before writing anything.
    with pytest.raises(checkpoints.ModelDirBusyError):
      trainer.train(_model(), None, optax.sgd(0.1), model_dir,
                    model_description={'kind': 'dual_encoder'}, batch_spec={})
    assert not os.path.exists(os.path.join(model_dir, 'model.json'))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # kill -9 leaves the lock file, naming the dead holder; the kernel dropped its flock.
  with open(lock) as f:
    assert json.load(f)['pid'] == holder.pid
  with checkpoints.exclusive_writer(model_dir):
    with open(lock) as f:
      assert json.load(f)['pid'] == os.getpid()
    with checkpoints.exclusive_writer(model_dir):  # re-entrant within one process
      pass
  with open(lock) as f:
    assert f.read() == ''  # released


def test_unwritable_directories_are_found_before_training(tmp_path):
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  (model_dir / 'checkpoints').write_text('not a directory')
  with pytest.raises(cli.UserError, match=f'^{model_dir}/checkpoints exists and is not a '
                                          f'directory$'):
    trainer.train(_model(), None, optax.sgd(0.1), str(model_dir),
                  model_description={'kind': 'dual_encoder'}, batch_spec={})
  assert sorted(os.listdir(model_dir)) == ['checkpoints', 'writer.lock']
  as_file = tmp_path / 'file'
  as_file.write_text('')
  with pytest.raises(cli.UserError, match=f'^{as_file} exists and is not a directory$'):
    with checkpoints.exclusive_writer(str(as_file)):
      pass


# --------------------------------------------------------------------------- run starts

def test_config_of_each_start_is_kept_and_a_failed_start_writes_none(demo_data, tmp_path):
  model_dir = str(tmp_path / 'run')
  bad = _bad_data(demo_data[0], tmp_path)
  with pytest.raises(cli.UserError, match='corpus.jsonl:3: not valid JSON'):
    _run(model_dir, demo_data, 2, source=f'beir:{bad}:train', run_config=lambda: 'failed')
  assert not [f for f in os.listdir(model_dir) if f.startswith('config')]
  _run(model_dir, demo_data, 2, run_config=lambda: 'first start')
  with pytest.raises(FileNotFoundError):
    _run(model_dir, demo_data, 3, vocab='/no/spm.model', run_config=lambda: 'failed')
  _run(model_dir, demo_data, 3, run_config=lambda: 'second start')
  configs = sorted(f for f in os.listdir(model_dir) if f.startswith('config'))
  assert len(configs) == 2 and configs[1] == 'config.gin', configs
  assert (tmp_path / 'run' / 'config.gin').read_text() == 'first start'
  assert (tmp_path / 'run' / configs[0]).read_text() == 'second start'
  assert configs[0].startswith('config-20') and configs[0].endswith('Z.gin')


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_with_the_steps_that_exist(demo_data, tmp_path):
  model_dir = str(tmp_path / 'run')
  _run(model_dir, demo_data, 4)
  assert checkpoints.checkpoint_manager(model_dir).all_steps() == [2, 4]
  step_dir = os.path.join(model_dir, 'checkpoints', '4')
  # Cut the largest file of parameter data (orbax's OCDBT layout) in half.
  params_dir = os.path.join(step_dir, 'params')
  data_files = [os.path.join(root, f) for root, _, files in os.walk(params_dir)
                for f in files if os.path.basename(root) == 'd']
  largest = max(data_files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  expected = (f'^checkpoint step 4 in {step_dir} is damaged or incomplete .*; earlier steps: 2; '
              f'move {step_dir} away to use step 2$')
  with pytest.raises(checkpoints.DamagedCheckpointError, match=expected) as e:
    checkpoints.restore_for_inference(model_dir)
  assert '\n' not in str(e.value)
  with pytest.raises(checkpoints.DamagedCheckpointError, match=expected):
    _run(model_dir, demo_data, 6)
  assert checkpoints.restore_for_inference(model_dir, 2).step == 2


# --------------------------------------------------------------------------- scripts/train.py

def _train_script(model_dir, data, spm, *extra):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'train.py')] +
      [f'--gin_file={f}' for f in GIN_FILES] +
      [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.MIXTURE_OR_TASK_NAME='beir:{data}:train'",
       f"--gin.VOCABULARY_PATH='{spm}'", '--gin.VOCAB_SIZE=512', '--gin.BATCH_SIZE=8',
       '--gin.TRAIN_STEPS=2'] + list(extra),
      cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True)


def _bad_data(folder, tmp_path):
  bad = str(tmp_path / 'bad')
  shutil.copytree(folder, bad)
  with open(os.path.join(bad, 'corpus.jsonl')) as f:
    lines = f.readlines()
  lines[2] = '{"_id": "broken", "text": \n'
  with open(os.path.join(bad, 'corpus.jsonl'), 'w') as f:
    f.writelines(lines)
  return bad


@pytest.mark.parametrize('case', ['missing vocabulary', 'bad data', 'misspelt macro',
                                  'model dir is a file'])
def test_train_script_reports_user_errors_in_one_line(demo_data, tmp_path, case):
  data, spm = demo_data
  model_dir, extra = tmp_path / 'run', []
  if case == 'missing vocabulary':
    spm = str(tmp_path / 'none.model')
    expected = f'SentencePiece model not found: {spm}'
  elif case == 'bad data':
    data = _bad_data(data, tmp_path)
    expected = f'{data}/corpus.jsonl:3: not valid JSON'
  elif case == 'misspelt macro':
    extra, expected = ['--gin.TRAIN_STEPSS=5'], 'did you mean TRAIN_STEPS?'
  else:
    model_dir.write_text('')
    expected = f'{model_dir} exists and is not a directory'
  result = _train_script(model_dir, data, spm, *extra)
  assert result.returncode == 2, result.stderr
  lines = cli_output.error_lines(result.stderr)
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert expected in lines[0]


# --------------------------------------------------------------------------- model contract

class _ToyRegression:
  """The smallest `model_api.Model`: linear regression on Gaussian inputs."""

  kind = 'toy_regression'
  metric_names = ('loss', 'mse')
  progress_metrics = ('mse',)
  feature_names = ('inputs',)
  vocab_size = 512
  name = 'toy regression'

  def __init__(self, dim=4, reports=('loss', 'mse')):
    self.dim, self.reports = dim, reports

  def init_params(self, rng):
    return {'w': jnp.zeros((self.dim,))}

  def logical_axes(self):
    return {'w': P(None)}

  def loss_fn(self, params, batch, dropout_rng):
    mse = jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    return mse, {k: mse for k in self.reports}

  token_features = ()  # no token ids: no encoder activations to plan

  @property
  def input_features(self):
    return {'x': model_api.Feature(('batch', 'dim'), 'float32'),
            'y': model_api.Feature(('batch',), 'float32')}

  def describe(self):
    return {'config': {'dim': self.dim}}

  @classmethod
  def from_description(cls, desc):
    return cls(desc['config']['dim'])


class _ToyTask:
  """Gaussian inputs of `dim` features, and their targets: the data of _ToyRegression."""

  def __init__(self, dim):
    self.dim = dim

  def make_batcher(self, source, tokenizer, batch_size, feature_lengths, seed=0,
                   template=None):
    return _ToyBatcher(self.dim, batch_size, seed)

  def batch_spec(self, batch_size, feature_lengths):
    return {'x': jax.ShapeDtypeStruct((batch_size, self.dim), np.float32),
            'y': jax.ShapeDtypeStruct((batch_size,), np.float32)}

  def check_paths(self):
    pass

  def describe(self):
    return {'kind': 'toy', 'dim': self.dim}


class _ToyBatcher:
  def __init__(self, dim, batch_size, seed):
    self.dim, self.batch_size, self.seed = dim, batch_size, seed
    self.w = np.arange(1, dim + 1, dtype=np.float32) / dim

  def batch_spec(self):
    return _ToyTask(self.dim).batch_spec(self.batch_size, {})

  def batch(self, step, process_index=0, process_count=1):
    x = np.random.default_rng([self.seed, step]).normal(size=(self.batch_size, self.dim))
    x = x.astype(np.float32)
    return {'x': x, 'y': x @ self.w}


def test_dual_encoder_implements_the_contract_and_round_trips_by_kind():
  model = dual_encoders.DualEncoderModel(
      dual_encoders.DualEncoderConfig(t5=t5.t5_config('tiny', vocab_size=512), architecture='ade'),
      dual_encoders.LossConfig(name='pair'))
  assert isinstance(model, model_api.Model)
  desc = json.loads(json.dumps(checkpoints.model_description(model, 'spm.model', LENGTHS)))
  assert desc['kind'] == 'dual_encoder'
  again = checkpoints.model_from_description(desc)
  assert type(again) is dual_encoders.DualEncoderModel
  assert (again.config, again.loss) == (model.config, model.loss)
  assert again.metric_names == ('loss', 'loss/query_centric', 'loss/passage_centric',
                                'p_at_1', 'mrr')


def test_any_registered_kind_trains_and_reloads(demo_data, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(model_api._REGISTRY, _ToyRegression.kind, _ToyRegression)
  model_dir = str(tmp_path / 'run')
  model = _ToyRegression(dim=3)
  assert isinstance(model, model_api.Model)
  _run(model_dir, demo_data, 40, model=model, task=_ToyTask(3), task_feature_lengths={'inputs': 4},
       learning_rate=0.2, optimizer_fn=optax.sgd, trainer_config=trainer.TrainerConfig(log_every=10, save_every=20, tensorboard=False))
  with open(os.path.join(model_dir, 'model.json')) as f:
    assert json.load(f)['kind'] == 'toy_regression'
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert set(logged[0]) == {'step', 'loss', 'mse', 'grad_norm', 'examples_per_second',
                            'learning_rate'}
  assert logged[-1]['mse'] < 0.1 * logged[0]['mse']
  bar = capsys.readouterr().err
  assert 'mse=' in bar and 'p1=' not in bar and 'p_at_1' not in bar
  restored = checkpoints.restore_for_inference(model_dir)
  assert type(restored.model) is _ToyRegression and restored.model.dim == 3
  assert restored.step == 40 and restored.params['w'].shape == (3,)
  # model.json of a kind nobody registered: one clear error naming the file.
  path = os.path.join(model_dir, 'model.json')
  with open(path) as f:
    desc = json.load(f)
  with open(path, 'w') as f:
    json.dump({**desc, 'kind': 'no_such_kind'}, f)
  with pytest.raises(model_api.UnknownModelKindError,
                     match=f"^{path}: unknown model kind 'no_such_kind'; known kinds: .*"
                           'dual_encoder'):
    checkpoints.restore_for_inference(model_dir)


def test_metrics_must_be_the_ones_the_model_declares(tmp_path):
  with pytest.raises(TypeError, match=r"reports metrics \['loss'\] but declares metric_names "
                                      r"\['loss', 'mse'\] and progress_metrics \['mse'\]"):
    trainer.train(_ToyRegression(reports=('loss',)), _ToyBatcher(4, 8, 0), optax.sgd(0.1),
                  str(tmp_path / 'run'),
                  trainer.TrainerConfig(total_steps=1, progress_bar=False, tensorboard=False),
                  batch_spec=_ToyBatcher(4, 8, 0).batch_spec())


def test_a_batch_that_differs_from_the_spec_is_one_error_naming_the_entry(tmp_path):
  # The step is compiled for the spec before the loop; a batcher whose batches differ
  # stops the run at its first batch, naming the entry, before any step runs.
  spec = _ToyBatcher(4, 8, 0).batch_spec()
  config = trainer.TrainerConfig(total_steps=2, progress_bar=False, tensorboard=False)
  narrow = {**spec, 'x': jax.ShapeDtypeStruct((8, 3), np.float32)}
  with pytest.raises(trainer.BatchMismatchError,
                     match=r"^batch entry 'x' is float32\[8, 4\], but the step was compiled "
                           r"for float32\[8, 3\]$"):
    trainer.train(_ToyRegression(dim=3), _ToyBatcher(4, 8, 0), optax.sgd(0.1),
                  str(tmp_path / 'run'), config, batch_spec=narrow)
  with pytest.raises(trainer.BatchMismatchError, match=r"^batch entry 'z' is not in the batch "
                                                       r"spec the step was compiled for"):
    trainer.check_batch({'z': np.zeros(2), **{k: np.zeros(v.shape, v.dtype)
                                               for k, v in spec.items()}}, spec)
  with pytest.raises(trainer.BatchMismatchError, match=r"^batch entry 'y' is float64\[8\]"):
    trainer.check_batch({'x': np.zeros((8, 4), np.float32), 'y': np.zeros(8)}, spec)
  with pytest.raises(trainer.BatchMismatchError, match=r"^batch entry 'y' of the batch spec "
                                                       r"the step was compiled for is missing"):
    trainer.check_batch({'x': np.zeros((8, 4), np.float32)}, spec)
  trainer.check_batch({'x': np.zeros((2, 4), np.float32), 'y': np.zeros(2, np.float32)},
                      spec, rows=2)  # one of 4 data shards' slices
