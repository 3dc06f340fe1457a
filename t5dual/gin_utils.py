"""gin at the edges: T5X-style command-line flags, checking them, running a configured function.

  --gin_file=gin/models/sde.gin        (repeatable; searched in --gin_search_paths,
                                        the repository root, gin/ and configs/)
  --gin.MODEL_DIR="'/tmp/run'"         (a binding: --gin.X=V becomes `X = V`)
  --gin_bindings="X = V"               (repeatable, as in T5X)

gin accepts a binding of a macro that nothing references (`--gin.TRAIN_STEPSS=5`
defines a new macro and the run trains the default number of steps), so
`check_bindings_used` refuses every command-line binding that the configured
function cannot reach, or that a more specific scope overrides wherever it
would apply, and every scoped binding of the gin files that no call sees. All
errors are `cli.ConfigError`s with one-line messages.

Scopes set up several calls of one function, T5X-style: the stages of a
multistage chain (configs/runs/two_stage_rerank.gin) are `@stage/...`
references, named by `scope_name` and set up by `in_scope(train_lib.configured_setup)`
(train_lib.run's configuration in the stage's scope, `configured_arguments`), so the
chain itself (t5dual/multistage.py) needs no gin.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import functools
import inspect
import os
import re
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import gin
from gin import config as gin_config
from gin import config_parser

from t5dual import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (os.getcwd(), REPO_ROOT, os.path.join(REPO_ROOT, 'gin'),
                        os.path.join(REPO_ROOT, 'configs'))
MACRO = 'gin.macro'
REQUIRED = ('gin.REQUIRED', 'gin.constant')  # the config key of %gin.REQUIRED


# --------------------------------------------------------------------------- gin internals
#
# gin-config (0.5.0) has no public API for what the checks below need: the table
# of parsed bindings, the references inside a bound value, a configurable by its
# name, and parsing a binding without applying it. These functions are the only
# code that reads gin's internals, one function per internal, each naming it;
# tests/test_gin_adapter.py runs every one against the installed gin, so an
# upgrade that renames an internal fails there, naming the function to fix.


class Reference(NamedTuple):
  """A reference inside a bound value: `@f`, `@f()`, `@scope/f`, `%MACRO`, `%gin.REQUIRED`.

  scopes: the scopes `@scope/f` calls f in (() for `@f`); for `%M`, M's name
    split at '/' (gin stores a macro as the configurable 'gin.macro' in scope M).
  selector: the referenced configurable's selector, MACRO for a macro.
  key: gin's config key, (scope, selector); REQUIRED for %gin.REQUIRED.
  function: the referenced function or class, None for a macro or constant.
  """
  scopes: tuple[str, ...]
  selector: str
  key: tuple[str, str]
  function: Optional[Callable]


def gin_bindings() -> dict[tuple[str, str], dict[str, Any]]:
  """Every binding parsed so far, (scope, selector) -> {param: value}; macro M is
  (M, MACRO) -> {'value': ...}. gin's own table (`gin.config._CONFIG`), not a copy:
  read it, never write it."""
  return gin_config._CONFIG


def configurable_function(name: str) -> Optional[Callable]:
  """The function or class registered as the configurable `name` (as gin's error
  messages spell it), or None where none is. Reads
  `gin.config._parse_context().get_configurable(name).wrapped`."""
  configurable = gin_config._parse_context().get_configurable(name)
  return None if configurable is None else configurable.wrapped


def as_reference(value: Any) -> Optional[Reference]:
  """The `Reference` a bound value is, or None for a plain value. Reads
  gin.config.ConfigurableReference's `scopes`, `config_key` and `configurable.wrapped`."""
  if not isinstance(value, gin_config.ConfigurableReference):
    return None
  key = tuple(value.config_key)
  # A macro or constant (%gin.REQUIRED) is configurable too, wrapping gin's own function.
  plain = key[1] in (MACRO, REQUIRED[1])
  function = None if plain else getattr(value.configurable, 'wrapped', None)
  return Reference(tuple(value.scopes or ()), key[1], key, function)


def parse_binding_keys(binding: str) -> list[tuple[str, str, str]]:
  """The bindings (scope, selector, param) a binding string sets, without applying it;
  macro M: (M, MACRO, 'value'). Uses gin.config_parser.ConfigParser with
  gin.config.ParserDelegate, BindingStatement and gin.config.ParsedBindingKey."""
  keys = []
  for statement in config_parser.ConfigParser(binding, gin_config.ParserDelegate(True)):
    if not isinstance(statement, config_parser.BindingStatement):
      continue
    if not statement.arg_name:
      name = f'{statement.scope}/{statement.selector}' if statement.scope else statement.selector
      keys.append((name, MACRO, 'value'))
    else:
      parsed = gin_config.ParsedBindingKey.parse(
          (statement.scope, statement.selector, statement.arg_name))
      keys.append((*parsed.config_key, parsed.arg_name))
  return keys


def parse_flags(argv: Sequence[str]) -> tuple[list[str], list[str], argparse.Namespace]:
  """Splits argv into gin files, gin bindings, and the remaining known flags."""
  parser = argparse.ArgumentParser(description='t5dual (gin-configured)')
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument('--gin_search_paths', action='append', default=[])
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise cli.ConfigError(f'{arg}: expected --gin.NAME=VALUE')
      bindings.append(f'{name} = {value}')
    else:
      rest.append(arg)
  args = parser.parse_args(rest)
  return args.gin_file, args.gin_bindings + bindings, args


def _one_line(message: str) -> str:
  return re.sub(r'\s*\n\s*', ' | ', message.strip())


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  for path in list(search_paths) + list(DEFAULT_SEARCH_PATHS):
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(files), _with_imports(bindings),
                                        finalize_config=False)
  except (ValueError, KeyError, IOError, SyntaxError, TypeError) as e:
    # gin's messages name the file/line or binding, over several lines.
    raise cli.ConfigError(f'gin configuration: {_one_line(str(e))}{_suggestion(str(e))}'
                          ) from None


def _with_imports(bindings: Sequence[str]) -> list[str]:
  """Command-line bindings that may reference any t5dual function (`@ranking_losses.X`).

  With dynamic registration a reference resolves only through an import in the
  same parse; gin files import what they use, but a command-line binding such as
  --gin.LOSS_FN=@ranking_losses.margin_mse_loss names a module its own way.
  """
  if not any(re.search(r'@(?:\w+/)*\w+\.\w+', b) for b in bindings):
    return list(bindings)
  # In a dynamic-registration parse every configurable needs its import, the
  # bindings' own keys (`rerankers.RerankerConfig.x = ...`) included.
  modules = sorted({m for b in bindings for m in re.findall(r'\b(\w+)\.\w+', b)
                    if _is_t5dual_module(m)})
  return (['from __gin__ import dynamic_registration'] +
          [f'from t5dual import {m}' for m in modules] + list(bindings))


def _is_t5dual_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(f't5dual.{name}') is not None
  except (ImportError, ValueError):
    return False


def _suggestion(gin_message: str) -> str:
  """' (did you mean ...?)' for gin's unknown-configurable and unknown-parameter errors."""
  unknown = re.match(r"No configurable matching '([^']+)'", gin_message)
  if unknown:
    name, known = unknown.group(1), sorted({
        _short(selector) for _, selector in gin_bindings() if selector != MACRO})
  else:
    unknown = re.match(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'",
                       gin_message)
    if not unknown:
      return ''
    function = configurable_function(unknown.group(1))
    try:
      known = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # None, or a callable without a signature
      return ''
    name = unknown.group(2)
  near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
  return f' (did you mean {" or ".join(near)}?)' if near else ''


# --------------------------------------------------------------------------- bindings used

def _references(value: Any) -> Iterator[Reference]:
  """The configurable and macro references inside a bound value."""
  reference = as_reference(value)
  if reference is not None:
    yield reference
  elif isinstance(value, (list, tuple, set, frozenset)):
    for v in value:
      yield from _references(v)
  elif isinstance(value, dict):
    for k, v in value.items():
      yield from _references(k)
      yield from _references(v)


def _selector(fn: Callable) -> str:
  """The selector gin's dynamic registration gives `fn` (module.qualname)."""
  return f'{fn.__module__}.{fn.__qualname__}'


def _short(selector: str) -> str:
  return selector.removeprefix('t5dual.')


def _reachable(root: Callable, calls: Optional[dict] = None) -> tuple[set, dict, list]:
  """What calling the configured `root` may use, following gin's scoping rules.

  A configurable called in scope a/b takes each parameter from the most
  specific of the bindings in '', 'a' and 'a/b'; the less specific ones are
  overridden there, so only the effective binding and what it references count.

  Returns:
    used: bindings that take effect somewhere, as (scope, selector, param); a
      macro M is (M, 'gin.macro', 'value').
    undefined: macros referenced but never defined, name -> who references it.
    required: the effective bindings left at %gin.REQUIRED.
  With `calls`, also fills it: (scope, selector) -> {param: effective value}.
  """
  used, undefined, required, seen = set(), {}, set(), set()
  stack = [((), _selector(root))]
  while stack:
    scope, selector = stack.pop()
    if (scope, selector) in seen:
      continue
    seen.add((scope, selector))
    effective = {}
    for i in range(len(scope) + 1):
      key = ('/'.join(scope[:i]), selector)
      for param, value in gin_bindings().get(key, {}).items():
        effective[param] = (key, value)
    if calls is not None:
      calls[scope, selector] = {param: value for param, (_, value) in effective.items()}
    for param, (key, value) in effective.items():
      used.add((*key, param))
      who = key[0] if selector == MACRO else _short(selector)
      for ref in _references(value):
        # `@x/f` calls f in scope x (replacing the current one); `@f` keeps it.
        ref_scope = ref.scopes or scope
        ref_selector = ref.selector
        if ref.key == REQUIRED:
          required.add(who if selector == MACRO else f'{who}.{param}')
          continue
        macro_name = '/'.join(ref_scope)
        if ref_selector == MACRO and (macro_name, MACRO) not in gin_bindings():
          undefined.setdefault(macro_name, who)
        stack.append((ref_scope, ref_selector))
  return used, undefined, sorted(required)


def _shown_binding(scope: str, selector: str, param: str) -> str:
  if selector == MACRO:
    return scope
  return f'{scope}/{_short(selector)}.{param}' if scope else f'{_short(selector)}.{param}'


def _unused_binding_hint(scope: str, selector: str, param: str, used: set) -> tuple[str, str]:
  """(what is unused, a hint naming what is used instead) for an unused binding."""
  if selector == MACRO:
    known = sorted(s for s, sel, _ in used if sel == MACRO)
    name = scope
  else:
    elsewhere = sorted(_shown_binding(s, sel, p) for s, sel, p in used
                       if (sel, p) == (selector, param) and s != scope)
    if any(s == scope and sel == selector for s, sel, _ in used):
      # The configurable runs in this scope, but the parameter is set more specifically.
      name = _shown_binding(scope, selector, param)
      if elsewhere:
        return name, f'overridden by {", ".join(elsewhere)}'
      known = sorted(p for s, sel, p in used if (s, sel) == (scope, selector))
      near = difflib.get_close_matches(param, known, n=3, cutoff=0.6)
      return name, f'did you mean {" or ".join(near)}?' if near else f'used: {", ".join(known)}'
    name = f'{scope}/{_short(selector)}' if scope else _short(selector)
    known = sorted({f'{s}/{_short(sel)}' if s else _short(sel)
                    for s, sel, _ in used if sel != MACRO})
  near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
  return name, f'did you mean {" or ".join(near)}?' if near else f'used: {", ".join(known)}'


def check_bindings_used(bindings: Sequence[str], root: Callable,
                        scoped_bindings: bool = True) -> None:
  """Refuses command-line bindings that calling the configured `root` would never use.

  Call after `parse_gin` and before `call_configured(root)`. Also refuses what
  would fail only once `root` runs: a macro it needs that nobody defined (a
  misspelt `%NAME` in a binding) and a `%gin.REQUIRED` left unset. With
  `scoped_bindings`, every scoped binding of the gin files (`stage/f.x = ...`,
  `stage/MACRO = ...`) must take effect too: scopes are how one configuration
  sets up several calls of one function (e.g. the stages of a multistage
  chain), and a scoped binding that no call sees is a mistake (a misspelt
  scope, or a value built from a macro, which gin evaluates outside every scope).

  Raises:
    cli.ConfigError: naming the binding and the nearest names that are used.
  """
  calls = {}
  used, undefined, required = _reachable(root, calls)
  _check_model_features(calls)
  macros_defined = sorted(scope for scope, selector in gin_bindings() if selector == MACRO)
  checked = [(b.strip(), key) for b in bindings for key in parse_binding_keys(b)]
  if scoped_bindings:
    for (scope, selector), params in gin_bindings().items():
      if '/' in scope if selector == MACRO else scope:
        checked += [(_shown_binding(scope, selector, p), (scope, selector, p)) for p in params]
  for binding, key in checked:
    if key in used:
      continue
    name, hint = _unused_binding_hint(*key, used)
    if key[1] == MACRO and '/' in key[0]:
      hint += ('; gin evaluates %MACRO outside every scope: bind the scoped configurable '
               'instead (e.g. stage/rerankers.RerankerModel.loss_fn)')
    raise cli.ConfigError(f'gin binding `{binding}`: nothing in the configuration '
                          f'of {_short(_selector(root))} uses {name} ({hint})')
  for name, who in sorted(undefined.items()):
    near = difflib.get_close_matches(name, macros_defined, n=3, cutoff=0.6)
    hint = f'; did you mean {" or ".join(near)}?' if near else ''
    raise cli.ConfigError(f'macro %{name} (used by {who}) is never defined{hint}')
  if required:
    raise cli.ConfigError(f'{", ".join(required)} must be set, e.g. --gin.{required[0]}=...')


# The run file(s) that give a model's features their lengths (TASK_FEATURE_LENGTHS).
_RUN_FILES = {
    ('inputs',): 'add configs/runs/rerank.gin after configs/runs/finetune.gin (a reranker reads '
                 "one sequence, 'inputs', of INPUT_LENGTH tokens)",
    ('inputs', 'targets'): 'configs/runs/finetune.gin alone is the run file of a dual encoder '
                           '(configs/runs/rerank.gin is for rerankers: drop it)',
}


def _resolve(value: Any) -> tuple[Any, list[str]]:
  """(value, the macros followed to it) of a bound value that may be %MACRO."""
  names = []
  while (ref := as_reference(value)) is not None and ref.selector == MACRO and ref.scopes:
    names.append('/'.join(ref.scopes))
    value = gin_bindings().get((names[-1], MACRO), {}).get('value')
  return value, names


def _check_model_features(calls: dict) -> None:
  """A model of one family with the run file of another (a reranker model file with the
  dual encoder's run file, or the reverse) is named as such, before gin fails on what the
  other family's files do not define."""
  for (_, selector), params in calls.items():
    if 'model' not in params or 'task_feature_lengths' not in params:
      continue
    model, _ = _resolve(params['model'])
    lengths, names = _resolve(params['task_feature_lengths'])
    model_ref = as_reference(model)
    wrapped = None if model_ref is None else model_ref.function
    needs = getattr(wrapped, 'feature_names', None)
    if not isinstance(lengths, dict) or not isinstance(needs, tuple):
      continue
    if set(lengths) != set(needs):
      shown = names[0] if names else f'{_short(selector)}.task_feature_lengths'
      hint = _RUN_FILES.get(tuple(sorted(needs)), 'the run file of this kind of model')
      raise cli.ConfigError(
          f'the model ({_short(_selector(wrapped))}) reads the features {sorted(needs)}, but '
          f'{shown} gives lengths of {sorted(lengths)}: {hint}')


def is_bound(fn: Callable) -> bool:
  """Whether the gin configuration binds any parameter of `fn` (outside any scope)."""
  return ('', _selector(fn)) in gin_bindings()


def bound_parameters(fn: Callable) -> set[str]:
  """The parameters of `fn` the gin configuration binds (outside any scope)."""
  return set(gin_bindings().get(('', _selector(fn)), {}))


# --------------------------------------------------------------------------- stage scopes

def scope_name() -> str:
  """The gin scope this is evaluated in ('' outside any), e.g. `name = @gin_utils.scope_name()`."""
  return gin.current_scope_str()


def in_scope(fn: Callable) -> Callable:
  """`fn`, called later in the gin scope this is evaluated in.

  gin passes an unscoped reference `@f` as f itself, which looks up its
  bindings in whatever scope is active when it is finally called. Evaluated
  in a stage's scope (`train = @gin_utils.in_scope()` with `in_scope.fn =
  @train_lib.run`, inside `@stage/multistage.Stage()`), this returns a
  function that re-enters that scope, so the caller needs no gin. A
  `cli.ParameterError` raised inside records the scope, so the error names
  the scoped binding that set the bad value.
  """
  scope = gin.current_scope()

  @functools.wraps(fn)
  def call(*args, **kwargs):
    try:
      with gin.config_scope(list(scope)):
        return fn(*args, **kwargs)
    except cli.UserError as e:
      if getattr(e, 'param', None) and not getattr(e, 'scope', None):
        e.scope = '/'.join(scope)
      raise

  return call


# --------------------------------------------------------------------------- calling

def _binding_name(owner: Callable, param: str, scope: str = '') -> str:
  """How the configuration sets `param` of `owner` called in `scope`: 'MACRO' or
  '[scope/]module.fn.param' (the most specific binding that applies)."""
  parts = scope.split('/') if scope else []
  bound = [s for s in ('/'.join(parts[:i]) for i in range(len(parts), -1, -1))
           if param in gin_bindings().get((s, _selector(owner)), {})]
  where = bound[0] if bound else ''
  name = _shown_binding(where, _selector(owner), param)
  _, macros = _resolve(gin_bindings().get((where, _selector(owner)), {}).get(param))
  return f'{" = ".join(macros)} ({name})' if macros else name


def _strip_gin_context(message: str) -> str:
  """Drops the '  In call to configurable ...' lines gin appends to an exception."""
  return message.split('\n  In call to configurable')[0].strip()


def _innermost_configurable(message: str) -> Optional[str]:
  found = re.findall(r"\n  In call to configurable '([^']+)'", message)
  return found[0] if found else None


def call_configured(fn: Callable, **kwargs):
  """Calls the gin-configured version of `fn` (registered dynamically by the gin files).

  Errors the user can fix come out as one-line `cli.UserError`s: a
  `cli.ParameterError` names the gin binding (or macro) that set the bad
  value, and a ValueError/TypeError raised while gin builds one of fn's
  configured arguments (e.g. a config dataclass refusing a value) names that
  configurable.
  """
  try:
    return gin.get_configurable(fn)(**kwargs)
  except cli.USER_ERRORS as e:
    message = _strip_gin_context(str(e))
    if getattr(e, 'param', None) and getattr(e, 'owner', None):
      message = f'{_binding_name(e.owner, e.param, getattr(e, "scope", ""))}: {e.message}'
    error = cli.ConfigError if isinstance(e, cli.ConfigError) else cli.UserError
    raise error(_one_line(message)) from e
  except (ValueError, TypeError) as e:
    built = _innermost_configurable(str(e))
    if built is None or built == fn.__qualname__:
      raise  # raised by fn itself: an internal failure, with its traceback
    raise cli.ConfigError(
        f'gin configuration of {built}: {_one_line(_strip_gin_context(str(e)))}') from e


def operative_config() -> str:
  """The configuration used so far (gin's operative config), as gin file text."""
  return gin.operative_config_str()


# --------------------------------------------------------------------------- arguments

def configured_arguments(fn: Callable, **kwargs) -> dict:
  """Every argument calling the configured `fn` in the current gin scope would pass it.

  gin's bindings of `fn` (the configurables they reference built now, in this scope),
  `kwargs` over them, and fn's own defaults for the rest: for a caller that needs a
  function's configuration without calling it (train_lib.configured_setup builds the
  setup `train_lib.run` is configured with). `fn` may be gin's wrapper of it (an
  unevaluated `@f` reference).
  """
  target = inspect.unwrap(fn)
  arguments = inspect.signature(target).bind(**{**gin.get_bindings(_selector(target)),
                                                **kwargs})
  arguments.apply_defaults()
  return dict(arguments.arguments)
