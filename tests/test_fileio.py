"""fileio: a path holds its old content or the complete new one, never a partial write."""

import json
import os

import numpy as np
import pytest

from t5dual import fileio


class Interrupted(Exception):
  pass


def test_content_appears_only_when_the_block_succeeds(tmp_path):
  path = str(tmp_path / 'out.txt')
  with fileio.atomic_write(path) as f:
    f.write('first half ')
    assert not os.path.exists(path)
    f.write('second half')
  assert open(path).read() == 'first half second half'
  assert os.listdir(tmp_path) == ['out.txt']


def test_an_exception_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  path = tmp_path / 'out.txt'
  path.write_text('old')
  with pytest.raises(Interrupted):
    with fileio.atomic_write(str(path)) as f:
      f.write('new, partial')
      raise Interrupted
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['out.txt']


def test_an_exception_before_any_write_leaves_nothing(tmp_path):
  with pytest.raises(Interrupted):
    with fileio.atomic_path(str(tmp_path / 'never.npy')):
      raise Interrupted
  assert os.listdir(tmp_path) == []


def test_binary_writes_and_per_process_temporary(tmp_path):
  path = str(tmp_path / 'x.npy')
  with fileio.atomic_write(path, 'wb', tmp_suffix='.tmp3') as f:
    assert f.name == path + '.tmp3'
    np.save(f, np.arange(4, dtype=np.float32))
  np.testing.assert_array_equal(np.load(path), np.arange(4, dtype=np.float32))


def test_atomic_path_for_writers_that_take_a_path(tmp_path):
  path = str(tmp_path / 'x.txt')
  with fileio.atomic_path(path) as tmp:
    np.savetxt(tmp, np.ones(3))
    assert not os.path.exists(path)
  np.testing.assert_array_equal(np.loadtxt(path), np.ones(3))


def test_write_json_ends_with_a_newline_and_replaces(tmp_path):
  path = str(tmp_path / 'r.json')
  fileio.write_json(path, {'b': 1, 'a': 2}, sort_keys=True)
  fileio.write_json(path, {'b': 3, 'a': 4}, indent=1, sort_keys=True)
  text = open(path).read()
  assert text.endswith('}\n') and text.index('"a"') < text.index('"b"')
  assert json.loads(text) == {'a': 4, 'b': 3}


def test_append_mode_is_refused(tmp_path):
  with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
    with fileio.atomic_write(str(tmp_path / 'x'), 'a'):
      pass


def test_atomic_symlink_repoints_a_link(tmp_path):
  (tmp_path / 'one').mkdir()
  (tmp_path / 'two').mkdir()
  link = str(tmp_path / 'final')
  fileio.atomic_symlink('one', link)
  fileio.atomic_symlink('two', link)
  assert os.readlink(link) == 'two'
  assert sorted(os.listdir(tmp_path)) == ['final', 'one', 'two']
