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

Each direction is built as a ranking list per row -- (scores [B, C], one-hot
labels [B, C] marking the positive, where [B, C] bool) -- by
`query_to_doc_lists`, `doc_to_query_lists` and `passage_centric_lists`, and
scored by the listwise softmax of `t5dual.ranking_losses`, the loss layer the
rerankers share: -log p(positive) over the row's valid columns, averaged over
rows. A masked column leaves the softmax; a row whose negatives are all masked
costs 0.

All computation is float32. Losses return (scalar loss, dict of named terms).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from t5dual import ranking_losses

Array = jax.Array
Lists = tuple[Array, Array, Array]  # (scores, labels, where), each [B, C]

SAME_TOWER_CHOICES = ('none', 'query', 'doc', 'both')


def false_negative_mask(query_ids: Optional[Array], doc_ids: Optional[Array],
                        batch_size: int) -> Array:
  """[B, B] bool: True where j may serve as a negative of i (j != i, no shared id)."""
  keep = ~jnp.eye(batch_size, dtype=bool)
  if query_ids is not None:
    keep &= query_ids[:, None] != query_ids[None, :]
  if doc_ids is not None:
    keep &= doc_ids[:, None] != doc_ids[None, :]
  return keep


def _similarity(a: Array, b: Array, temperature: float) -> Array:
  """[len(a), len(b)] <a_i, b_j> / tau in float32."""
  return a.astype(jnp.float32) @ b.astype(jnp.float32).T / temperature


def _flat_negatives(negatives: Array) -> Array:
  return negatives.reshape(-1, negatives.shape[-1])  # [B, N, D] -> [B*N, D]


def _hard_negative_valid(b: int, negatives: Array, doc_ids: Optional[Array],
                         negative_ids: Optional[Array]) -> Array:
  """[B, B*N] bool: a hard negative whose id is row i's positive id is not its negative."""
  if negative_ids is not None and doc_ids is not None:
    return doc_ids[:, None] != negative_ids.reshape(1, -1)
  return jnp.ones((b, negatives.shape[0] * negatives.shape[1]), dtype=bool)


def _lists(blocks: list[tuple[Array, Array]], positive_column: Array) -> Lists:
  """Concatenated (scores, valid) blocks, with a one-hot label at `positive_column` [B]."""
  scores = jnp.concatenate([s for s, _ in blocks], axis=1)
  where = jnp.concatenate([w for _, w in blocks], axis=1)
  labels = jax.nn.one_hot(positive_column, scores.shape[1], dtype=jnp.float32)
  return scores, labels, where


def query_to_doc_lists(query: Array, doc: Array, negatives: Optional[Array] = None, *,
                       temperature: float = 0.01, same_tower: bool = False,
                       query_ids: Optional[Array] = None, doc_ids: Optional[Array] = None,
                       negative_ids: Optional[Array] = None) -> Lists:
  """Row i: query i against [d_j for all j] + [n_{j,k}] + ([q_j, j != i] with SamToNe).

  Args:
    query, doc: [B, D] embeddings (positives on the diagonal).
    negatives: optional [B, N, D] hard negatives, shared by every row.
    temperature: tau.
    same_tower: append the query-query block (query-side SamToNe).
    query_ids, doc_ids, negative_ids: optional ids for false-negative masking.
  Returns:
    (scores, labels, where), each [B, B + B*N (+ B)]; label 1 at column i.
  """
  b = query.shape[0]
  keep = false_negative_mask(query_ids, doc_ids, b)
  blocks = [(_similarity(query, doc, temperature), keep | jnp.eye(b, dtype=bool))]
  if negatives is not None:
    blocks.append((_similarity(query, _flat_negatives(negatives), temperature),
                   _hard_negative_valid(b, negatives, doc_ids, negative_ids)))
  if same_tower:
    blocks.append((_similarity(query, query, temperature), keep))
  return _lists(blocks, jnp.arange(b))


def doc_to_query_lists(query: Array, doc: Array, *, temperature: float = 0.01,
                       same_tower: bool = False, query_ids: Optional[Array] = None,
                       doc_ids: Optional[Array] = None) -> Lists:
  """Row i: document i against [q_j for all j] + ([d_j, j != i] with SamToNe).

  Args: as `query_to_doc_lists`; same_tower appends the document-document block.
  Returns:
    (scores, labels, where), each [B, B (+ B)]; label 1 at column i.
  """
  b = query.shape[0]
  keep = false_negative_mask(query_ids, doc_ids, b)
  # The transpose of the query->doc block, so both directions share one product.
  blocks = [(_similarity(query, doc, temperature).T, keep | jnp.eye(b, dtype=bool))]
  if same_tower:
    blocks.append((_similarity(doc, doc, temperature), keep))
  return _lists(blocks, jnp.arange(b))


def passage_centric_lists(query: Array, doc: Array, negatives: Optional[Array] = None, *,
                          temperature: float = 0.01, query_ids: Optional[Array] = None,
                          doc_ids: Optional[Array] = None,
                          negative_ids: Optional[Array] = None) -> Lists:
  """PAIR's passage-centric row i: [s(d_i, q_i)] + [d_j, j != i] + [n_{j,k}].

  Args: as `query_to_doc_lists`.
  Returns:
    (scores, labels, where), each [B, 1 + B (+ B*N)]; label 1 at column 0.
  """
  b = query.shape[0]
  positive = jnp.diagonal(_similarity(query, doc, temperature))[:, None]
  blocks = [(positive, jnp.ones((b, 1), dtype=bool)),
            (_similarity(doc, doc, temperature), false_negative_mask(query_ids, doc_ids, b))]
  if negatives is not None:
    blocks.append((_similarity(doc, _flat_negatives(negatives), temperature),
                   _hard_negative_valid(b, negatives, doc_ids, negative_ids)))
  return _lists(blocks, jnp.zeros((b,), jnp.int32))


def _softmax(lists: Lists) -> Array:
  scores, labels, where = lists
  return ranking_losses.softmax_loss(scores, labels, where=where)


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

  Definition, with s(x, y) = <x, y> / tau and, for each row, only the candidates
  the false-negative masks keep (module docstring):

      C_i  = {d_j : all j} + {n_{j,k} : all j, k} + {q_j : j != i}   (last: SamToNe query side)
      C'_i = {q_j : all j} + {d_j : j != i}                          (last: SamToNe doc side)
      query_to_doc = (1/B) sum_i -log( exp(s(q_i, d_i)) / sum_{c in C_i}  exp(s(q_i, c)) )
      doc_to_query = (1/B) sum_i -log( exp(s(d_i, q_i)) / sum_{c in C'_i} exp(s(d_i, c)) )
      loss = query_to_doc + doc_to_query       (doc_to_query only if bidirectional)

  The in-batch softmax of DPR (Karpukhin et al. 2020) and GTR / t5x_retrieval
  (Ni et al. 2021); the doc->query direction is the bidirectional loss of Yang et
  al. 2019 ("Improving Multilingual Sentence Embedding using Bi-directional Dual
  Encoder with Additive Margin Softmax"); the same-tower blocks are SamToNe
  (Moiseev et al. 2023, "SamToNe: Improving Contrastive Loss for Dual Encoder
  Retrieval Models with Same Tower Negatives").

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
  ids = dict(query_ids=query_ids, doc_ids=doc_ids)
  terms = {'query_to_doc': _softmax(query_to_doc_lists(
      query, doc, negatives, temperature=temperature,
      same_tower=same_tower_negatives in ('query', 'both'), negative_ids=negative_ids,
      **ids))}
  if bidirectional:
    terms['doc_to_query'] = _softmax(doc_to_query_lists(
        query, doc, temperature=temperature,
        same_tower=same_tower_negatives in ('doc', 'both'), **ids))
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

  Definition (Ren et al. 2021, "PAIR: Leveraging Passage-Centric Similarity
  Relation for Improving Dense Passage Retrieval"), with s and the masks as in
  `in_batch_softmax_loss`:

      C_i = {d_j : all j} + {n_{j,k} : all j, k}
      P_i = {q_i} + {d_j : j != i} + {n_{j,k} : all j, k}
      query_centric   = (1/B) sum_i -log( exp(s(q_i, d_i)) / sum_{c in C_i} exp(s(q_i, c)) )
      passage_centric = (1/B) sum_i -log( exp(s(d_i, q_i)) / sum_{c in P_i} exp(s(d_i, c)) )
      loss = (1 - alpha) * query_centric + alpha * passage_centric

  Args: as `in_batch_softmax_loss`; alpha weighs the passage-centric term.
  Returns:
    (loss, terms) with terms 'query_centric' and 'passage_centric' (unweighted).
  """
  common = dict(temperature=temperature, query_ids=query_ids, doc_ids=doc_ids,
             negative_ids=negative_ids)
  query_centric = _softmax(query_to_doc_lists(query, doc, negatives, **common))
  passage_centric = _softmax(passage_centric_lists(query, doc, negatives, **common))
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
