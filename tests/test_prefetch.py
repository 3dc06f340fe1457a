"""Prefetching batches (t5dual/prefetch.py): same batches, same order, errors where they were."""

import threading

import pytest

from t5dual import prefetch, trainer


class _Maker:
  """Records which steps were made, on which thread; fails at `fail_at`."""

  def __init__(self, fail_at=None):
    self.made, self.threads, self.fail_at = [], set(), fail_at
    self.lock = threading.Lock()

  def __call__(self, step):
    with self.lock:
      self.made.append(step)
      self.threads.add(threading.current_thread().name)
    if step == self.fail_at:
      raise ValueError(f'data.jsonl line {step}: bad example')
    return {'step': step}


@pytest.mark.parametrize('size', [0, 1, 2, 5])
def test_batches_come_in_order_and_are_made_once(size):
  make = _Maker()
  got = list(prefetch.prefetch(make, range(3, 10), size))
  assert got == [(s, {'step': s}) for s in range(3, 10)]
  assert make.made == list(range(3, 10))
  on_caller = make.threads == {threading.current_thread().name}
  assert on_caller == (size == 0)


def test_at_most_size_batches_are_made_ahead():
  make = _Maker()
  it = prefetch.prefetch(make, range(100), 3)
  step, _ = next(it)
  assert step == 0
  # While step 0 is consumed: steps 1..3 are in flight, nothing beyond.
  it.close()
  assert max(make.made) <= 3


@pytest.mark.parametrize('size', [0, 2])
def test_an_error_surfaces_unchanged_at_its_step(size):
  make = _Maker(fail_at=6)
  seen = []
  with pytest.raises(ValueError, match=r'^data.jsonl line 6: bad example$'):
    for step, _ in prefetch.prefetch(make, range(3, 12), size):
      seen.append(step)
  assert seen == [3, 4, 5]
  assert max(make.made) <= 6 + size


def test_prefetch_is_a_trainer_setting():
  assert trainer.TrainerConfig().prefetch == 2
  with pytest.raises(trainer.ParameterError,
                     match=r'^trainer.TrainerConfig.prefetch: must be a non-negative integer, '
                           r'got -1$'):
    trainer.TrainerConfig(prefetch=-1)
