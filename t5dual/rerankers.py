"""T5 rerankers: Flax modules that score (query, document) inputs, and their input format.

A reranker reads one sequence, the query and the document filled into a
template, tokenized with the model's SentencePiece vocabulary, trimmed to the
input length and ended with EOS (`encode_pairs`), and returns one float32
score per sequence. The template defaults to the format each scorer's
published checkpoints were trained on (`DEFAULT_TEMPLATES`): RankT5's
'Query: {query} Document: {document}' for encdec and enc, monoT5's
'Query: {query} Document: {document} Relevant:' for yes_no.
`RerankerConfig.scorer` picks how:

  encdec  RankT5-EncDec (Zhuang et al. 2023): the encoder, then one decoder step
          from the start token 0; the score is the unnormalised logit of one
          vocabulary entry (default 32089, <extra_id_10> of the T5 vocabulary).
  enc     RankT5-Enc: the encoder alone; the first token's output ('first') or
          the mean over real tokens ('mean'), then a dense layer to one score.
  yes_no  monoT5 (Nogueira et al. 2020): the encoder and one decoder step; the
          score is log p(yes) with the softmax taken over the two answer tokens
          only (default '▁true' 1176 / '▁false' 6136 of the T5 vocabulary;
          `yes_no_token_ids` finds them in any vocabulary).

Parameter trees (T5X names, see t5.py):

  encdec, yes_no  token_embedder/, encoder/, decoder/: exactly a T5X (or Hugging
                  Face, through interop) encoder-decoder, so checkpoints load whole.
  enc             token_embedder/, encoder/ and
                    score_dense/kernel  [embed, 1]  logical axes ('embed', 'score')
                    score_dense/bias    [1]         logical axes ('score',)
                  named like T5X's logits_dense; the bias matters to pointwise
                  losses only. The model's rule ('score', None) (RerankerModel.
                  logical_axis_rules) replicates the head, as a 1-wide output should be.

Inputs are ids [B, L] (scores [B]) or lists of candidates [B, list, L] (scores
[B, list]); lists are scored as B * list independent sequences.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import rax

from t5dual import dual_encoders, model_api, ranking_losses, t5
from t5dual.vocab import Tokenizer

Array = jax.Array

SCORERS = ('encdec', 'enc', 'yes_no')
POOLINGS = ('first', 'mean')
DEFAULT_TEMPLATE = 'Query: {query} Document: {document}'  # RankT5 (Zhuang et al. 2023)
MONOT5_TEMPLATE = 'Query: {query} Document: {document} Relevant:'  # Nogueira et al. 2020
# The input format each scorer's checkpoints were trained on: its default template.
DEFAULT_TEMPLATES = {'encdec': DEFAULT_TEMPLATE, 'enc': DEFAULT_TEMPLATE,
                     'yes_no': MONOT5_TEMPLATE}
DEFAULT_INPUT_LENGTH = 512
# <extra_id_10> of the standard T5 vocabulary (sentinels count down from 32099).
EXTRA_ID_10 = 32089
# '▁true' and '▁false' in the standard T5 SentencePiece model (monoT5's answers).
T5_TRUE_ID = 1176
T5_FALSE_ID = 6136


def check_template(template: str, where: str = 'template') -> None:
  """Raises ValueError unless `template` has exactly the fields {query} and {document}."""
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f'{where} {template!r} is not a format string: {e}') from None
  if sorted(fields) != ['document', 'query']:
    raise ValueError(f'{where} {template!r} must contain {{query}} and {{document}} once each '
                     f'and no other field; found {fields}')


@dataclasses.dataclass(frozen=True)
class RerankerConfig:
  """What a reranker is: its T5, how it scores, and how its inputs are written."""

  t5: t5.T5Config = t5.T5Config()
  scorer: str = 'encdec'                 # one of SCORERS
  scoring_token_id: int = EXTRA_ID_10    # 'encdec': the logit that is the score
  yes_token_id: int = T5_TRUE_ID         # 'yes_no': the answer scored ...
  no_token_id: int = T5_FALSE_ID         # ... against this one
  pooling: str = 'first'                 # 'enc': one of POOLINGS
  template: Optional[str] = None         # None: DEFAULT_TEMPLATES[scorer]
  input_length: int = DEFAULT_INPUT_LENGTH  # tokens, EOS included

  def __post_init__(self):
    if not isinstance(self.t5, t5.T5Config):
      raise ValueError(f'RerankerConfig.t5 must be a T5Config, got {type(self.t5).__name__}')
    if self.scorer not in SCORERS:
      raise ValueError(f'RerankerConfig.scorer must be one of {SCORERS}, got {self.scorer!r}')
    if self.template is None:  # the format the scorer's checkpoints were trained on
      object.__setattr__(self, 'template', DEFAULT_TEMPLATES[self.scorer])
    if self.pooling not in POOLINGS:
      raise ValueError(f'RerankerConfig.pooling must be one of {POOLINGS}, got '
                       f'{self.pooling!r}')
    check_template(self.template, 'RerankerConfig.template')
    if not isinstance(self.input_length, int) or self.input_length < 2:
      raise ValueError('RerankerConfig.input_length must be an integer >= 2 (one token and '
                       f'EOS), got {self.input_length!r}')
    used = {'encdec': ('scoring_token_id',), 'enc': (),
            'yes_no': ('yes_token_id', 'no_token_id')}[self.scorer]
    for key in used:
      value = getattr(self, key)
      if not isinstance(value, (int, np.integer)) or not 0 <= value < self.t5.vocab_size:
        raise ValueError(f'RerankerConfig.{key} must be a token id in [0, '
                         f'{self.t5.vocab_size}) (t5.vocab_size), got {value!r}')
    if self.scorer == 'yes_no' and self.yes_token_id == self.no_token_id:
      raise ValueError('RerankerConfig.yes_token_id and no_token_id must differ, both are '
                       f'{self.yes_token_id}')


def _score_lists(score_fn: Callable[[Array], Array], ids: Array) -> Array:
  """Applies score_fn ([N, L] -> [N]) to ids [B, L] or [B, list, L]; scores [B] or [B, list]."""
  if ids.ndim not in (2, 3):
    raise ValueError(f'reranker inputs must be [batch, length] or [batch, list, length] ids, '
                     f'got shape {ids.shape}')
  return score_fn(ids.reshape(-1, ids.shape[-1])).reshape(ids.shape[:-1])


class EncoderDecoderScorer(nn.Module):
  """RankT5-EncDec: score = first-step logit of `config.scoring_token_id` (float32)."""

  config: RerankerConfig

  def setup(self):
    # The T5 lives in this module's own scope: the tree is T5X's encoder-decoder tree.
    self.model = t5.EncoderDecoder(self.config.t5)
    nn.share_scope(self, self.model)

  def first_step_logits(self, ids: Array, vocab_ids: Sequence[int],
                        deterministic: bool = True) -> Array:
    """ids [N, L] -> [N, len(vocab_ids)] logits of one decoder step from the start token."""
    start = jnp.full((ids.shape[0], 1), t5.DECODER_START_ID, jnp.int32)
    return self.model(ids, start, deterministic, np.asarray(vocab_ids))[:, 0]

  def __call__(self, ids: Array, deterministic: bool = True) -> Array:
    """ids [B, L] or [B, list, L] -> scores [B] or [B, list]."""
    token = self.config.scoring_token_id
    return _score_lists(lambda x: self.first_step_logits(x, [token], deterministic)[:, 0], ids)


class YesNoScorer(EncoderDecoderScorer):
  """monoT5: score = log-softmax of the yes token over {yes, no} at the first decoder step."""

  def __call__(self, ids: Array, deterministic: bool = True) -> Array:
    """ids [B, L] or [B, list, L] -> scores [B] or [B, list], each <= 0."""
    answers = [self.config.yes_token_id, self.config.no_token_id]
    return _score_lists(lambda x: jax.nn.log_softmax(
        self.first_step_logits(x, answers, deterministic), axis=-1)[:, 0], ids)


class ScoreDense(nn.Module):
  """[..., embed] -> [...]: a dense layer to one score, with bias, in float32."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = t5.param_with_axes(
        self, 'kernel', nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'),
        (x.shape[-1], 1), ('embed', 'score'))
    bias = t5.param_with_axes(self, 'bias', nn.initializers.zeros, (1,), ('score',))
    return (jnp.einsum('...d,do->...o', x.astype(jnp.float32), kernel) + bias)[..., 0]


class EncoderScorer(nn.Module):
  """RankT5-Enc: encoder, 'first' or 'mean' pooling (float32), dense layer to one score."""

  config: RerankerConfig

  def setup(self):
    cfg = self.config.t5
    self.token_embedder = t5.Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.encoder = t5.Encoder(cfg)
    self.score_dense = ScoreDense()

  def _score(self, ids: Array, deterministic: bool) -> Array:
    mask = ids != t5.PAD_ID
    hidden = self.encoder(self.token_embedder(ids), mask, deterministic)
    if self.config.pooling == 'first':
      pooled = hidden[:, 0].astype(jnp.float32)
    else:
      pooled = dual_encoders.mean_pool(hidden, mask)
    return self.score_dense(pooled)

  def __call__(self, ids: Array, deterministic: bool = True) -> Array:
    """ids [B, L] or [B, list, L] -> scores [B] or [B, list]."""
    return _score_lists(lambda x: self._score(x, deterministic), ids)


SCORER_MODULES = {'encdec': EncoderDecoderScorer, 'enc': EncoderScorer, 'yes_no': YesNoScorer}


def scorer_module(config: RerankerConfig) -> nn.Module:
  """The Flax module of `config.scorer`."""
  return SCORER_MODULES[config.scorer](config)


def _boxed_params(config: RerankerConfig, rng: Array):
  return scorer_module(config).init(rng, jnp.ones((1, 4), jnp.int32))['params']


def init_params(config: RerankerConfig, rng: Array):
  """Freshly initialised float32 parameters of a reranker."""
  return nn.unbox(_boxed_params(config, rng))


def logical_axes(config: RerankerConfig):
  """Pytree of `PartitionSpec`s of logical axis names, matching `init_params`."""
  return nn.get_partition_spec(jax.eval_shape(lambda r: _boxed_params(config, r),
                                              jax.random.PRNGKey(0)))


# --------------------------------------------------------------------------- inputs

def format_pairs(queries: Sequence[str], documents: Sequence[str],
                 template: str = DEFAULT_TEMPLATE) -> list[str]:
  """The reranker's input text of each (query, document) pair."""
  check_template(template)
  if len(queries) != len(documents):
    raise ValueError(f'{len(queries)} queries but {len(documents)} documents')
  return [template.format(query=q, document=d) for q, d in zip(queries, documents)]


def encode_pairs(tokenizer: Tokenizer, queries: Sequence[str], documents: Sequence[str],
                 template: str = DEFAULT_TEMPLATE,
                 length: int = DEFAULT_INPUT_LENGTH) -> np.ndarray:
  """[N, length] int32 ids of the formatted pairs: trimmed to length - 1, EOS, padding 0.

  Trimming cuts the end of the text, i.e. the document, never the query of the
  default template.
  """
  return tokenizer.encode(format_pairs(queries, documents, template), length)


def answer_token_id(tokenizer: Union[Tokenizer, str], word: str) -> int:
  """Id of the one SentencePiece piece `word` tokenizes to ('true' -> the id of '▁true').

  Raises ValueError if the word takes several pieces or is unknown to the vocabulary.
  """
  tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
  ids = tok.encode([word], 8)[0]  # 8 is plenty: only a single piece is accepted
  pieces = int(np.count_nonzero(ids)) - 1  # without the EOS
  token = int(ids[0])
  if pieces != 1 or tok.decode([token]) != word:
    raise ValueError(f'answer {word!r} is not a single piece of the vocabulary {tok.path} '
                     f'({pieces} pieces); choose a word the vocabulary has whole')
  return token


def yes_no_token_ids(tokenizer: Union[Tokenizer, str], yes: str = 'true',
                     no: str = 'false') -> tuple[int, int]:
  """(yes_token_id, no_token_id) of two answer words in a SentencePiece vocabulary."""
  return answer_token_id(tokenizer, yes), answer_token_id(tokenizer, no)


# --------------------------------------------------------------------------- the trainable model

@model_api.register
class RerankerModel:
  """A reranker with its ranking loss: the `model_api.Model` of kind 'reranker'.

  Batches (`input_features`; data/tasks.ListTask makes them): 'inputs' [B, list,
  L] int32, 'labels' [B, list] float32, 'where' [B, list] bool, and for
  distillation 'teacher_scores' [B, list]. The loss is any function with the
  signature of `ranking_losses` (bound in gin); distillation losses get the teacher
  scores. The model reads no files: its lists, and their teacher, are the task's.
  """

  kind = 'reranker'
  feature_names = ('inputs',)
  metric_names = ('loss', 'list_mrr', 'list_ndcg')
  progress_metrics = ('loss', 'list_mrr')
  # The 'enc' score head's 1-wide output axis is replicated (see the module docstring).
  logical_axis_rules = (('score', None),)
  # Its checkpoints in other formats (interop.family): imported only when used.
  interop_module = 't5dual.interop.rerankers'

  def __init__(self, config: RerankerConfig,
               loss_fn: Callable[..., Array] = ranking_losses.softmax_loss):
    self.config = config
    self.loss = loss_fn
    self.module = scorer_module(config)

  @property
  def vocab_size(self) -> int:
    return self.config.t5.vocab_size

  @property
  def name(self) -> str:
    return f'{self.config.scorer} reranker'

  @property
  def template(self) -> str:
    return self.config.template

  @property
  def input_length(self) -> int:
    return self.config.input_length

  @property
  def t5_config(self) -> t5.T5Config:
    return self.config.t5

  def with_t5(self, **changes) -> 'RerankerModel':
    """The same reranker and loss with `changes` to its T5Config (model_api.T5Model).

    The loss function itself is kept (model.json records its name only, which would
    lose the settings of a configured loss).
    """
    t5_config = dataclasses.replace(self.config.t5, **changes)
    return type(self)(dataclasses.replace(self.config, t5=t5_config), self.loss)

  def init_params(self, rng: Array):
    return init_params(self.config, rng)

  def logical_axes(self):
    return logical_axes(self.config)

  def score(self, params, ids: Array) -> Array:
    """ids [N, L] or [B, list, L] -> float32 scores [N] or [B, list] (inference)."""
    return self.module.apply({'params': params}, ids, True)

  @property
  def distils(self) -> bool:
    """Whether its loss learns from a teacher's scores (the batch's 'teacher_scores')."""
    return ranking_losses.takes_teacher_scores(self.loss)

  @property
  def input_features(self) -> dict:
    """The batches it takes: lists of token ids with labels, and a teacher's scores
    when its loss distils."""
    features = {
        'inputs': model_api.Feature(('batch', 'list', 'input_length'), 'int32'),
        'labels': model_api.Feature(('batch', 'list'), 'float32'),
        'where': model_api.Feature(('batch', 'list'), 'bool'),
    }
    if self.distils:
      features['teacher_scores'] = model_api.Feature(('batch', 'list'), 'float32')
    return features

  token_features = ('inputs',)

  def loss_fn(self, params, batch: dict[str, Array], dropout_rng: Optional[Array]):
    deterministic = dropout_rng is None
    rngs = None if deterministic else {'dropout': dropout_rng}
    scores = self.module.apply({'params': params}, batch['inputs'], deterministic, rngs=rngs)
    labels, where = batch['labels'], batch['where']
    extra = {}
    if ranking_losses.takes_teacher_scores(self.loss):
      if 'teacher_scores' not in batch:
        raise ValueError(f'{_loss_name(self.loss)} distils from a teacher: set the teacher '
                         'of the task (TEACHER in gin, data/tasks.ListTask.teacher)')
      extra['teacher_scores'] = batch['teacher_scores']
    loss = self.loss(scores, labels, where=where, **extra)
    metrics = {
        'loss': loss,
        'list_mrr': rax.mrr_metric(scores, labels, where=where),
        'list_ndcg': rax.ndcg_metric(scores, labels, where=where),
    }
    return loss, metrics

  def describe(self) -> dict:
    return {'config': dataclasses.asdict(self.config), 'loss': _loss_name(self.loss)}

  @classmethod
  def from_description(cls, desc: dict) -> 'RerankerModel':
    cfg = dict(desc['config'])
    config = RerankerConfig(t5=t5.T5Config.from_dict(cfg.pop('t5')), **cfg)
    loss = getattr(ranking_losses, desc.get('loss', ''), ranking_losses.softmax_loss)
    # A 'lists' entry (model directories written before data/tasks.py) is the task's,
    # read back by tasks.from_description where a command needs it.
    return cls(config, loss)


def _loss_name(fn: Callable) -> str:
  return getattr(fn, '__name__', None) or getattr(getattr(fn, 'func', None), '__name__', repr(fn))
