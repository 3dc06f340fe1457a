"""The contract between a model family and the code that trains, saves and reloads it.

The trainer (trainer.py), the gin entry point (train_lib.py) and the model
directories (checkpoints.py) know a model only through `Model`, as T5X's
trainer knows only `BaseModel`. Dual encoders (dual_encoders.DualEncoderModel)
implement it now; rerankers implement the same contract, so one trainer,
one `scripts/train.py` and one restore path serve both.

A model directory's model.json records the model's `kind`; `from_description`
looks the kind up in one registry and rebuilds the model, so restore, export,
rerank and multi-stage chains reload whatever a directory holds.

What a model can do beyond training is declared as capabilities, protocols
checked with `isinstance` as `ContrastiveModel` is: `Encoder` (embeds one side:
export, retrieval evaluation), `Scorer` (scores (query, document) pairs:
reranking, teacher scores) and `T5Model` (built around one T5Config, rebuilt
with another by `with_t5`). Code outside the model families asks for a
capability, never for a kind; `require` turns a missing one into one line.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar, Mapping, Optional, Protocol, runtime_checkable

import jax
import numpy as np

from t5dual import cli

Array = jax.Array
Params = Any  # a pytree of arrays, as returned by init_params


@runtime_checkable
class Batcher(Protocol):
  """Training batches as a pure function of the step (exact resume, no iterator state)."""

  def batch(self, step: int, shard_index: int = 0,
            num_shards: int = 1) -> dict[str, np.ndarray]:
    """Slice `shard_index` of `num_shards` equal slices of global batch `step` (leading
    axis = batch rows): the rows one data shard of the mesh loads
    (partitioning.DataLayout)."""

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch that `batch`'s slices make up, as jax.ShapeDtypeStructs (the
    task's batch_spec for the batcher's settings, data/tasks.py)."""


@dataclasses.dataclass(frozen=True)
class Feature:
  """One entry of the batches a model takes: its axes and dtype, not its sizes.

  Attributes:
    axes: a name per dimension, 'batch' first (e.g. ('batch', 'list', 'input_length')).
      Entries of one batch that name the same axis must agree on its size.
    dtype: the numpy dtype name ('int32', 'float32', 'bool').
    required: False for an entry the model uses when the batch has it (hard
      negatives, ids that mask duplicates).
  """

  axes: tuple[str, ...]
  dtype: str
  required: bool = True


class BatchSpecError(cli.UserError, ValueError):
  """A task's batches are not what the model takes (a missing entry, a rank or dtype)."""


def check_batch_spec(model: 'Model', spec: Mapping[str, Any], task: str = 'the task') -> None:
  """Refuses a batch spec (name -> anything with .shape and .dtype) that `model` cannot
  take: a required entry missing, an entry it does not read, a rank, dtype or shared
  axis size that differs from `model.input_features`. One line naming the entry."""
  features = model.input_features
  missing = [k for k, f in features.items() if f.required and k not in spec]
  if missing:
    raise BatchSpecError(f'{task} gives no {missing[0]!r}, which a {model.name} needs '
                         f'(its batches hold {sorted(spec)})')
  unread = sorted(set(spec) - set(features))
  if unread:
    raise BatchSpecError(f'{task} gives {unread[0]!r}, which a {model.name} does not read '
                         f'(it reads {sorted(features)})')
  sizes: dict[str, tuple[int, str]] = {}
  for name, entry in spec.items():
    feature, shape = features[name], tuple(entry.shape)
    if len(shape) != len(feature.axes):
      raise BatchSpecError(f'{task}: {name!r} has shape {shape}, but a {model.name} takes '
                           f'[{", ".join(feature.axes)}]')
    if np.dtype(entry.dtype) != np.dtype(feature.dtype):
      raise BatchSpecError(f'{task}: {name!r} is {np.dtype(entry.dtype)}, but a '
                           f'{model.name} takes {feature.dtype}')
    for axis, size in zip(feature.axes, shape):
      seen, where = sizes.setdefault(axis, (size, name))
      if seen != size:
        raise BatchSpecError(f'{task}: {name!r} has {axis} {size} but {where!r} has {seen}')


@runtime_checkable
class Model(Protocol):
  """What the trainer and the model directories need from a model.

  Attributes:
    kind: the registry key written to model.json ('dual_encoder', ...).
    metric_names: every name in the metrics dict `loss_fn` returns; the trainer
      checks it when it traces the step.
    progress_metrics: the few of them the progress bar shows.
    vocab_size: rows of the token embedding (the tokenizer may not exceed it).
    name: a short human-readable name for log lines ('sde dual encoder').
    feature_names: the features its batches hold, keys of TASK_FEATURE_LENGTHS.
    input_features: the batches it takes, {entry: Feature}: how the model states
      its input. A task (data/tasks.py) makes the batches and their spec for a
      batch size and feature lengths; train_lib's setup checks that spec against
      these (`check_batch_spec`) before anything is read or written.
    token_features: the batch entries holding token ids, which its encoders run
      over (the planner counts activations and FLOPs from their shapes).
    logical_axis_rules: optional, (logical axis, mesh axis or None) pairs for
      the axes only this model has (e.g. a reranker's 'score' head); the
      partitioner appends them to its standard rules
      (partitioning.with_model_rules). Without it, such axes are replicated.
    interop_module: optional, the module with its family's checkpoint formats
      (`load_initial`, `write_hf`; see interop/dual_encoders.py).
  """

  kind: ClassVar[str]

  @property
  def metric_names(self) -> tuple[str, ...]: ...

  @property
  def progress_metrics(self) -> tuple[str, ...]: ...

  @property
  def vocab_size(self) -> int: ...

  @property
  def name(self) -> str: ...

  @property
  def feature_names(self) -> tuple[str, ...]: ...

  @property
  def input_features(self) -> Mapping[str, Feature]: ...

  @property
  def token_features(self) -> tuple[str, ...]: ...

  def init_params(self, rng: Array) -> Params:
    """Freshly initialised parameters (unboxed pytree)."""

  def logical_axes(self) -> Any:
    """Pytree of PartitionSpecs of logical axis names, matching `init_params`."""

  def loss_fn(self, params: Params, batch: dict[str, Array],
              dropout_rng: Optional[Array]) -> tuple[Array, dict[str, Array]]:
    """(scalar loss, metrics named by `metric_names`); dropout on iff dropout_rng is given.

    Unless the model is a `ContrastiveModel`, the loss and the metrics are
    means over the batch's independent examples (lists), so that gradient
    accumulation over equal microbatches (trainer.TrainerConfig.grad_strategy
    'accumulate') gives the full-batch gradient.
    """

  def describe(self) -> dict:
    """JSON-able description for model.json, without 'kind'.

    Its 'config' entry is the architecture: a run may resume a model directory
    only with an equal 'config'. Other entries (e.g. the loss) may change
    between runs on one directory.
    """

  @classmethod
  def from_description(cls, desc: dict) -> 'Model':
    """The model that `describe()` described (desc may also hold model.json's other keys)."""


@runtime_checkable
class ContrastiveModel(Model, Protocol):
  """A `Model` whose examples meet only in the loss, through their embeddings.

  The loss of a contrastive batch couples its examples (in-batch negatives),
  so it is not a mean over microbatches; but each example's embeddings depend
  on that example alone. That is what GradCache (Gao et al. 2021, "Scaling
  deep contrastive learning batch size under memory limited setup") needs:
  embed the batch in chunks without gradients, take the loss gradient with
  respect to the embeddings, then back-propagate it chunk by chunk (see
  t5dual/gradients.py). `loss_fn(params, batch, rng)` must equal
  `loss_from_embeddings(embed(params, batch, rng), batch)`.
  """

  def embed(self, params: Params, batch: dict[str, Array],
            dropout_rng: Optional[Array]) -> Any:
    """A pytree of float32 embeddings, every leaf [B, ...] row-aligned with the batch.

    Row i depends on row i of the batch (and the parameters) only; dropout is
    on iff dropout_rng is given.
    """

  def loss_from_embeddings(self, embeddings: Any, batch: dict[str, Array]
                           ) -> tuple[Array, dict[str, Array]]:
    """(scalar loss, metrics) of `embed`'s output; the batch supplies ids and masks only."""


@runtime_checkable
class Encoder(Protocol):
  """A model that embeds one side (query or document) alone: what export, retrieval
  evaluation and `scripts/eval.py` need (t5x_retrieval's inference_mode 'encode').

  Attributes:
    embedding_dim: the size D of `encode`'s embeddings.
  Each side reads the batch feature `Side.feature` ('inputs' for queries,
  'targets' for documents); its length is the model directory's feature length
  of that name (model.json 'feature_lengths').
  """

  @property
  def embedding_dim(self) -> int: ...

  def encode(self, params: Params, ids: Array, side: Any) -> Array:
    """float32 embeddings [B, D] of one side's token ids [B, L] (inference, no dropout).

    `side` is a sides.Side or any of its names ('query', 'left', 'inputs', ...).
    """


@runtime_checkable
class Scorer(Protocol):
  """A model that scores (query, document) pairs read together: what reranking,
  multi-stage evaluation and teacher scoring need (t5x_retrieval's 'similarity').

  Attributes:
    template: the input text of a pair, a format string with the fields {query}
      and {document} (rerankers.encode_pairs tokenizes it).
    input_length: tokens of one input, EOS included, unless the model directory
      records another ('feature_lengths' 'inputs').
  """

  @property
  def template(self) -> str: ...

  @property
  def input_length(self) -> int: ...

  def score(self, params: Params, ids: Array) -> Array:
    """float32 scores [N] of pair inputs [N, L], or [B, list] of [B, list, L] (inference)."""


@runtime_checkable
class T5Model(Protocol):
  """A model built around one T5 (every built-in kind): the planner and the benchmarks
  read its T5Config, and change remat, attention or dtype through `with_t5` only."""

  @property
  def t5_config(self) -> Any:
    """Its t5.T5Config."""

  def with_t5(self, **changes: Any) -> 'T5Model':
    """The same model (kind, loss, heads) with `changes` to its T5Config fields."""


# What a command does with each capability, and what to do instead with a model that has
# it: the one line a command given the wrong model directory answers with.
CAPABILITY_USES = {
    Encoder: ('encodes queries and documents with a dual encoder',
              'evaluate it on BEIR: scripts/eval.py run --model_dir={model_dir}'),
    Scorer: ('scores (query, document) pairs with a reranker',
             'rerank a first-stage run with it: scripts/rerank.py --model_dir={model_dir}'),
}


class MissingCapabilityError(cli.UserError, TypeError):
  """A command was given a model directory whose model lacks the capability it needs."""


def require(model: Any, capability: type, model_dir: str, command: str,
            needs: Optional[str] = None) -> Any:
  """`model` if it implements `capability` (a protocol of CAPABILITY_USES), else a
  one-line MissingCapabilityError naming `model_dir`, what it holds, what `command`
  needs (`needs`, default the capability's use) and the commands that take it."""
  if isinstance(model, capability):
    return model
  needs = needs or CAPABILITY_USES[capability][0]
  hints = [hint.format(model_dir=model_dir) for other, (_, hint) in CAPABILITY_USES.items()
           if isinstance(model, other)]
  raise MissingCapabilityError('; '.join([
      f'{model_dir} holds a {model.kind.replace("_", " ")} model', f'{command} {needs}',
      *hints]))


class UnknownModelKindError(cli.UserError, ValueError):
  """model.json names a kind no registered model implements."""


_REGISTRY: dict[str, type] = {}

# Modules that register the built-in kinds, imported on first use, so that
# reading a model directory works without importing every model family first.
BUILTIN_KINDS = {
    'dual_encoder': 't5dual.dual_encoders',
    'reranker': 't5dual.rerankers',
}


def register(cls: type) -> type:
  """Class decorator: makes `cls` (a `Model` with a `kind`) rebuildable from model.json."""
  kind = getattr(cls, 'kind', None)
  if not isinstance(kind, str) or not kind:
    raise TypeError(f'{cls.__name__} needs a class attribute `kind` to be registered')
  known = _REGISTRY.get(kind)
  if known is not None and known.__qualname__ != cls.__qualname__:
    raise ValueError(f'model kind {kind!r} is already registered by {known.__qualname__}')
  _REGISTRY[kind] = cls
  return cls


def kinds() -> tuple[str, ...]:
  """Every kind that can be rebuilt (registered or built in)."""
  return tuple(sorted(set(_REGISTRY) | set(BUILTIN_KINDS)))


def model_class(kind: str, source: str = 'model.json') -> type:
  """The class registered for `kind`; `source` names the file the kind came from."""
  if kind not in _REGISTRY and kind in BUILTIN_KINDS:
    importlib.import_module(BUILTIN_KINDS[kind])
  if kind not in _REGISTRY:
    raise UnknownModelKindError(f'{source}: unknown model kind {kind!r}; known kinds: '
                                f'{", ".join(kinds())}')
  return _REGISTRY[kind]


def from_description(desc: dict, source: str = 'model.json') -> Model:
  """Rebuilds the model a model.json describes, whatever its kind."""
  if 'kind' not in desc:
    raise UnknownModelKindError(f'{source}: no "kind" entry; known kinds: '
                                f'{", ".join(kinds())}')
  return model_class(desc['kind'], source).from_description(desc)
