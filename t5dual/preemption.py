"""Stopping a training run cleanly when the machine is about to be taken away.

Preemptible TPU VMs, spot GPUs and SLURM send SIGTERM some seconds before they
stop a job. A run that dies there loses everything since its last checkpoint;
instead, `Watcher` notes the signal, the trainer saves a checkpoint at the next
step boundary and stops with `PREEMPTED_EXIT_STATUS`, which a launcher takes as
"restart me" (the restarted run resumes from that checkpoint, with the same
batches: data/pipeline.py).

Every process of a multi-host job must save the same step, or the checkpoint is
torn. JAX's coordination service already catches SIGTERM in each process of a
`jax.distributed` job and agrees on a step at which all of them stop (its
preemption sync point, what T5X and MaxText use); a single process has no
service, so a Python handler sets a flag instead.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax


log = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): a temporary failure, run the same command again. Distinct from 0
# (done), 1 (internal failure), 2 (user error) and 128 + 15 (killed by SIGTERM unsaved).
PREEMPTED_EXIT_STATUS = 75


class PreemptedError(Exception):
  """The run saved a checkpoint after SIGTERM and stopped; running it again resumes it.

  Not a `cli.UserError`: `cli.run_main` prints its one line and exits with
  PREEMPTED_EXIT_STATUS rather than 2.
  """

  exit_status = PREEMPTED_EXIT_STATUS


class Watcher:
  """`reached(step)` is True at the first step boundary after SIGTERM, the same step on
  every process of the job. Use as a context manager around the training loop."""

  def __init__(self):
    self._multihost = jax.process_count() > 1
    self._signalled = threading.Event()
    self._previous = None
    self._sync_unavailable = False

  def __enter__(self) -> 'Watcher':
    # A jax.distributed job's SIGTERM is caught by JAX's own handler (installing ours would
    # replace it); signal handlers can only be set from the main thread.
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    if not self._signalled.is_set():
      log.warning('SIGTERM: saving a checkpoint at the next step boundary, then stopping')
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process must call it at every step."""
    if not self._multihost:
      return self._signalled.is_set()
    if self._sync_unavailable:
      return False
    from jax.experimental import multihost_utils
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError as e:  # jax.distributed started without its preemption service
      log.warning('no preemption sync point in this job (%s): SIGTERM ends it unsaved',
                  str(e).splitlines()[0])
      self._sync_unavailable = True
      return False
