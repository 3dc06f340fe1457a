"""The gin internals t5dual reads (t5dual/gin_utils.py, section "gin internals"), each
exercised against the installed gin-config: an upgrade that renames or reshapes one fails
here with a message naming the adapter function to fix."""

import contextlib

import gin
import pytest

from t5dual import cli, gin_utils

CONFIG = '''
from __gin__ import dynamic_registration
from t5dual import cli
COUNT = 2
cli.plural.count = %COUNT
cli.plural.singular = 'query'
stage/cli.plural.plural_form = 'queries'
cli.check_int.owner = @stage/cli.plural
cli.check_int.value = %gin.REQUIRED
'''


@pytest.fixture
def parsed():
  with gin.unlock_config():
    gin.clear_config()
    gin.parse_config(CONFIG)
    try:
      yield
    finally:
      gin.clear_config()


@contextlib.contextmanager
def adapter(name):
  """Turns any failure into one naming gin_utils.`name` and the installed gin."""
  try:
    yield
  except Exception as e:  # an AttributeError or KeyError from a renamed internal, or a wrong shape
    import importlib.metadata
    version = importlib.metadata.version('gin-config')
    pytest.fail(f'gin-config {version} changed an internal that gin_utils.{name} reads '
                f'(see its docstring): fix gin_utils.{name}. {type(e).__name__}: {e}')


def test_gin_bindings_is_the_table_of_parsed_bindings(parsed):
  with adapter('gin_bindings'):
    table = gin_utils.gin_bindings()
    plural = 't5dual.cli.plural'
    assert table[('', plural)]['singular'] == 'query'
    assert table[('stage', plural)] == {'plural_form': 'queries'}
    assert table[('COUNT', gin_utils.MACRO)] == {'value': 2}
    assert set(table[('', 't5dual.cli.check_int')]) == {'owner', 'value'}


def test_configurable_function_finds_a_configurable_by_the_name_gin_messages_use(parsed):
  with adapter('configurable_function'):
    assert gin_utils.configurable_function('cli.plural') is cli.plural
    assert gin_utils.configurable_function('t5dual.cli.plural') is cli.plural
    assert gin_utils.configurable_function('cli.no_such_function') is None


def test_as_reference_reads_configurable_macro_and_required_references(parsed):
  with adapter('as_reference'):
    table = gin_utils.gin_bindings()
    count = gin_utils.as_reference(table[('', 't5dual.cli.plural')]['count'])
    assert count == gin_utils.Reference(('COUNT',), gin_utils.MACRO,
                                        ('COUNT', gin_utils.MACRO), None)
    owner = gin_utils.as_reference(table[('', 't5dual.cli.check_int')]['owner'])
    assert (owner.scopes, owner.selector, owner.key, owner.function) == (
        ('stage',), 't5dual.cli.plural', ('stage', 't5dual.cli.plural'), cli.plural)
    required = gin_utils.as_reference(table[('', 't5dual.cli.check_int')]['value'])
    assert required.key == gin_utils.REQUIRED
    assert gin_utils.as_reference('query') is None
    assert gin_utils.as_reference(2) is None


def test_parse_binding_keys_parses_without_applying(parsed):
  with adapter('parse_binding_keys'):
    before = {k: dict(v) for k, v in gin_utils.gin_bindings().items()}
    assert gin_utils.parse_binding_keys('cli.plural.count = 5') == [
        ('', 't5dual.cli.plural', 'count')]
    assert gin_utils.parse_binding_keys("stage/cli.plural.singular = 'x'") == [
        ('stage', 't5dual.cli.plural', 'singular')]
    assert gin_utils.parse_binding_keys('COUNT = 7') == [('COUNT', gin_utils.MACRO, 'value')]
    assert gin_utils.parse_binding_keys('stage/COUNT = 7') == [
        ('stage/COUNT', gin_utils.MACRO, 'value')]
    assert {k: dict(v) for k, v in gin_utils.gin_bindings().items()} == before
