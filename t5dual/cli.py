"""What every command-line entry point shares: logging, a quiet JAX start-up, and
one-line errors for the user's mistakes.

A script's `main` raises `UserError` (or a subclass: `DataError`, `ConfigError`,
`ParameterError`) for anything the user can fix; `run_main` prints it as one `error: ...` line
and exits with status 2. Any other exception is an internal failure and keeps
its traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional, Sequence


class UserError(Exception):
  """Bad input or configuration; the message names the file and line or the key."""


class ConfigError(UserError, ValueError):
  """A configuration value (gin binding, flag) that cannot work."""


class ParameterError(ConfigError):
  """A bad value of the parameter `param` of `owner` (a function or class gin may configure).

  gin_utils.call_configured turns it into a message naming the gin binding or
  macro that set the value.
  """

  def __init__(self, owner: Callable, param: str, message: str):
    self.owner, self.param, self.message = owner, param, message
    module = owner.__module__.removeprefix('t5dual.')
    super().__init__(f'{module}.{owner.__qualname__}.{param}: {message}')


def is_int(value: Any) -> bool:
  """A Python or NumPy integer, not a bool (gin reads `True` where `1` was meant as
  happily as `1`, and bool is an int subclass)."""
  import numpy as np  # here, so a script's --help does not import NumPy
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_int(owner: Callable, param: str, value: Any, minimum: Optional[int] = None) -> None:
  """Raises ParameterError (naming owner.param) unless `value` is an integer
  (`is_int`) of at least `minimum`."""
  if not is_int(value) or (minimum is not None and value < minimum):
    wanted = {None: 'an integer', 0: 'a non-negative integer',
              1: 'a positive integer'}.get(minimum, f'an integer >= {minimum}')
    raise ParameterError(owner, param, f'must be {wanted}, got {value!r}')


# Operating-system errors about paths the user gave are the user's to fix too.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def plural(count: int, singular: str, plural_form: Optional[str] = None) -> str:
  """'1 document', '2 documents', '1 query', '3 queries' (`plural_form` for other words)."""
  if count == 1:
    return f'{count} {singular}'
  if plural_form is None:
    plural_form = (singular[:-1] + 'ies' if singular.endswith('y') and singular[-2:-1] not in
                   'aeiou' else singular + 'es' if singular.endswith(('s', 'x', 'ch', 'sh'))
                   else singular + 's')
  return f'{count} {plural_form}'


def cpu_model() -> str:
  """The processor's model name (for the machine line of benchmark tables)."""
  import platform
  try:
    with open('/proc/cpuinfo') as f:
      names = [ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')]
  except OSError:
    names = []
  return names[0] if names else platform.processor() or 'CPU'


def setup_logging(level: int = logging.INFO) -> None:
  """INFO lines of t5dual on stderr, without third-party chatter.

  `force=True` because importing orbax/absl installs a root handler first, which
  would otherwise make `basicConfig` a no-op and hide t5dual's own lines.
  """
  logging.basicConfig(level=level, format='%(asctime)s %(levelname)s %(message)s',
                      force=True)
  for name in ('absl', 'orbax', 'jax._src.xla_bridge', 'jax._src.distributed', 'bm25s'):
    # xla_bridge logs "Unable to initialize backend 'tpu'" at INFO on every
    # machine without a TPU; orbax/absl log every file they touch.
    logging.getLogger(name).setLevel(logging.WARNING)


def run_main(main: Callable[[Sequence[str]], Optional[int]],
             argv: Optional[Sequence[str]] = None) -> None:
  """Runs `main(argv)` and exits: 0, its return code, or 2 with one line on a UserError."""
  setup_logging()
  try:
    code = main(list(sys.argv[1:] if argv is None else argv))
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # a run stopped on purpose (preemption.PreemptedError) has a status
    status = getattr(type(e), 'exit_status', None)
    if status is None:
      raise
    print(f'stopped: {str(e).splitlines()[0]}', file=sys.stderr)  # gin appends context lines
    sys.exit(status)
  sys.exit(code or 0)
