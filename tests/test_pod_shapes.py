"""Pods in miniature: CPU processes joined by jax.distributed, laid out as pods are.

On a v4-128 with model-parallel 8 every data shard spans two hosts; so here:
  - 2 processes x 2 devices, model-parallel 4: the model axis across processes, every
    process loading the whole batch;
  - 4 processes x 2 devices, mesh data 2 x model 4 with 2-D parameter partitioning: each
    data shard spans 2 processes (processes 0 and 1 load rows 0-7, 2 and 3 rows 8-15);
  - 2 processes x 2 devices as 2 (data, within a process) x 2 (model, across processes),
    for the T5X fixture, whose 2 heads do not split 4 ways.
Each trains dual encoders (full batch, GradCache), a RankT5-EncDec reranker (microbatch
accumulation), both again from a prepared store (data/store.py, each process reading its
shard's rows), and models started from initial checkpoints (a t5dual directory, a Hugging
Face folder, the T5X fixture), and is compared with one process over as many devices: the
losses to the float32 error of the step, the final parameters likewise; the store's runs
equal the in-memory ones bit for bit. Then the jobs are
interrupted: kill -9 of one process, SIGTERM to one process of two and to a single process;
run again, each resumes exactly.

Each process start pays for JAX's import and its compilations, so every layout runs all of its
scenarios in one start (helpers/pod_job.py), and the layouts run one after the other.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from t5dual import checkpoints, preemption

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'helpers'))
import pod_job  # noqa: E402
import tolerances  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# Two float32 runs of the same training that add in other orders (collectives across
# processes against within one): losses are logits of unit vectors (up to 1 / temperature =
# 100; a reranker's are smaller) through 1 layer of each stack (2 residual blocks, 4 for the
# encoder-decoder), head and loss; each of the 4 steps adds a rounding stage to the weights.
LOSS_ERROR = dict(magnitude=100, depth=6 + 4, width=64, both_sides=True)
# Parameters after 4 Adafactor steps: each update is lr (1e-2) x a unit-RMS direction, so a
# rounding difference in a gradient moves a weight by at most a few ulps of lr per step,
# on weights of magnitude ~1.
PARAM_ERROR = dict(magnitude=1, depth=4, width=64, both_sides=True)

MP4 = {'num_partitions': 4}
MESH_2x4_2D = {'ici_mesh_shape': [2, 4], 'parameter_partitioning_dims': 2}
MODEL_ACROSS = {'ici_mesh_shape': [2, 1], 'dcn_mesh_shape': [1, 2]}
SCENARIOS = ['sde', 'ade_spl_gradcache', 'encdec_accumulate', 'from_t5dual_dir', 'from_hf',
             'sde_store', 'encdec_store']
FIXTURE = 'fixtures/t5x_retrieval_de_t5_tiny/checkpoint_1000'


def _port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(args, processes, devices, env_extra=None, port=None):
  """pod_job.py as `processes` processes of `devices` CPU devices each."""
  port = port or _port()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'T5DUAL_', 'OMPI_', 'JAX_COORDINATOR'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [os.path.dirname(HERE)] + [p for p in [env.get('PYTHONPATH')] if p]),
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', **(env_extra or {}))
  procs = []
  for i in range(processes):
    layout = {} if processes == 1 else {
        'T5DUAL_COORDINATOR': f'localhost:{port}', 'T5DUAL_NUM_PROCESSES': str(processes),
        'T5DUAL_PROCESS_ID': str(i), 'T5DUAL_INIT_TIMEOUT': '120'}
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(HERE, 'helpers', 'pod_job.py')] + [str(a) for a in args],
        env={**env, **layout}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout=900, status=0):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, out in zip(procs, outs):
    assert p.returncode == status, out[-4000:]
  return outs


def _run(data_dir, out_dir, names, mesh, processes, devices, steps=4, env=None):
  return _finish(_start([data_dir, out_dir, ','.join(names), json.dumps(mesh), steps],
                        processes, devices, env))


def _run_beside_reference(data_dir, out_dir, names, mesh, processes, devices, env=None,
                          reference_mesh=None):
  """The pod-shaped job in out_dir/pod and one process over as many devices in out_dir/one,
  started together (each waits on the other's share of the cores at times); the pod's
  outputs."""
  pod = _start([data_dir, out_dir / 'pod', ','.join(names), json.dumps(mesh), 4], processes,
               devices, env)
  one = _start([data_dir, out_dir / 'one', ','.join(names),
                json.dumps(reference_mesh or mesh), 4], 1, processes * devices, env)
  outs = _finish(pod)
  _finish(one)
  return outs


def _losses(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f)]


def _final_params(model_dir):
  restored = checkpoints.restore_for_inference(model_dir)
  return restored.step, jax.device_get(restored.params)


def _assert_same_training(got_dir, want_dir):
  got, want = _losses(got_dir), _losses(want_dir)
  assert [s for s, _ in got] == [s for s, _ in want]
  tolerances.assert_close([l for _, l in got], [l for _, l in want], **LOSS_ERROR)
  (got_step, got_params), (want_step, want_params) = (_final_params(got_dir),
                                                      _final_params(want_dir))
  assert got_step == want_step
  assert jax.tree.structure(got_params) == jax.tree.structure(want_params)
  for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    tolerances.assert_close(g, w, **PARAM_ERROR)


def _layouts(outs):
  """{process: (shard index, number of shards)} from the LAYOUT lines."""
  found = {}
  for out in outs:
    for line in out.splitlines():
      if line.startswith('LAYOUT '):
        process, shard, shards = map(int, line.split()[1:])
        found[process] = (shard, shards)
  return found


@pytest.fixture(scope='module')
def data_dir(demo_collection):
  return demo_collection


@pytest.fixture(scope='module')
def initial_checkpoints(data_dir, tmp_path_factory):
  """POD_JOB_* variables naming the initial checkpoints (a Hugging Face folder of pod_job's
  shape, written with transformers) and the prepared store of the demo's pairs and lists."""
  transformers = pytest.importorskip('transformers')
  import torch
  torch.manual_seed(0)
  hf_dir = str(tmp_path_factory.mktemp('hf') / 'encoder')
  transformers.T5EncoderModel(transformers.T5Config(**pod_job.hf_config_kwargs())
                              ).save_pretrained(hf_dir)
  return {'POD_JOB_FROM_HF': hf_dir,
          'POD_JOB_STORE': pod_job.prepare_store(data_dir, str(tmp_path_factory.mktemp('store')))}


@pytest.fixture(scope='module')
def model_axis_across_processes(data_dir, initial_checkpoints, tmp_path_factory):
  out = tmp_path_factory.mktemp('mp4')
  return out, _run_beside_reference(data_dir, out, SCENARIOS, MP4, 2, 2, initial_checkpoints)


@pytest.fixture(scope='module')
def data_shards_across_processes(data_dir, initial_checkpoints, tmp_path_factory):
  out = tmp_path_factory.mktemp('mesh2x4')
  return out, _run_beside_reference(data_dir, out, SCENARIOS, MESH_2x4_2D, 4, 2,
                                    initial_checkpoints)


@pytest.mark.torch
@pytest.mark.parametrize('scenario', SCENARIOS)
def test_model_axis_across_two_processes(model_axis_across_processes, scenario):
  out, outs = model_axis_across_processes
  assert _layouts(outs) == {0: (0, 1), 1: (0, 1)}  # both hold every row: one shard
  _assert_same_training(out / 'pod' / scenario, out / 'one' / scenario)


@pytest.mark.torch
@pytest.mark.parametrize('scenario', SCENARIOS)
def test_data_shards_spanning_processes_with_2d_partitioning(data_shards_across_processes,
                                                             scenario):
  out, outs = data_shards_across_processes
  assert _layouts(outs) == {0: (0, 2), 1: (0, 2), 2: (1, 2), 3: (1, 2)}
  _assert_same_training(out / 'pod' / scenario, out / 'one' / scenario)


@pytest.mark.torch
@pytest.mark.parametrize('layout', ['model_axis_across_processes', 'data_shards_across_processes'])
def test_the_store_trains_as_its_in_memory_source_in_a_pod(request, layout):
  """Every process reads its data shard's rows from the memory-mapped store: the same
  batches as the in-memory batchers, so the same losses and parameters, bit for bit."""
  out, _ = request.getfixturevalue(layout)
  for stored, in_memory in (('sde_store', 'sde'), ('encdec_store', 'encdec_accumulate')):
    assert _losses(out / 'pod' / stored) == _losses(out / 'pod' / in_memory)
    (got_step, got), (want_step, want) = (_final_params(out / 'pod' / stored),
                                          _final_params(out / 'pod' / in_memory))
    assert got_step == want_step == 4
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert (g == w).all(), stored


def test_t5x_fixture_with_the_model_axis_across_processes(data_dir, shared_dir, tmp_path):
  _run_beside_reference(data_dir, tmp_path, ['from_t5x'], MODEL_ACROSS, 2, 2,
                        {'POD_JOB_FROM_T5X': str(shared_dir / FIXTURE)},
                        reference_mesh={'ici_mesh_shape': [2, 2]})
  _assert_same_training(tmp_path / 'pod' / 'from_t5x', tmp_path / 'one' / 'from_t5x')


# --------------------------------------------------------------------------- interruptions

STEPS = 6  # checkpoints at 2, 4, 6


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp('uninterrupted')
  _run(data_dir, out, ['sde'], MP4, 1, 4, steps=STEPS)
  return out / 'sde'


def _wait_for(predicate, procs, timeout=600):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert all(p.poll() is None for p in procs), 'the job ended before it was interrupted'
    assert time.monotonic() < deadline, 'timed out waiting for the job'
    time.sleep(0.2)


def _logged_steps(model_dir):
  path = os.path.join(model_dir, 'metrics.jsonl')
  return len(_losses(model_dir)) if os.path.exists(path) else 0


def test_kill_9_of_one_process_then_the_job_run_again_resumes_exactly(data_dir, uninterrupted,
                                                                    tmp_path):
  args = [data_dir, tmp_path, 'sde', json.dumps(MP4), STEPS]
  procs = _start(args, 2, 2, {'POD_JOB_BATCH_SECONDS': '1'})
  model_dir = tmp_path / 'sde'
  _wait_for(lambda: _logged_steps(model_dir) >= 3, procs)  # past checkpoint 2
  procs[1].send_signal(signal.SIGKILL)
  procs[1].communicate()
  procs[0].kill()  # what a launcher does with the rest of a job that lost a process
  procs[0].communicate()
  assert 2 <= checkpoints.checkpoint_manager(str(model_dir), 2, 3).latest_step() < STEPS
  outs = _finish(_start(args, 2, 2))
  assert all('resuming from' in out for out in outs)
  _assert_same_training(model_dir, uninterrupted)


@pytest.mark.parametrize('processes,devices', [(1, 4), (2, 2)])
def test_sigterm_saves_the_same_step_everywhere_and_stops_for_a_restart(
    data_dir, uninterrupted, tmp_path, processes, devices):
  """SIGTERM to one process: every process saves the same step, at once (not at the next
  save_every), and exits with the restart status; the job run again finishes as if never
  stopped."""
  args = [data_dir, tmp_path, 'sde', json.dumps(MP4), STEPS]
  procs = _start(args, processes, devices, {'POD_JOB_BATCH_SECONDS': '1'})
  model_dir = tmp_path / 'sde'
  _wait_for(lambda: _logged_steps(model_dir) >= 1, procs)
  procs[-1].send_signal(signal.SIGTERM)
  outs = _finish(procs, status=preemption.PREEMPTED_EXIT_STATUS)
  saved = {int(line.split()[1]) for out in outs for line in out.splitlines()
           if line.startswith('PREEMPTED ')}
  assert len(saved) == 1, outs[0][-3000:]
  step = saved.pop()
  assert 1 <= step < STEPS
  assert checkpoints.checkpoint_manager(str(model_dir), 2, 3).latest_step() == step
  assert _logged_steps(model_dir) == step
  _finish(_start(args, processes, devices))
  _assert_same_training(model_dir, uninterrupted)


# --------------------------------------------------------------------------- a chain

CHAIN_FILES = ['gin/models/rankt5_encdec.gin', 'gin/sizes/tiny.gin', 'configs/runs/finetune.gin',
               'configs/runs/rerank.gin', 'configs/runs/two_stage_rerank.gin']


def _chain(model_dir, data_dir, processes, devices):
  """scripts/train.py running configs/runs/two_stage_rerank.gin, model-parallel 4."""
  bindings = [
      f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = 'beir:{data_dir}:train'",
      f"VOCABULARY_PATH = '{data_dir}/spm.model'", f"EVAL_BEIR = '{data_dir}'",
      'EVAL_TOP_K = 5', 'VOCAB_SIZE = 256', 'rerankers.RerankerConfig.scoring_token_id = 100',
      'INPUT_LENGTH = 32', 'BATCH_SIZE = 4', 'LIST_SIZE = 4', 'MAX_RANK = 8',
      'CONTRASTIVE_STEPS = 3', 'DISTILL_STEPS = 3', 'DROPOUT_RATE = 0.0',
      "ACTIVATION_DTYPE = 'float32'", 'partitioning.Partitioner.num_partitions = 4',
      'trainer.TrainerConfig.log_every = 1', 'trainer.TrainerConfig.progress_bar = False',
      'trainer.TrainerConfig.tensorboard = False']
  cmd = ([os.path.join(os.path.dirname(HERE), 'scripts', 'train.py')] +
         [f'--gin_file={f}' for f in CHAIN_FILES] + [f'--gin_bindings={b}' for b in bindings])
  port = _port()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'T5DUAL_', 'OMPI_', 'JAX_COORDINATOR'))}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  procs = [subprocess.Popen(
      [sys.executable] + cmd, cwd=os.path.dirname(HERE), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env={**env, **({} if processes == 1 else {
          'T5DUAL_COORDINATOR': f'localhost:{port}', 'T5DUAL_NUM_PROCESSES': str(processes),
          'T5DUAL_PROCESS_ID': str(i), 'T5DUAL_INIT_TIMEOUT': '120'})})
      for i in range(processes)]
  return _finish(procs)


def test_a_two_stage_reranker_chain_with_the_model_axis_across_processes(data_dir, tmp_path):
  _chain(tmp_path / 'pod', data_dir, 2, 2)
  _chain(tmp_path / 'one', data_dir, 1, 4)
  records = []
  for run in ('pod', 'one'):
    with open(tmp_path / run / 'stages.json') as f:
      records.append(json.load(f))
  pod, one = records
  assert [s['status'] for s in pod['stages']] == ['complete', 'complete']
  for got, want in zip(pod['stages'], one['stages']):
    _assert_same_training(tmp_path / 'pod' / got['dir'], tmp_path / 'one' / want['dir'])
    # The stage evaluations rerank the same candidates with the same scores (to rounding,
    # far below the gaps between a tiny model's scores), hence the same metrics.
    got, want = _evaluation(got), _evaluation(want)
    assert got and set(got) == set(want)
    for key in want:
      assert got[key] == pytest.approx(want[key], abs=1e-6), key


def _evaluation(stage):
  """{(run, measure): value} of a stage's recorded evaluation."""
  metrics = (stage.get('evaluation') or {}).get('metrics') or {}
  return {(run, measure): value for run, row in metrics.items() for measure, value in row.items()}
