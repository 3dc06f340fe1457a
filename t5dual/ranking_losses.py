"""Ranking losses with one signature, for rerankers and dual encoders alike.

Every loss is a pure float32 function

    loss(scores [B, L], labels [B, L], *, where [B, L] bool = None, ...) -> scalar

over the last axis (a list of L candidates per query), as rax's losses are. A
model only produces `scores`; which loss trains it is bound in gin:

    from t5dual import ranking_losses
    MODEL.loss_fn = @ranking_losses.poly1_softmax_loss
    ranking_losses.poly1_softmax_loss.epsilon = 1.0

Notation, per list: scores s_i, graded relevance labels y_i >= 0 (0 for a
sampled negative), valid candidates V = {i : where_i} (padding is not in V),
softmax p_i = exp(s_i) / sum_{j in V} exp(s_j). Candidates outside V change
neither a loss nor its gradient: their scores and labels are zeroed before any
arithmetic, so even a non-finite padded score has a zero gradient.

Relevance losses (wrapping rax):
  pointwise_sigmoid_loss   mean over valid items of
                           -[y'_i log sigmoid(s_i) + (1 - y'_i) log(1 - sigmoid(s_i))],
                           y' = clip(y, 0, 1)
  pairwise_logistic_loss   RankNet: mean over valid pairs with y_i > y_j of
                           log(1 + exp(-(s_i - s_j)))
  softmax_loss             mean over lists of -sum_{i in V} y_i log p_i
                           (labels as given; a `label_fn` may normalise them)
  poly1_softmax_loss       softmax_loss + epsilon * (1 - pt),
                           pt = sum_i (y_i / sum_j y_j) p_i   (Leng et al. 2022)
  lce_loss                 localized contrastive estimation (Gao et al. 2021):
                           -log p_t over {t} + the negatives, t = the list's
                           first most relevant candidate; other positives
                           (0 < y_i, i != t) are not negatives and leave the softmax.
                           With one positive per list this is softmax_loss.

Distillation losses take the teacher's scores t_i as `teacher_scores` [B, L]
(`takes_teacher_scores` tells a model whether to pass them):
  teacher_rank_pairwise_loss  RankNet on the teacher's order. Teacher ranks
                           r_i = 1 + |{j in V : t_j > t_i}| become graded labels
                           g_i = |V| - r_i + 1 (best = |V|, worst = 1; ties share
                           a label), the mapping of Pezzuti et al. (ECIR 2025,
                           lightning-ir's `use_ranks_as_qrels`: max rank - rank + 1),
                           then pairwise_logistic_loss(s, g). `labels` are unused.
  kl_distillation_loss     mean over lists of KL(q || p),
                           q = softmax(t / T), p = softmax(s / T) over V.
                           `labels` are unused.
  margin_mse_loss          Margin-MSE (Hofstaetter et al. 2020): with t the
                           list's first most relevant candidate, mean over
                           negatives n (y_n = 0) of
                           ((s_t - s_n) - (t_t - t_n))^2.

Reduction: every loss takes `reduce_fn` (jnp.mean by default, jnp.sum, or None
for per-list / per-pair values) and, as rax does, ignores lists or pairs with
no valid entry when averaging.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import rax

Array = jax.Array
ReduceFn = Optional[Callable[..., Array]]


def _masked(x: Array, where: Optional[Array]) -> Array:
  """float32 `x` with padded entries zeroed, in value and in gradient."""
  x = jnp.asarray(x, jnp.float32)
  return x if where is None else jnp.where(where, x, 0.0)


def _prepare(scores: Array, labels: Array, where: Optional[Array]
             ) -> tuple[Array, Array, Optional[Array]]:
  where = None if where is None else jnp.asarray(where, bool)
  return _masked(scores, where), _masked(labels, where), where


def _valid(scores: Array, where: Optional[Array]) -> Array:
  return jnp.ones(scores.shape, bool) if where is None else where


def takes_teacher_scores(loss_fn: Callable) -> bool:
  """True when `loss_fn` (a function, partial or gin reference) needs `teacher_scores`."""
  try:
    return 'teacher_scores' in inspect.signature(loss_fn).parameters
  except (TypeError, ValueError):  # a callable without an inspectable signature
    return False


# ----------------------------------------------------------- relevance losses

def pointwise_sigmoid_loss(scores: Array, labels: Array, *, where: Optional[Array] = None,
                           weights: Optional[Array] = None,
                           reduce_fn: ReduceFn = jnp.mean) -> Array:
  """Sigmoid cross-entropy of each candidate against min(label, 1) (rax).

  Definition, with y'_i = clip(y_i, 0, 1):

      loss = mean over lists and i in V of
             -[y'_i log sigmoid(s_i) + (1 - y'_i) log(1 - sigmoid(s_i))]

  RankT5's pointwise loss (Zhuang et al. 2023, "RankT5: Fine-Tuning T5 for Text
  Ranking with Ranking Losses").

  Args:
    scores: [B, L] model scores (logits).
    labels: [B, L] graded relevance; anything >= 1 counts as relevant.
    where: optional [B, L] bool, False for padding.
    weights: optional [B, L] per-candidate weights.
    reduce_fn: reduction over the valid candidates.
  Returns:
    The loss (a scalar unless reduce_fn is None).
  """
  scores, labels, where = _prepare(scores, labels, where)
  return rax.pointwise_sigmoid_loss(scores, labels, where=where, weights=weights,
                                    reduce_fn=reduce_fn)


def pairwise_logistic_loss(scores: Array, labels: Array, *, where: Optional[Array] = None,
                           weights: Optional[Array] = None,
                           reduce_fn: ReduceFn = jnp.mean) -> Array:
  """RankNet: logistic loss on every valid pair whose labels differ (rax).

  Definition (Burges et al. 2005, RankNet):

      loss = mean over pairs (i, j), i, j in V, y_i > y_j, of log(1 + exp(-(s_i - s_j)))

  Args: as `pointwise_sigmoid_loss`; reduce_fn reduces over the valid pairs.
  Returns:
    The loss.
  """
  scores, labels, where = _prepare(scores, labels, where)
  return rax.pairwise_logistic_loss(scores, labels, where=where, weights=weights,
                                    reduce_fn=reduce_fn)


def softmax_loss(scores: Array, labels: Array, *, where: Optional[Array] = None,
                 weights: Optional[Array] = None,
                 label_fn: Callable[..., Array] = lambda labels, where: labels,
                 reduce_fn: ReduceFn = jnp.mean) -> Array:
  """Listwise softmax cross-entropy (rax; ListNet, Cao et al. 2007).

  Definition, per list:

      loss = -sum_{i in V} y_i log p_i,   p_i = exp(s_i) / sum_{j in V} exp(s_j)

  averaged over the lists with a valid candidate. With one-hot labels this is the
  in-batch softmax of the dual encoders (t5dual.losses).

  Labels are used as given (rax's default): a list with labels (2, 1, 0)
  weighs its two positives 2:1. Bind `label_fn = @rax.utils.normalize_probabilities`
  to make each list's labels a distribution instead.

  Args:
    scores: [B, L] model scores.
    labels: [B, L] graded relevance (a one-hot row: the in-batch softmax).
    where: optional [B, L] bool, False for padding.
    weights: optional [B, L] per-candidate weights (multiply the labels).
    label_fn: maps (labels, where=) to the target weights.
    reduce_fn: reduction over the lists with a valid candidate.
  Returns:
    The loss.
  """
  scores, labels, where = _prepare(scores, labels, where)
  return rax.softmax_loss(scores, labels, where=where, weights=weights, label_fn=label_fn,
                          reduce_fn=reduce_fn)


def poly1_softmax_loss(scores: Array, labels: Array, *, where: Optional[Array] = None,
                       epsilon: float = 1.0, weights: Optional[Array] = None,
                       reduce_fn: ReduceFn = jnp.mean) -> Array:
  """Poly-1 softmax (rax; Leng et al. 2022, PolyLoss).

  Definition, per list:

      loss = -sum_{i in V} y_i log p_i + epsilon * (1 - pt),
      pt = sum_{i in V} (y_i / sum_{j in V} y_j) p_i

  averaged over the lists with a valid candidate.

  Args: as `softmax_loss`; epsilon weighs the leading polynomial term.
  Returns:
    The loss.
  """
  scores, labels, where = _prepare(scores, labels, where)
  return rax.poly1_softmax_loss(scores, labels, where=where, epsilon=epsilon, weights=weights,
                                reduce_fn=reduce_fn)


def _target(labels: Array, where: Array) -> Array:
  """[B, L] bool: the first candidate with the list's highest label (one per list)."""
  best = jnp.argmax(jnp.where(where, labels, -jnp.inf), axis=-1)
  return jax.nn.one_hot(best, labels.shape[-1], dtype=bool) & where


def lce_loss(scores: Array, labels: Array, *, where: Optional[Array] = None,
             reduce_fn: ReduceFn = jnp.mean) -> Array:
  """Localized contrastive estimation: softmax over the target and the negatives.

  Definition (Gao et al. 2021, "Rethink Training of BERT Rerankers in Multi-Stage
  Retrieval Pipeline"), with t the list's first candidate of highest label and
  N = {i in V : y_i <= 0} its negatives:

      loss = -log( exp(s_t) / sum_{j in {t} + N} exp(s_j) )

  averaged over the lists. Other positives (y_i > 0, i != t) leave the softmax.

  The lists come from a first-stage window (see t5dual.data.lists); this is
  rax's softmax on a one-hot target with the other positives left out.

  Args:
    scores: [B, L] model scores.
    labels: [B, L] graded relevance, 0 for the sampled negatives.
    where: optional [B, L] bool, False for padding.
    reduce_fn: reduction over the lists.
  Returns:
    The loss.
  """
  scores, labels, where = _prepare(scores, labels, where)
  valid = _valid(scores, where)
  target = _target(labels, valid)
  keep = valid & (target | (labels <= 0))
  return rax.softmax_loss(scores, target.astype(jnp.float32), where=keep,
                          reduce_fn=reduce_fn)


# -------------------------------------------------------- distillation losses

def teacher_rank_labels(teacher_scores: Array, where: Optional[Array] = None) -> Array:
  """[B, L] float32 graded labels |V| - rank + 1 from the teacher's scores; 0 for padding."""
  where = None if where is None else jnp.asarray(where, bool)
  teacher = _masked(teacher_scores, where)
  valid = _valid(teacher, where)
  above = (teacher[..., None, :] > teacher[..., :, None]) & valid[..., None, :]
  rank = 1 + jnp.sum(above, axis=-1)                      # ties share the best rank
  graded = jnp.sum(valid, axis=-1, keepdims=True) - rank + 1
  return jnp.where(valid, graded, 0).astype(jnp.float32)


def teacher_rank_pairwise_loss(scores: Array, labels: Array, *, teacher_scores: Array,
                               where: Optional[Array] = None,
                               reduce_fn: ReduceFn = jnp.mean) -> Array:
  """RankNet on the pairs the teacher orders, through rank-derived graded labels.

  Definition, with teacher scores t (Pezzuti et al. 2025, lightning-ir's
  `use_ranks_as_qrels`):

      r_i = 1 + |{j in V : t_j > t_i}|      (ties share the best rank)
      g_i = |V| - r_i + 1
      loss = pairwise_logistic_loss(s, g)
           = mean over pairs (i, j) in V with g_i > g_j of log(1 + exp(-(s_i - s_j)))

  Args:
    scores: [B, L] student scores.
    labels: [B, L] relevance labels (unused: the teacher's order replaces them).
    teacher_scores: [B, L] teacher scores (or negated teacher ranks).
    where: optional [B, L] bool, False for padding.
    reduce_fn: reduction over the ordered valid pairs.
  Returns:
    The loss.
  """
  del labels
  return pairwise_logistic_loss(scores, teacher_rank_labels(teacher_scores, where),
                                where=where, reduce_fn=reduce_fn)


def _masked_log_softmax(x: Array, valid: Array) -> Array:
  """log softmax over the valid entries; 0 (and zero gradient) elsewhere."""
  out = jax.nn.log_softmax(jnp.where(valid, x, -jnp.inf), axis=-1)
  return jnp.where(valid, out, 0.0)


def kl_distillation_loss(scores: Array, labels: Array, *, teacher_scores: Array,
                         where: Optional[Array] = None, temperature: float = 1.0,
                         reduce_fn: ReduceFn = jnp.mean) -> Array:
  """KL(softmax(teacher / T) || softmax(student / T)) per list.

  Definition, with teacher scores t (Hinton et al. 2015, knowledge distillation):

      q_i = softmax(t / T)_i,  p_i = softmax(s / T)_i   over V
      loss = sum_{i in V} q_i (log q_i - log p_i)

  averaged over the lists with a valid candidate.

  Args:
    scores: [B, L] student scores.
    labels: [B, L] relevance labels (unused).
    teacher_scores: [B, L] teacher scores.
    where: optional [B, L] bool, False for padding.
    temperature: T, dividing both score sets.
    reduce_fn: reduction over the lists with a valid candidate.
  Returns:
    The loss.
  """
  del labels
  scores, teacher, where = _prepare(scores, teacher_scores, where)
  valid = _valid(scores, where)
  log_q = _masked_log_softmax(teacher / temperature, valid)
  log_p = _masked_log_softmax(scores / temperature, valid)
  kl = jnp.sum(jnp.where(valid, jnp.exp(log_q) * (log_q - log_p), 0.0), axis=-1)
  return rax.utils.safe_reduce(kl, where=jnp.any(valid, axis=-1), reduce_fn=reduce_fn)


def margin_mse_loss(scores: Array, labels: Array, *, teacher_scores: Array,
                    where: Optional[Array] = None, reduce_fn: ReduceFn = jnp.mean) -> Array:
  """Margin-MSE between student and teacher margins of (target, negative) pairs.

  Definition (Hofstaetter et al. 2020, "Improving Efficient Neural Ranking Models
  with Cross-Architecture Knowledge Distillation"), with teacher scores t, target
  k the list's first candidate of highest label, negatives N = {n in V : y_n <= 0}:

      loss = mean over n in N, n != k (and lists) of ((s_k - s_n) - (t_k - t_n))^2

  Args:
    scores: [B, L] student scores.
    labels: [B, L] graded relevance: the first highest one is the target,
      candidates labelled 0 are its negatives.
    teacher_scores: [B, L] teacher scores.
    where: optional [B, L] bool, False for padding.
    reduce_fn: reduction over the (target, negative) pairs.
  Returns:
    The loss.
  """
  scores, labels, where = _prepare(scores, labels, where)
  teacher = _masked(teacher_scores, where)
  valid = _valid(scores, where)
  target = _target(labels, valid)
  negative = valid & (labels <= 0) & ~target
  pick = lambda x: jnp.sum(jnp.where(target, x, 0.0), axis=-1, keepdims=True)
  error = (pick(scores) - scores) - (pick(teacher) - teacher)
  return rax.utils.safe_reduce(jnp.where(negative, error ** 2, 0.0), where=negative,
                               reduce_fn=reduce_fn)
