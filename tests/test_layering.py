"""The layers of t5dual and what each may import (README, "Layers"), read from the source.

A module may import t5dual modules of its own layer or of a lower one, never of a higher
one; models and data are side by side and may not import each other (a model knows
nothing of files, a task nothing of a model's network). Imports inside functions count:
a lazy import is still a dependency.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / 't5dual'

# (layer, rank, modules): lowest first. Every module of t5dual/ is in exactly one layer;
# a name ending in '.*' stands for a package's modules.
LAYERS = (
    ('base', 0, ('t5dual', 'cli', 'sides', 'accelerator', 'preemption', 'prefetch', 'optim',
                 'fileio', 'gin_utils', 'vocab')),
    ('numerics', 1, ('t5', 'attention', 'losses', 'ranking_losses', 'partitioning',
                     'distributed')),
    ('contract', 2, ('model_api', 'gradients', 'layer_layout')),
    ('models', 3, ('dual_encoders', 'rerankers')),
    ('data', 3, ('data', 'data.*', 'corpus')),
    ('inference', 4, ('checkpoints', 'encoding', 'export', 'retrieval', 'bm25', 'evaluation',
                      'hard_negatives', 'diagnostics', 'rerank_runs', 'interop', 'interop.*')),
    ('training', 5, ('trainer', 'train_lib', 'planning', 'multistage')),
)

# Imports that cross the layers on purpose, each with its reason.
EXCEPTIONS = {
    ('t5dual.data.tasks', 't5dual.bm25'):
        'a ListTask without a first-stage run ranks the training split with BM25 at start-up',
}


def _layer_of(module: str):
  name = module.removeprefix('t5dual.') if module != 't5dual' else 't5dual'
  for layer, rank, members in LAYERS:
    for member in members:
      if name == member or (member.endswith('.*') and name.startswith(member[:-1])):
        return layer, rank
  return None


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _is_module(name: str) -> bool:
  path = ROOT.parent / name.replace('.', '/')
  return path.with_suffix('.py').exists() or (path / '__init__.py').exists()


def imports(path: pathlib.Path) -> set[str]:
  """The t5dual modules `path` imports, at any depth (`from t5dual.x import y` counts
  t5dual.x.y when y is a module, else t5dual.x)."""
  tree = ast.parse(path.read_text(), str(path))
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split('.')[0] == 't5dual')
    elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and
          node.module.split('.')[0] == 't5dual'):
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        out.add(full if _is_module(full) else node.module)
  return out


def _modules():
  return {_module_name(p): p for p in sorted(ROOT.rglob('*.py'))}


def test_every_module_has_a_layer():
  missing = sorted(m for m in _modules() if _layer_of(m) is None)
  assert not missing, f'add these modules to a layer in tests/test_layering.py: {missing}'


def test_no_module_imports_a_higher_layer_or_a_side_layer():
  problems = []
  for module, path in _modules().items():
    layer, rank = _layer_of(module)
    for dep in sorted(imports(path)):
      if dep == module or (module, dep) in EXCEPTIONS:
        continue
      dep_layer, dep_rank = _layer_of(dep)
      if dep_rank > rank or (dep_rank == rank and dep_layer != layer):
        problems.append(f'{module} ({layer}) imports {dep} ({dep_layer})')
  assert not problems, '\n'.join(problems)


def test_the_exceptions_are_still_needed():
  modules = _modules()
  stale = [pair for pair in EXCEPTIONS if pair[1] not in imports(modules[pair[0]])]
  assert not stale, f'remove from EXCEPTIONS (no longer imported): {stale}'


@pytest.mark.parametrize('source,expected', [
    ('from t5dual.data import tasks\n', {'t5dual.data.tasks'}),
    ('from t5dual import dual_encoders as m\n', {'t5dual.dual_encoders'}),
    ('def f():\n  from t5dual.t5 import EOS_ID\n', {'t5dual.t5'}),
    ('import t5dual.trainer\n', {'t5dual.trainer'}),
    ('from . import x\nimport jax\n', set()),
])
def test_the_import_reader_sees_every_form(tmp_path, source, expected):
  """The reader itself: lazy, aliased, dotted and `from package import module` imports
  all count, relative and third-party ones do not."""
  path = tmp_path / 'm.py'
  path.write_text(source)
  assert imports(path) == expected


def test_a_model_importing_data_is_caught(monkeypatch):
  """The rule is not vacuous: a models-layer module that imported the data layer fails."""
  modules = _modules()
  fake = {'t5dual.data.pipeline'}
  real = imports
  monkeypatch.setitem(globals(), 'imports',
                      lambda p: real(p) | fake if p == modules['t5dual.dual_encoders']
                      else real(p))
  with pytest.raises(AssertionError, match=r't5dual.dual_encoders \(models\) imports '
                                           r't5dual.data.pipeline \(data\)'):
    test_no_module_imports_a_higher_layer_or_a_side_layer()
