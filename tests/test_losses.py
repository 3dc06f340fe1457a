"""Losses against sentence-transformers and independent PyTorch computations."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
st_losses = pytest.importorskip('sentence_transformers.sentence_transformer.losses')

from t5dual import losses
from t5dual.dual_encoders import l2_normalize
import tolerances  # tests/helpers

TAU = 0.01


def _loss_error(width):
  """float32 error of a softmax loss over unit vectors: logits up to 1/TAU (|cos| <= 1), made by
  normalising and a dot product, then logsumexp; `width`: the longest of these reductions."""
  return dict(magnitude=1 / TAU, depth=3, width=width)


def _gradient_error(grad, width):
  """float32 error of the loss gradient: as large as its largest entry, through the three
  reductions of the forward pass and their three transposes in the backward pass."""
  return dict(magnitude=np.abs(grad).max(), depth=6, width=width)


def _emb(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _st_loss(q, d, negs=None, directions=('query_to_doc',)):
  loss = st_losses.MultipleNegativesRankingLoss(
      model=None, scale=1.0 / TAU, directions=directions, partition_mode='joint')
  # float64 reference: only t5dual's float32 rounding counts.
  tensor = lambda x: torch.tensor(x, dtype=torch.float64, requires_grad=True)
  cols = [tensor(q), tensor(d)]
  if negs is not None:
    cols += [tensor(negs[:, k]) for k in range(negs.shape[1])]
  value = loss.compute_loss_from_embeddings(cols, None)
  value.backward()
  return float(value.detach()), [c.grad.numpy() for c in cols]


def _torch_ce(rows):
  """Mean over i of -log softmax(rows[i])[0]: the positive is column 0."""
  return torch.stack([torch.logsumexp(r, 0) - r[0] for r in rows]).mean()


@pytest.mark.slow
def test_query_side_samtone_matches_sentence_transformers():
  rng = np.random.default_rng(0)
  q, d = _emb(rng, 16, 32), _emb(rng, 16, 32)
  ref, (gq, gd) = _st_loss(q, d, directions=('query_to_doc', 'query_to_query'))
  # ST's cos_sim normalises inside the graph; so does the model (l2_normalize).
  fn = lambda q, d: losses.in_batch_softmax_loss(
      l2_normalize(q), l2_normalize(d), bidirectional=False, same_tower_negatives='query',
      temperature=TAU)[0]
  ours, (oq, od) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(d))
  tolerances.assert_close(ours, ref, **_loss_error(width=32))
  tolerances.assert_close(oq, gq, **_gradient_error(gq, width=32))
  tolerances.assert_close(od, gd, **_gradient_error(gd, width=32))


@pytest.mark.slow
def test_plain_softmax_with_hard_negatives_matches_sentence_transformers():
  rng = np.random.default_rng(1)
  q, d, n = _emb(rng, 8, 16), _emb(rng, 8, 16), _emb(rng, 8, 3, 16)
  ref, grads = _st_loss(q, d, n)
  fn = lambda q, d, n: losses.in_batch_softmax_loss(
      l2_normalize(q), l2_normalize(d), l2_normalize(n), bidirectional=False, same_tower_negatives='none', temperature=TAU)[0]
  ours, ograds = jax.value_and_grad(fn, argnums=(0, 1, 2))(q, d, n)
  tolerances.assert_close(ours, ref, **_loss_error(width=32))
  want = np.stack(grads[2:], 1)
  tolerances.assert_close(ograds[2], want, **_gradient_error(want, width=32))


def _torch_reference(q, d, side):
  """Bidirectional loss with SamToNe on `side`, written row by row in PyTorch."""
  q, d = torch.tensor(q, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
  b = q.shape[0]
  q2d, d2q = [], []
  for i in range(b):
    others = [j for j in range(b) if j != i]
    row = [q[i] @ d[i]] + [q[i] @ d[j] for j in others]
    if side in ('query', 'both'):
      row += [q[i] @ q[j] for j in others]
    q2d.append(torch.stack(row) / TAU)
    row = [d[i] @ q[i]] + [d[i] @ q[j] for j in others]
    if side in ('doc', 'both'):
      row += [d[i] @ d[j] for j in others]
    d2q.append(torch.stack(row) / TAU)
  return float(_torch_ce(q2d) + _torch_ce(d2q))


@pytest.mark.parametrize('side', ['none', 'query', 'doc', 'both'])
def test_bidirectional_loss_matches_torch(side):
  rng = np.random.default_rng(2)
  q, d = _emb(rng, 6, 8), _emb(rng, 6, 8)
  ours, terms = losses.in_batch_softmax_loss(q, d, same_tower_negatives=side,
                                             temperature=TAU)
  tolerances.assert_close(ours, _torch_reference(q, d, side), **_loss_error(width=11))
  assert set(terms) == {'query_to_doc', 'doc_to_query'}


def test_samtone_adds_to_the_denominator_only():
  rng = np.random.default_rng(3)
  q, d = _emb(rng, 6, 8), _emb(rng, 6, 8)
  plain = losses.in_batch_softmax_loss(q, d, same_tower_negatives='none')[0]
  samtone = losses.in_batch_softmax_loss(q, d, same_tower_negatives='query')[0]
  assert float(samtone) > float(plain)


def test_pair_matches_torch():
  rng = np.random.default_rng(4)
  q, d, n = _emb(rng, 5, 8), _emb(rng, 5, 8), _emb(rng, 5, 2, 8)
  alpha = 0.1
  tq, td, tn = (torch.tensor(x, dtype=torch.float64) for x in (q, d, n.reshape(-1, 8)))
  rows_c, rows_p = [], []
  for i in range(5):
    others = [j for j in range(5) if j != i]
    rows_c.append(torch.stack([tq[i] @ td[i]] + [tq[i] @ td[j] for j in others] +
                              [tq[i] @ x for x in tn]) / TAU)
    rows_p.append(torch.stack([td[i] @ tq[i]] + [td[i] @ td[j] for j in others] +
                              [td[i] @ x for x in tn]) / TAU)
  ref = (1 - alpha) * _torch_ce(rows_c) + alpha * _torch_ce(rows_p)
  ours, _ = losses.pair_loss(q, d, n, alpha=alpha, temperature=TAU)
  tolerances.assert_close(ours, float(ref), **_loss_error(width=15))


def test_duplicates_are_masked_out_of_negatives():
  rng = np.random.default_rng(5)
  q, d = _emb(rng, 4, 8), _emb(rng, 4, 8)
  # Rows 0 and 2 share a passage; rows 1 and 3 have the same query text.
  q[3] = q[1]
  d[2] = d[0]
  qids, dids = np.array([0, 1, 2, 1]), np.array([10, 11, 10, 12])
  ours, terms = losses.in_batch_softmax_loss(q, d, same_tower_negatives='both',
                                             query_ids=qids, doc_ids=dids, temperature=TAU)
  tq, td = torch.tensor(q, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
  allowed = {0: [1, 3], 1: [0, 2], 2: [1, 3], 3: [0, 2]}
  q2d = [torch.stack([tq[i] @ td[i]] + [tq[i] @ td[j] for j in allowed[i]] +
                     [tq[i] @ tq[j] for j in allowed[i]]) / TAU for i in range(4)]
  d2q = [torch.stack([td[i] @ tq[i]] + [td[i] @ tq[j] for j in allowed[i]] +
                     [td[i] @ td[j] for j in allowed[i]]) / TAU for i in range(4)]
  tolerances.assert_close(ours, float(_torch_ce(q2d) + _torch_ce(d2q)), **_loss_error(width=8))
  # Without ids the identical query is a "negative" as similar as the positive.
  unmasked = losses.in_batch_softmax_loss(q, d, same_tower_negatives='both',
                                          temperature=TAU)[0]
  assert float(unmasked) > float(ours) + 1.0


def test_hard_negative_equal_to_positive_is_masked():
  rng = np.random.default_rng(6)
  q, d = _emb(rng, 3, 8), _emb(rng, 3, 8)
  n = np.stack([d[[0]], d[[2]], d[[0]]])  # row 0's negative is its own positive
  neg_ids = np.array([[0], [2], [0]])
  masked = losses.in_batch_softmax_loss(q, d, n, bidirectional=False,
                                        same_tower_negatives='none', doc_ids=np.arange(3),
                                        negative_ids=neg_ids)[0]
  # Equivalent: row i may only use negatives whose id differs from i.
  tq, td = torch.tensor(q, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
  rows = []
  for i in range(3):
    negs = [td[int(k)] for k in neg_ids[:, 0] if k != i]
    rows.append(torch.stack([tq[i] @ td[i]] + [tq[i] @ td[j] for j in range(3) if j != i] +
                            [tq[i] @ x for x in negs]) / TAU)
  tolerances.assert_close(masked, float(_torch_ce(rows)), **_loss_error(width=8))


def test_in_batch_metrics():
  q = np.eye(4, dtype=np.float32)
  d = np.eye(4, dtype=np.float32)[[0, 1, 3, 2]]  # queries 2 and 3 rank their positive 2nd
  m = losses.in_batch_ranking_metrics(q, d)
  # Exact: ranks of one-hot scores and means of 1, 0.5 and 0 are exact in float32.
  assert float(m['p_at_1']) == 0.5
  assert float(m['mrr']) == (1 + 1 + 0.5 + 0.5) / 4


def test_bad_options():
  q = np.ones((2, 4), np.float32)
  with pytest.raises(ValueError, match='same_tower_negatives'):
    losses.in_batch_softmax_loss(q, q, same_tower_negatives='left')
  with pytest.raises(ValueError, match='bidirectional'):
    losses.in_batch_softmax_loss(q, q, same_tower_negatives='doc', bidirectional=False)
