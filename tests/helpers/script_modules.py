"""The command-line scripts in scripts/ as modules, for tests that call their main()."""

import importlib.util
import pathlib

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / 'scripts'


def load_script(name: str):
  """scripts/<name>.py imported as a module (each call a fresh module)."""
  spec = importlib.util.spec_from_file_location(f't5dual_script_{name}', SCRIPTS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
