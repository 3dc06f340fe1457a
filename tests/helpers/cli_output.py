"""What a user reads on stderr after a command that stopped on their mistake."""

from t5dual import distributed


def error_lines(stderr: str) -> list[str]:
  """stderr's lines past the start-up line naming JAX's backend (distributed.check_backend,
  logged before any work): a mistake the user can fix leaves exactly one, `error: ...`."""
  return [line for line in stderr.strip().splitlines()
          if distributed.BACKEND_LINE_PREFIX not in line]
