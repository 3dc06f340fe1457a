"""Joining a multi-host job: one call, `initialize`, before anything touches JAX's devices.

Every script that runs a model (train, export, eval, rerank) takes the flags of
`add_flags` and calls `initialize_from_flags` first. Where the job's layout
comes from, first match wins:

  explicit    --coordinator=HOST:PORT --num_processes=N --process_id=I, or the
              variables T5DUAL_COORDINATOR, T5DUAL_NUM_PROCESSES, T5DUAL_PROCESS_ID
              (flags win over variables)
  SLURM       inside `srun` (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
              SLURM_PROCID, SLURM_LOCALID): jax's SLURM detection; the coordinator
              is the step's first node, its port derived from the job id
              (JAX_COORDINATOR_PORT overrides); one process per GPU unless
              JAX_LOCAL_DEVICE_IDS lists a node's GPUs (scripts/launch_gpu_slurm.sh)
  TPU VM pod  --multihost (or T5DUAL_MULTIHOST=1) on every worker: jax's own
              detection from the TPU metadata server (also GKE, Open MPI)

Without any of these (or with N = 1) the process runs alone and nothing is
done. A SLURM step with one task is single-process too.

A process that cannot meet all its peers within --init_timeout seconds
(T5DUAL_INIT_TIMEOUT, default 300) raises `PeersMissingError`, a one-line
`cli.UserError` naming the coordinator, the process count and the timeout,
rather than hanging or dying inside XLA with a fatal log. JAX's own connect
cannot be interrupted, so it runs in a helper thread; after the error the
process can no longer use JAX and ends without waiting for it at exit.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import logging
import os
import sys
import threading
from typing import Mapping, Optional

from t5dual import cli

log = logging.getLogger(__name__)

ENV_MULTIHOST = 'T5DUAL_MULTIHOST'
ENV_COORDINATOR = 'T5DUAL_COORDINATOR'
ENV_NUM_PROCESSES = 'T5DUAL_NUM_PROCESSES'
ENV_PROCESS_ID = 'T5DUAL_PROCESS_ID'
ENV_TIMEOUT = 'T5DUAL_INIT_TIMEOUT'
DEFAULT_TIMEOUT = 300
# The variables jax's SLURM detection needs (jax/_src/clusters/slurm_cluster.py).
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
              'SLURM_LOCALID')
# JAX gives up (with a fatal error that kills the process) this long after we do.
_JAX_TIMEOUT_MARGIN = 60


class PeersMissingError(cli.UserError):
  """Not every process of the job joined within the timeout."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where a multi-host job's layout comes from; None fields are left to jax's detection.

  Attributes:
    source: 'explicit', 'slurm' or 'auto' (jax's detection: TPU VM pods, GKE, MPI).
    coordinator: 'host:port' of process 0.
    num_processes, process_id: the job's size and this process's index.
    timeout: seconds to wait for every process to join.
  """
  source: str
  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  timeout: int = DEFAULT_TIMEOUT


def _int(value, name: str, minimum: int) -> Optional[int]:
  if value is None or value == '':
    return None
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or number < minimum:
    raise cli.ConfigError(f'{name}: expected an integer >= {minimum}, got {value!r}')
  return number


def detect(multihost: bool = False, coordinator: Optional[str] = None,
           num_processes: Optional[int] = None, process_id: Optional[int] = None,
           timeout: Optional[int] = None,
           env: Optional[Mapping[str, str]] = None) -> Optional[Cluster]:
  """The job this process belongs to, or None for a single process (see the module doc).

  Arguments given win over the T5DUAL_* variables of `env` (default os.environ).
  Raises cli.ConfigError for a partial or inconsistent explicit layout.
  """
  env = os.environ if env is None else env
  coordinator = coordinator or env.get(ENV_COORDINATOR) or None
  num_processes = _int(num_processes if num_processes is not None
                       else env.get(ENV_NUM_PROCESSES), '--num_processes / '
                       f'{ENV_NUM_PROCESSES}', 1)
  process_id = _int(process_id if process_id is not None else env.get(ENV_PROCESS_ID),
                    f'--process_id / {ENV_PROCESS_ID}', 0)
  timeout = _int(timeout if timeout is not None else env.get(ENV_TIMEOUT),
                 f'--init_timeout / {ENV_TIMEOUT}', 1) or DEFAULT_TIMEOUT
  multihost = multihost or env.get(ENV_MULTIHOST, '').lower() in ('1', 'true', 'yes')
  explicit = {('--coordinator', ENV_COORDINATOR): coordinator,
              ('--num_processes', ENV_NUM_PROCESSES): num_processes,
              ('--process_id', ENV_PROCESS_ID): process_id}
  given = [flag for (flag, _), v in explicit.items() if v is not None]
  if given:
    if num_processes == 1 and coordinator is None:
      return None
    missing = [f'{flag} ({var})' for (flag, var), v in explicit.items() if v is None]
    if missing:
      raise cli.ConfigError(f'multi-host: {", ".join(given)} given but not '
                            f'{", ".join(missing)}')
    if ':' not in coordinator:
      raise cli.ConfigError(f'--coordinator / {ENV_COORDINATOR}: expected HOST:PORT, got '
                            f'{coordinator!r}')
    if process_id >= num_processes:
      raise cli.ConfigError(f'--process_id / {ENV_PROCESS_ID} {process_id} must be below '
                            f'--num_processes {num_processes}')
    if num_processes == 1:
      return None
    return Cluster('explicit', coordinator, num_processes, process_id, timeout)
  if all(v in env for v in SLURM_VARS):
    tasks = _int(env['SLURM_NTASKS'], 'SLURM_NTASKS', 1)
    if tasks == 1:
      return None
    return Cluster('slurm', None, tasks, _int(env['SLURM_PROCID'], 'SLURM_PROCID', 0),
                   timeout)
  if multihost:
    return Cluster('auto', timeout=timeout)
  return None


def initialize(cluster: Optional[Cluster]) -> None:
  """jax.distributed.initialize for `cluster` (see `detect`); None: nothing to do.

  Raises:
    PeersMissingError: not all processes joined within `cluster.timeout` seconds.
    cli.ConfigError: JAX rejected the layout, or found none (`--multihost` outside
      a TPU pod, SLURM step or MPI job without --coordinator etc.).
  """
  if cluster is None:
    return
  import jax
  if jax.distributed.is_initialized():
    return
  done = threading.Event()
  failure: list[BaseException] = []

  def connect():
    try:
      jax.distributed.initialize(cluster.coordinator, cluster.num_processes,
                                 cluster.process_id,
                                 initialization_timeout=cluster.timeout + _JAX_TIMEOUT_MARGIN)
    except BaseException as e:  # re-raised in the calling thread
      failure.append(e)
    finally:
      done.set()

  threading.Thread(target=connect, name='jax.distributed.initialize', daemon=True).start()
  if not done.wait(cluster.timeout):
    # JAX's service and client would block (or abort) at exit; nothing is left to clean up.
    atexit.register(_exit_now)
    coordinator, count, process = _seen_layout(cluster)
    raise PeersMissingError(
        f'multi-host start ({cluster.source}): process {process} waited {cluster.timeout} s '
        f'at coordinator {coordinator} for all {count} processes to join; start the same '
        f'command on every host, check that the coordinator is reachable, or raise '
        f'--init_timeout / {ENV_TIMEOUT}')
  if failure:
    e = failure[0]
    if cluster.source == 'auto' and isinstance(e, ValueError) and 'defined' in str(e):
      raise cli.ConfigError(  # jax's detection found no cluster
          'multi-host start: --multihost / T5DUAL_MULTIHOST found no TPU pod, SLURM step or '
          'MPI job to join; give --coordinator, --num_processes and --process_id') from e
    if isinstance(e, (ValueError, TypeError, RuntimeError)):
      raise cli.ConfigError(f'multi-host start ({cluster.source}): {e}'.splitlines()[0]
                            ) from e
    raise e
  log.info('process %d of %d joined (coordinator %s, %d local / %d devices)',
           jax.process_index(), jax.process_count(), _seen_layout(cluster)[0],
           jax.local_device_count(), jax.device_count())


def _or_unknown(value) -> str:
  return 'unknown' if value is None else str(value)


def _seen_layout(cluster: Cluster) -> tuple[str, str, str]:
  """(coordinator, process count, process id) as given, else as jax's detection found them
  (jax's private state, read only for this message), else 'unknown'."""
  try:
    from jax._src import distributed as jax_distributed
    state = jax_distributed.global_state
  except ImportError:
    state = None
  def pick(given, name):
    return _or_unknown(given if given is not None else getattr(state, name, None))
  return (pick(cluster.coordinator, 'coordinator_address'),
          pick(cluster.num_processes, 'num_processes'), pick(cluster.process_id, 'process_id'))


def _exit_now() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(2)


# --------------------------------------------------------------------------- flags

def add_flags(parser: argparse.ArgumentParser) -> None:
  """The multi-host flags every script shares (see the module doc)."""
  group = parser.add_argument_group(
      'multi-host (TPU pods, GPU clusters; see t5dual/distributed.py)')
  group.add_argument('--multihost', action='store_true',
                     help=f'join a multi-host job that jax detects (TPU VM pod); also '
                     f'{ENV_MULTIHOST}=1. SLURM steps and --coordinator need no flag')
  group.add_argument('--coordinator', default=None,
                     help=f'HOST:PORT of process 0 (or {ENV_COORDINATOR})')
  group.add_argument('--num_processes', type=int, default=None,
                     help=f'processes in the job (or {ENV_NUM_PROCESSES})')
  group.add_argument('--process_id', type=int, default=None,
                     help=f'index of this process (or {ENV_PROCESS_ID})')
  group.add_argument('--init_timeout', type=int, default=None,
                     help=f'seconds to wait for every process to join (or {ENV_TIMEOUT}; '
                     f'default {DEFAULT_TIMEOUT})')


def initialize_from_flags(args: argparse.Namespace) -> Optional[Cluster]:
  """`initialize(detect(...))` from the flags of `add_flags`, then `check_backend`;
  returns the cluster."""
  cluster = detect(args.multihost, args.coordinator, args.num_processes, args.process_id,
                   args.init_timeout)
  initialize(cluster)
  check_backend()
  return cluster


# --------------------------------------------------------------------------- the backend

class AcceleratorUnusedError(cli.UserError):
  """An accelerator is here but JAX runs on the CPU."""


# How the start-up line begins (tests read past it to a command's one error line).
BACKEND_LINE_PREFIX = 'JAX backend '


def check_backend(env: Optional[Mapping[str, str]] = None) -> str:
  """Logs (process 0) and returns the start-up line naming JAX's backend and devices;
  refuses in one line to run on the CPU when an accelerator is here (see
  t5dual/accelerator.py), unless T5DUAL_ACCELERATOR=cpu or JAX_PLATFORMS=cpu say so."""
  import jax
  from t5dual import accelerator
  env = os.environ if env is None else env
  backend = jax.default_backend()
  kinds = sorted({d.device_kind for d in jax.devices()})
  line = (f'{BACKEND_LINE_PREFIX}{backend}: {jax.device_count()} device(s) ({", ".join(kinds)}), '
          f'{jax.local_device_count()} on each of {jax.process_count()} process(es); '
          f'jax {jax.__version__}')
  if jax.process_index() == 0:
    log.info('%s', line)
  if backend != 'cpu' or env.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return line
  try:
    kind, why = accelerator.detect(env)
  except accelerator.Unsure:
    return line  # run.sh has said what to set; nothing here to refuse with confidence
  if kind != 'cpu':
    extra = accelerator.EXTRAS[kind]
    raise AcceleratorUnusedError(
        f'{why}, but JAX (jax {jax.__version__}) sees only the CPU: install the {extra!r} '
        f"extra (bash scripts/run.sh does: it detects the machine; or pip install -e "
        f"'.[{extra}]' in the project's .venv), or set {accelerator.ENV}=cpu to run on the "
        f'CPU')
  return line


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
  """--model_parallel, for the scripts that run a trained model on each host's devices."""
  parser.add_argument('--model_parallel', type=int, default=1,
                      help="split the model over this many of each host's devices (for "
                      'models that do not fit one); the batch is split over the rest')


def host_partitioner(model_parallel: int = 1):
  """The layout of per-host inference (export, eval run, rerank): this process's devices,
  (local devices / model_parallel) x model_parallel. Each host of a multi-host job encodes
  or scores its own share on it, without waiting for the others."""
  import jax
  from t5dual import partitioning
  return partitioning.Partitioner(num_partitions=model_parallel,
                                  devices=tuple(jax.local_devices()))


def parse_known_flags(argv) -> tuple[argparse.Namespace, list[str]]:
  """(the multi-host flags, the other arguments), for scripts with their own flag parsing."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  add_flags(parser)
  return parser.parse_known_args(list(argv))


# --------------------------------------------------------------------------- work split

def process_rows(count: int) -> range:
  """This process's contiguous share of `count` rows (the first processes take one more)."""
  import jax
  return range(*_share(count, jax.process_index(), jax.process_count()))


def _share(count: int, index: int, processes: int) -> tuple[int, int]:
  base, extra = divmod(count, processes)
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


def gather_rows(local, count: int):
  """Every process's `process_rows(count)` results [rows, ...] -> all `count` rows, in order,
  on every process (numpy). Single process: `local` itself."""
  import jax
  import numpy as np
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  width = -(-count // jax.process_count())  # rows of the largest share
  padded = np.zeros((width,) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  everything = np.asarray(multihost_utils.process_allgather(padded))  # [processes, width, ...]
  shares = [_share(count, p, jax.process_count()) for p in range(jax.process_count())]
  return np.concatenate([everything[p, :stop - start]
                         for p, (start, stop) in enumerate(shares)])
