"""scripts/launch_tpu_pod.sh and scripts/launch_gpu_slurm.sh: what --dry-run prints is
exactly what runs, and the command arrives on the workers word for word.

gcloud, sbatch and srun are replaced by small fakes on PATH: fake gcloud runs the
--command string the way a worker's shell would, fake sbatch runs the batch script
from its input, fake srun runs its command once. The command is a Python one-liner that
prints its working directory, arguments and the variables the launcher set."""

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Words a shell would break or expand if the launcher quoted them wrong.
TRICKY = ['a b', "--gin.MODEL_DIR='gs://bucket/run 1'", '$HOME', '*', 'it"s']
PROBE = ('import json, os, sys; print("PROBE", json.dumps([os.getcwd(), sys.argv[1:], '
         'os.environ.get("T5DUAL_MULTIHOST"), os.environ.get("JAX_LOCAL_DEVICE_IDS"), '
         'os.environ.get("T5DUAL_ACCELERATOR")]))')

FAKES = {
    'gcloud': '#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_LOG"\n'
              'for a in "$@"; do [[ $a == --command=* ]] && bash -c "${a#--command=}"; done\n'
              'exit 0\n',
    'sbatch': '#!/bin/bash\ncat > "$FAKE_LOG"\nbash "$FAKE_LOG"\n',
    'srun': '#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_LOG.srun"\n'
            'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
}


@pytest.fixture
def fakes(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in FAKES.items():
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  work = tmp_path / 'work dir'
  work.mkdir()
  env = {k: v for k, v in os.environ.items()
         if k not in ('T5DUAL_MULTIHOST', 'JAX_LOCAL_DEVICE_IDS', 'T5DUAL_ACCELERATOR')}
  env.update(PATH=f'{bin_dir}:{env["PATH"]}', FAKE_LOG=str(tmp_path / 'log'))
  return env, str(work), tmp_path / 'log'


def _launch(script, args, env):
  return subprocess.run(['bash', os.path.join(ROOT, 'scripts', script)] + args, env=env,
                        capture_output=True, text=True, timeout=60)


def _probe(stdout):
  [line] = [l for l in stdout.splitlines() if l.startswith('PROBE ')]
  return json.loads(line[len('PROBE '):])


def test_tpu_pod_runs_the_same_command_on_all_workers(fakes):
  env, work, log = fakes
  args = ['--tpu=pod-1', '--zone=us-central2-b', '--project=p', f'--workdir={work}', '--',
          sys.executable, '-c', PROBE] + TRICKY
  dry = _launch('launch_tpu_pod.sh', ['--dry-run'] + args, env)
  assert dry.returncode == 0, dry.stderr
  [line] = dry.stdout.splitlines()
  assert line.startswith("gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b "
                         "--project=p --worker=all '--command=cd ")
  assert not log.exists()  # a dry run runs nothing

  real = _launch('launch_tpu_pod.sh', args, env)
  assert real.returncode == 0, real.stderr
  assert _probe(real.stdout) == [work, TRICKY, '1', None, 'tpu']  # run.sh: the 'tpu' extra
  assert 'export T5DUAL_MULTIHOST=1 T5DUAL_ACCELERATOR=tpu && ' in line
  sent = log.read_text()
  # The printed line, run by a shell, makes the same call.
  replay = subprocess.run(['bash', '-c', line], env=env, capture_output=True, text=True)
  assert _probe(replay.stdout) == [work, TRICKY, '1', None, 'tpu']
  assert log.read_text() == sent
  assert sent.splitlines()[:8] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod-1',
                                   '--zone=us-central2-b', '--project=p', '--worker=all']


@pytest.mark.parametrize('per,tasks,device_ids', [('gpu', 8, None), ('node', 1, '0,1,2,3,4,5,6,7')])
def test_slurm_job_has_one_task_per_gpu_or_node(fakes, per, tasks, device_ids):
  env, work, log = fakes
  args = ['--nodes=2', f'--per={per}', '--partition=h100', '--time=01:00:00',
          f'--workdir={work}', '--', sys.executable, '-c', PROBE] + TRICKY
  dry = _launch('launch_gpu_slurm.sh', ['--dry-run'] + args, env)
  assert dry.returncode == 0, dry.stderr
  lines = dry.stdout.splitlines()
  assert lines[:10] == [
      "sbatch <<'SBATCH'", '#!/bin/bash', '#SBATCH --job-name=t5dual', '#SBATCH --nodes=2',
      f'#SBATCH --ntasks-per-node={tasks}', '#SBATCH --gpus-per-node=8',
      '#SBATCH --output=t5dual-%j.out', '#SBATCH --partition=h100', '#SBATCH --time=01:00:00',
      'export T5DUAL_ACCELERATOR=cuda']  # run.sh: the 'cuda' extra
  assert lines[-1] == 'SBATCH'
  assert lines[-2].startswith(f'srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node={tasks} '
                              'bash -c ')
  assert not log.exists()

  real = _launch('launch_gpu_slurm.sh', args, env)
  assert real.returncode == 0, real.stderr
  assert _probe(real.stdout) == [work, TRICKY, None, device_ids, 'cuda']
  script = log.read_text()
  assert script.strip() == '\n'.join(lines[1:-1])  # the batch script printed is the one sent
  replay = subprocess.run(['bash', '-c', dry.stdout], env=env, capture_output=True, text=True)
  assert _probe(replay.stdout) == [work, TRICKY, None, device_ids, 'cuda']

  # Inside an allocation: the srun step alone.
  dry = _launch('launch_gpu_slurm.sh', ['--srun', '--dry-run'] + args, env)
  assert dry.stdout.splitlines()[0] == 'export T5DUAL_ACCELERATOR=cuda'
  assert dry.stdout.splitlines()[-1] == lines[-2]
  real = _launch('launch_gpu_slurm.sh', ['--srun'] + args, env)
  assert _probe(real.stdout) == [work, TRICKY, None, device_ids, 'cuda']


@pytest.mark.parametrize('script,args,message', [
    ('launch_tpu_pod.sh', ['--zone=z', '--', 'true'], '--tpu=NAME is required'),
    ('launch_tpu_pod.sh', ['--tpu=t', '--zone=z'], 'no command given after --'),
    ('launch_tpu_pod.sh', ['--tpu=t', '--zone=z', 'python'], 'unknown option python'),
    ('launch_gpu_slurm.sh', ['--nodes=0', '--', 'true'], "--nodes must be a positive integer"),
    ('launch_gpu_slurm.sh', ['--nodes=1', '--per=rack', '--', 'true'],
     "--per must be gpu or node, got 'rack'"),
])
def test_launcher_mistakes_are_one_line(fakes, script, args, message):
  result = _launch(script, args, fakes[0])
  assert result.returncode == 2
  [line] = result.stderr.splitlines()
  assert line.startswith('error: ') and message in line
