"""Contrastive losses for dual encoders, as pure functions of embeddings.

Notation: B queries q_i with positive documents d_i, optional hard negatives
n_{i,k} (k < N), L2-normalised embeddings, similarity s(x, y) = <x, y> / tau.

* `in_batch_softmax_loss` -- bidirectional in-batch softmax with optional
  SamToNe ("same tower negatives", Moiseev et al. 2023). Row i of the
  query->doc direction is a softmax over

      [s(q_i, d_j) for all j] + [s(q_i, n_{j,k}) for all j, k]
      + [s(q_i, q_j) for j != i]      (SamToNe, query side)

  and row i of the doc->query direction over

      [s(d_i, q_j) for all j] + [s(d_i, d_j) for j != i]   (SamToNe, doc side)

  with target j = i. The two directions' mean cross-entropies are summed.
* `pair_loss` -- PAIR (Ren et al. 2021): (1 - alpha) * query-centric loss
  + alpha * passage-centric loss, where the passage-centric row i is a softmax
  over [s(d_i, q_i)] + [s(d_i, d_j) for j != i] + [s(d_i, n_{j,k})].

False negatives: when `query_ids` / `doc_ids` are given, every off-diagonal
pair (i, j) with the same query id or the same positive-document id is removed
from each other's negatives (in every block), and a hard negative whose id
equals row i's positive document id is removed from row i.

All computation is float32. Losses return (scalar loss, dict of named terms).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

SAME_TOWER_CHOICES = ('none', 'query', 'doc', 'both')


def _masked_ce(logits: Array, valid: Array, target: Array) -> Array:
  """Per-row softmax cross-entropy with invalid entries removed.

  Args:
    logits: [B, C] float32.
    valid: [B, C] bool.
    target: [B] int, index of the positive column (always valid).
  Returns:
    [B] cross-entropy.
  """
  logits = jnp.where(valid, logits, -jnp.inf)
  positive = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - positive


def false_negative_mask(query_ids: Optional[Array], doc_ids: Optional[Array],
                        batch_size: int) -> Array:
  """[B, B] bool: True where j may serve as a negative of i (j != i, no shared id)."""
  keep = ~jnp.eye(batch_size, dtype=bool)
  if query_ids is not None:
    keep &= query_ids[:, None] != query_ids[None, :]
  if doc_ids is not None:
    keep &= doc_ids[:, None] != doc_ids[None, :]
  return keep


def _in_batch_blocks(query: Array, doc: Array, negatives: Optional[Array],
                     temperature: float, query_ids, doc_ids, negative_ids):
  """Similarity blocks and validity masks shared by the losses."""
  b = query.shape[0]
  q = query.astype(jnp.float32)
  d = doc.astype(jnp.float32)
  eye = jnp.eye(b, dtype=bool)
  keep = false_negative_mask(query_ids, doc_ids, b)
  blocks = dict(
      qd=(q @ d.T / temperature, keep | eye),   # positives on the diagonal
      qq=(q @ q.T / temperature, keep),
      dd=(d @ d.T / temperature, keep),
  )
  if negatives is not None:
    n = negatives.astype(jnp.float32).reshape(-1, negatives.shape[-1])  # [B*N, D]
    valid = jnp.ones((b, n.shape[0]), dtype=bool)
    if negative_ids is not None and doc_ids is not None:
      valid = doc_ids[:, None] != negative_ids.reshape(1, -1)
    blocks['qn'] = (q @ n.T / temperature, valid)
    blocks['dn'] = (d @ n.T / temperature, valid)
  return blocks


def _concat(blocks, names):
  logits = jnp.concatenate([blocks[k][0] for k in names], axis=1)
  valid = jnp.concatenate([blocks[k][1] for k in names], axis=1)
  return logits, valid


def in_batch_softmax_loss(
    query: Array,
    doc: Array,
    negatives: Optional[Array] = None,
    *,
    temperature: float = 0.01,
    bidirectional: bool = True,
    same_tower_negatives: str = 'query',
    query_ids: Optional[Array] = None,
    doc_ids: Optional[Array] = None,
    negative_ids: Optional[Array] = None,
) -> tuple[Array, dict[str, Array]]:
  """In-batch softmax loss with optional SamToNe terms.

  Args:
    query: [B, D] L2-normalised query embeddings.
    doc: [B, D] L2-normalised embeddings of each query's positive document.
    negatives: optional [B, N, D] hard-negative document embeddings; all B*N of
      them join every query's candidates.
    temperature: tau; similarities are divided by it.
    bidirectional: add the doc->query direction (summed, as t5x_retrieval does).
    same_tower_negatives: 'none', 'query' (SamToNe default), 'doc' or 'both'.
    query_ids: optional [B] int ids; equal ids mark duplicate queries.
    doc_ids: optional [B] int ids of the positive documents.
    negative_ids: optional [B, N] int ids of the hard negatives.
  Returns:
    (loss, terms) with terms 'query_to_doc' and, if bidirectional, 'doc_to_query'.
  """
  if same_tower_negatives not in SAME_TOWER_CHOICES:
    raise ValueError(f'same_tower_negatives must be one of {SAME_TOWER_CHOICES}, '
                     f'got {same_tower_negatives!r}')
  if same_tower_negatives in ('doc', 'both') and not bidirectional:
    raise ValueError("document-side SamToNe lives in the doc->query direction: "
                     "same_tower_negatives='doc'/'both' needs bidirectional=True")
  blocks = _in_batch_blocks(query, doc, negatives, temperature, query_ids, doc_ids,
                            negative_ids)
  target = jnp.arange(query.shape[0])
  q_names = ['qd'] + (['qn'] if negatives is not None else [])
  if same_tower_negatives in ('query', 'both'):
    q_names.append('qq')
  terms = {'query_to_doc': jnp.mean(_masked_ce(*_concat(blocks, q_names), target))}
  if bidirectional:
    dq_logits, dq_valid = blocks['qd'][0].T, blocks['qd'][1].T
    d_blocks = {'dq': (dq_logits, dq_valid), 'dd': blocks['dd']}
    d_names = ['dq'] + (['dd'] if same_tower_negatives in ('doc', 'both') else [])
    terms['doc_to_query'] = jnp.mean(_masked_ce(*_concat(d_blocks, d_names), target))
  return sum(terms.values()), terms


def pair_loss(
    query: Array,
    doc: Array,
    negatives: Optional[Array] = None,
    *,
    alpha: float = 0.1,
    temperature: float = 0.01,
    query_ids: Optional[Array] = None,
    doc_ids: Optional[Array] = None,
    negative_ids: Optional[Array] = None,
) -> tuple[Array, dict[str, Array]]:
  """PAIR loss: (1 - alpha) * query-centric + alpha * passage-centric.

  Args: as `in_batch_softmax_loss`; alpha weighs the passage-centric term.
  Returns:
    (loss, terms) with terms 'query_centric' and 'passage_centric' (unweighted).
  """
  blocks = _in_batch_blocks(query, doc, negatives, temperature, query_ids, doc_ids,
                            negative_ids)
  b = query.shape[0]
  target = jnp.arange(b)
  with_negs = ['qn'] if negatives is not None else []
  query_centric = jnp.mean(_masked_ce(*_concat(blocks, ['qd'] + with_negs), target))
  # Passage-centric row i: s(d_i, q_i) first, then d_i's similarity to the other passages.
  p_blocks = {
      'pos': (jnp.diagonal(blocks['qd'][0])[:, None], jnp.ones((b, 1), dtype=bool)),
      'dd': blocks['dd'],
  }
  if negatives is not None:
    p_blocks['dn'] = blocks['dn']
  passage_centric = jnp.mean(_masked_ce(*_concat(p_blocks, list(p_blocks)),
                                        jnp.zeros((b,), jnp.int32)))
  loss = (1.0 - alpha) * query_centric + alpha * passage_centric
  return loss, {'query_centric': query_centric, 'passage_centric': passage_centric}


def in_batch_ranking_metrics(query: Array, doc: Array, query_ids: Optional[Array] = None,
                             doc_ids: Optional[Array] = None) -> dict[str, Array]:
  """In-batch precision@1 and MRR of each query's positive among the batch's documents.

  Documents masked as false negatives (shared ids) are not counted as competitors.
  """
  b = query.shape[0]
  scores = query.astype(jnp.float32) @ doc.astype(jnp.float32).T
  keep = false_negative_mask(query_ids, doc_ids, b)
  positive = jnp.diagonal(scores)
  better = jnp.sum((scores > positive[:, None]) & keep, axis=1)
  return {'p_at_1': jnp.mean(better == 0), 'mrr': jnp.mean(1.0 / (1.0 + better))}
