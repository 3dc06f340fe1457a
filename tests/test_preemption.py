"""t5dual.preemption in one process: SIGTERM noted (not fatal) inside a Watcher, the handler
put back after it, and a preempted run's exit status and line. Whole runs stopped by SIGTERM,
on one process and on two, are in test_pod_shapes.py."""

import os
import signal

import pytest

from t5dual import cli, preemption


def test_sigterm_inside_a_watcher_is_noted_at_the_next_step_boundary():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher() as watcher:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the watcher
    assert watcher.reached(2) and watcher.reached(3)
  assert signal.getsignal(signal.SIGTERM) is before


def test_a_preempted_run_exits_with_the_restart_status_and_one_line(capsys):
  def main(argv):
    raise preemption.PreemptedError('SIGTERM: saved step 7 of 10 in /tmp/x; run the same '
                                    "command again\n  In call to configurable 'run'")
  with pytest.raises(SystemExit) as stopped:
    cli.run_main(main, [])
  assert stopped.value.code == preemption.PREEMPTED_EXIT_STATUS == 75
  assert capsys.readouterr().err.splitlines() == [
      'stopped: SIGTERM: saved step 7 of 10 in /tmp/x; run the same command again']


def test_other_failures_keep_their_traceback():
  def main(argv):
    raise RuntimeError('internal')
  with pytest.raises(RuntimeError, match='internal'):
    cli.run_main(main, [])
