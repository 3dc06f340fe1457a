"""The record of the slowest tests (tests/DURATIONS.md), which keeps the test tiers honest.

`T5DUAL_RECORD_DURATIONS=1 bash scripts/run.sh test` (or any pytest run with that variable)
updates the record from the run's own timings; test_tiers.py reads it and fails when a test
recorded as slower than SLOW_SECONDS is not marked `slow`, so it cannot stay in the fast tier.
"""
import datetime
import os
import re

import pytest

RECORD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'DURATIONS.md')
ENV = 'T5DUAL_RECORD_DURATIONS'
# Recorded: a test's setup + call + teardown, so that a test pays for the module fixtures it
# builds first. Rows below MIN_SECONDS are left out; above SLOW_SECONDS a test must be `slow`.
MIN_SECONDS = 1.0
SLOW_SECONDS = 10.0
# Test id -> the markers of the collected test, before `-m` deselects (set by conftest.py).
COLLECTED = pytest.StashKey[dict]()

_HEADER = """# Test durations

The tests slower than {min:g} s (setup + call + teardown: the first test of a module pays for its
module's fixtures), slowest first. Rows are replaced by each run of their test with
`T5DUAL_RECORD_DURATIONS=1` (`T5DUAL_RECORD_DURATIONS=1 bash scripts/run.sh test` for all of them);
`tests/test_tiers.py` fails when a test slower than {slow:g} s here is not marked `slow`.

| seconds | test | run |
|---:|---|---|
"""
_ROW = re.compile(r'^\| *([0-9.]+) *\| *`([^`]+)` *\| *(.*?) *\|$')


def read(path=RECORD):
  """{test id: (seconds, run)} from the record; {} when there is none yet."""
  if not os.path.exists(path):
    return {}
  rows = {}
  with open(path) as f:
    for line in f:
      match = _ROW.match(line.strip())
      if match:
        rows[match.group(2)] = (float(match.group(1)), match.group(3))
  return rows


def update(seconds, workers, path=RECORD):
  """Replaces the rows of the tests this run timed ({test id: seconds}); keeps the others."""
  load = os.getloadavg()[0]
  run = (f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, {os.cpu_count()} cores, '
         f'{workers}, load {load:.1f}')
  rows = {test: row for test, row in read(path).items() if test not in seconds}
  rows.update({test: (s, run) for test, s in seconds.items() if s >= MIN_SECONDS})
  body = ''.join(f'| {s:.1f} | `{test}` | {when} |\n'
                 for test, (s, when) in sorted(rows.items(), key=lambda kv: -kv[1][0]))
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(_HEADER.format(min=MIN_SECONDS, slow=SLOW_SECONDS) + body)
  os.replace(tmp, path)


# The fast tier's one end-to-end train and resume (README, "Test tiers"): kept in the fast
# tier on purpose, whatever it costs, so that everyday runs still train, save and resume.
FAST_TIER_END_TO_END = ('tests/test_train_guards.py::'
                        'test_config_of_each_start_is_kept_and_a_failed_start_writes_none')


def unmarked_slow_tests(record, collected):
  """Checks the record ({test id: (seconds, run)}) against collected tests ({test id: markers}).

  Returns (unmarked, checked): the recorded tests slower than SLOW_SECONDS that are collected
  without `slow` as [(test id, seconds)], and how many slow ones were found among the collected.
  A recorded test that is not at its id any more (a file split in two) is found by its name
  ('test_x[case]') when exactly one collected test has that name.
  """
  by_name = {}
  for test in collected:
    by_name.setdefault(test.split('::', 1)[-1], []).append(test)
  unmarked, checked = [], 0
  for test, (seconds, _) in sorted(record.items()):
    if seconds <= SLOW_SECONDS or test == FAST_TIER_END_TO_END:
      continue
    found = [test] if test in collected else by_name.get(test.split('::', 1)[-1], [])
    if len(found) != 1:
      continue  # not collected in this session
    checked += 1
    if 'slow' not in collected[found[0]]:
      unmarked.append((found[0], seconds))
  return unmarked, checked
