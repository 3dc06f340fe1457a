"""The test tiers stay honest: a test recorded as slow (tests/DURATIONS.md) carries `slow`.

The fast tier is `-m "not slow and not multiprocess"`; a test that grew slow without the marker
would make it slow for everyone, so the record of measured durations is checked against the
markers of the tests collected in the same session (all of them in both tiers' commands).
"""
import pytest

import durations_record  # tests/helpers


def test_tests_recorded_as_slow_are_marked_slow(request):
  record = durations_record.read()
  assert record, f'{durations_record.RECORD} is missing or has no rows'
  collected = request.config.stash.get(durations_record.COLLECTED, {})
  unmarked, checked = durations_record.unmarked_slow_tests(record, collected)
  assert not unmarked, (
      f'recorded slower than {durations_record.SLOW_SECONDS:g} s in {durations_record.RECORD} '
      'but not marked slow (add @pytest.mark.slow, or make it fast and record it again with '
      f'{durations_record.ENV}=1):\n' + '\n'.join(f'  {t} ({s:.1f} s)' for t, s in unmarked))
  if not checked:
    pytest.skip('this session collected none of the recorded slow tests (run it with the suite: '
                'pytest tests -m "not slow and not multiprocess")')


def test_the_check_finds_an_unmarked_slow_test_even_after_a_file_split():
  record = {'tests/test_a.py::test_long[x]': (30.0, ''), 'tests/test_a.py::test_moved': (12.0, ''),
            'tests/test_a.py::test_quick': (3.0, ''), 'tests/test_gone.py::test_old': (50.0, '')}
  collected = {'tests/test_a.py::test_long[x]': {'parametrize'},
               'tests/test_a_slow.py::test_moved': {'slow'},
               'tests/test_a.py::test_quick': set()}
  assert durations_record.unmarked_slow_tests(record, collected) == (
      [('tests/test_a.py::test_long[x]', 30.0)], 2)
  collected['tests/test_a.py::test_long[x]'].add('slow')
  assert durations_record.unmarked_slow_tests(record, collected) == ([], 2)


def test_a_recorded_run_replaces_its_tests_rows_and_keeps_the_others(tmp_path):
  path = str(tmp_path / 'DURATIONS.md')
  durations_record.update({'t.py::a': 20.0, 't.py::b': 4.0, 't.py::c': 0.2}, '2 workers', path)
  first = durations_record.read(path)
  assert sorted(first) == ['t.py::a', 't.py::b'] and first['t.py::a'][0] == 20.0
  assert '2 workers' in first['t.py::a'][1]
  durations_record.update({'t.py::b': 0.5, 't.py::d': 11.0}, '1 process', path)
  second = durations_record.read(path)
  assert sorted(second) == ['t.py::a', 't.py::d']  # b became fast: its row goes
  assert second['t.py::a'] == first['t.py::a'] and '1 process' in second['t.py::d'][1]
  lines = (tmp_path / 'DURATIONS.md').read_text().splitlines()
  assert lines.index('| 20.0 | `t.py::a` | ' + second['t.py::a'][1] + ' |') < lines.index(
      '| 11.0 | `t.py::d` | ' + second['t.py::d'][1] + ' |')  # slowest first
