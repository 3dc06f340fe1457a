"""Batches made and copied to the devices ahead of the step that consumes them.

A train step is dispatched asynchronously, so the host is free while the
device computes; `prefetch` uses that time to build the next batches
(tokenising, padding: batchers are pure functions of the step) and to start
their host-to-device copies on a background thread, so that the step never
waits for its input. With size 0 everything happens in the caller's thread, as
a plain loop would.

A failure making a batch (say a data error naming a file and line) is raised
unchanged where the loop asks for that batch, after every earlier batch was
delivered, exactly as without prefetching.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar('T')


def prefetch(make: Callable[[int], T], steps: Iterable[int], size: int = 2
             ) -> Iterator[tuple[int, T]]:
  """Yields (step, make(step)) in the order of `steps`, up to `size` made ahead.

  Args:
    make: builds (and may put on the devices) the batch of a step; called from
      one background thread, in step order, when size > 0.
    steps: the steps, in order.
    size: how many batches are made ahead of the one being consumed; 0 makes
      each one when it is asked for.
  """
  if size <= 0:
    for step in steps:
      yield step, make(step)
    return
  pending: collections.deque = collections.deque()
  steps = iter(steps)
  # One worker keeps the calls of `make` in step order (batchers need not be thread-safe).
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='t5dual-prefetch') as pool:
    try:
      def fill():
        while len(pending) < size + 1:
          step = next(steps, None)
          if step is None:
            return
          pending.append((step, pool.submit(make, step)))
      while True:
        fill()  # the batch to consume now and `size` after it
        if not pending:
          return
        step, future = pending.popleft()
        yield step, future.result()
    finally:
      # The consumer stopped early (an error, a break): make nothing more.
      for _, future in pending:
        future.cancel()
