"""Ranking losses against rax and direct NumPy float64 formulas, with padding."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import rax

from t5dual import ranking_losses as rl

B, L = 5, 7
RTOL = 1e-5  # float32 vs float64 on O(1) losses over <= 49 pairs


def _lists(seed=0, one_positive=False):
  """Random scores, graded labels (a positive in every list), padding, teacher scores."""
  rng = np.random.default_rng(seed)
  scores = rng.normal(scale=2.0, size=(B, L)).astype(np.float32)
  teacher = rng.normal(scale=3.0, size=(B, L)).astype(np.float32)
  where = rng.random((B, L)) < 0.75
  where[:, :3] = True           # at least a positive and two negatives
  where[1, 3:] = False          # a short list
  labels = np.where(rng.random((B, L)) < 0.3, rng.integers(1, 3, (B, L)), 0)
  labels[:, 0] = 0
  labels[:, 1] = rng.integers(1, 3, B)
  if one_positive:
    labels = (np.arange(L) == 1)[None].repeat(B, 0)
  labels = np.where(where, labels, 0).astype(np.float32)
  return scores, labels, where, teacher


# ---------------------------------------------------------------- references

def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max() - np.log(np.sum(np.exp(x - x.max())))


def _ref_pointwise(s, y, w):
  s, y = s[w].astype(np.float64), np.clip(y[w], 0, 1)
  p = 1 / (1 + np.exp(-s))
  return np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _pairs_mean(s, y, w, pair_loss):
  out = [pair_loss(s[b, i], s[b, j]) for b in range(len(s)) for i in range(L) for j in range(L)
         if w[b, i] and w[b, j] and y[b, i] > y[b, j]]
  return np.mean(out)


def _logistic(si, sj):
  return np.log1p(np.exp(-(np.float64(si) - sj)))


def _ref_pairwise(s, y, w):
  return _pairs_mean(s, y, w, _logistic)


def _ref_softmax(s, y, w, epsilon=None):
  out = []
  for b in range(len(s)):
    logp = _log_softmax(s[b][w[b]])
    yb = y[b][w[b]].astype(np.float64)
    loss = -np.sum(yb * logp)
    if epsilon is not None:
      loss += epsilon * (1 - np.sum(yb / yb.sum() * np.exp(logp)))
    out.append(loss)
  return np.mean(out)


def _target(y, w):
  return int(np.argmax(np.where(w, y, -np.inf)))


def _ref_lce(s, y, w):
  out = []
  for b in range(len(s)):
    t = _target(y[b], w[b])
    keep = [t] + [i for i in range(L) if w[b, i] and y[b, i] == 0]
    out.append(-_log_softmax(s[b][keep])[0])
  return np.mean(out)


def _ref_teacher_ranknet(s, t, w):
  """Pairs the teacher orders: t_i > t_j (the rank labels keep exactly these)."""
  return _pairs_mean(s, t, w, _logistic)


def _ref_kl(s, t, w, temperature=1.0):
  out = []
  for b in range(len(s)):
    logq = _log_softmax(t[b][w[b]] / temperature)
    logp = _log_softmax(s[b][w[b]] / temperature)
    out.append(np.sum(np.exp(logq) * (logq - logp)))
  return np.mean(out)


def _ref_margin_mse(s, y, w, t):
  out = []
  for b in range(len(s)):
    p = _target(y[b], w[b])
    for n in range(L):
      if w[b, n] and y[b, n] == 0:
        out.append(((np.float64(s[b, p]) - s[b, n]) - (np.float64(t[b, p]) - t[b, n])) ** 2)
  return np.mean(out)


# Every loss: (function, extra kwargs, NumPy reference(scores, labels, where, teacher)).
LOSSES = {
    'pointwise_sigmoid': (rl.pointwise_sigmoid_loss, {}, lambda s, y, w, t: _ref_pointwise(s, y, w)),
    'pairwise_logistic': (rl.pairwise_logistic_loss, {}, lambda s, y, w, t: _ref_pairwise(s, y, w)),
    'softmax': (rl.softmax_loss, {}, lambda s, y, w, t: _ref_softmax(s, y, w)),
    'poly1': (rl.poly1_softmax_loss, {'epsilon': 0.7},
              lambda s, y, w, t: _ref_softmax(s, y, w, epsilon=0.7)),
    'lce': (rl.lce_loss, {}, lambda s, y, w, t: _ref_lce(s, y, w)),
    'teacher_ranknet': (rl.teacher_rank_pairwise_loss, {'teacher': True},
                        lambda s, y, w, t: _ref_teacher_ranknet(s, t, w)),
    'kl': (rl.kl_distillation_loss, {'teacher': True, 'temperature': 2.0},
           lambda s, y, w, t: _ref_kl(s, t, w, 2.0)),
    'margin_mse': (rl.margin_mse_loss, {'teacher': True},
                   lambda s, y, w, t: _ref_margin_mse(s, y, w, t)),
}


def _call(name, scores, labels, where, teacher):
  fn, kwargs, _ = LOSSES[name]
  kwargs = dict(kwargs)
  if kwargs.pop('teacher', False):
    kwargs['teacher_scores'] = teacher
  return fn(scores, labels, where=where, **kwargs)


@pytest.mark.parametrize('name', list(LOSSES))
def test_loss_matches_numpy_float64(name):
  scores, labels, where, teacher = _lists(1)
  ours = float(_call(name, scores, labels, where, teacher))
  np.testing.assert_allclose(ours, LOSSES[name][2](scores, labels, where, teacher), rtol=RTOL)


@pytest.mark.parametrize('name, rax_fn, kwargs', [
    ('pointwise_sigmoid', rax.pointwise_sigmoid_loss, {}),
    ('pairwise_logistic', rax.pairwise_logistic_loss, {}),
    ('softmax', rax.softmax_loss, {}),
    ('poly1', rax.poly1_softmax_loss, {'epsilon': 0.7}),
])
def test_wrapped_loss_equals_rax(name, rax_fn, kwargs):
  scores, labels, where, teacher = _lists(2)
  ours, ours_grad = jax.value_and_grad(
      lambda s: _call(name, s, labels, where, teacher))(jnp.asarray(scores))
  ref, ref_grad = jax.value_and_grad(
      lambda s: rax_fn(s, labels, where=where, **kwargs))(jnp.asarray(scores))
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ours_grad), np.asarray(ref_grad), atol=1e-7)


def test_lce_is_rax_softmax_with_one_positive():
  scores, labels, where, _ = _lists(3, one_positive=True)
  np.testing.assert_allclose(float(rl.lce_loss(scores, labels, where=where)),
                             float(rax.softmax_loss(scores, labels, where=where)), rtol=1e-6)
  # With a second positive the LCE target competes only with the negatives.
  labels[:, 2] = 1.0
  assert float(rl.lce_loss(scores, labels, where=where)) != pytest.approx(
      float(rax.softmax_loss(scores, labels, where=where)), rel=1e-3)


def test_teacher_rank_labels_follow_ranks():
  teacher = np.array([[0.5, 2.0, 0.5, -1.0, 7.0]], np.float32)
  where = np.array([[True, True, True, True, False]])
  # ranks 2, 1, 2 (tie), 4 among 4 valid -> labels 4 - rank + 1; padding -> 0
  np.testing.assert_array_equal(np.asarray(rl.teacher_rank_labels(teacher, where)),
                                [[3, 4, 3, 1, 0]])


def test_margin_mse_on_triples_is_hofstaetter():
  rng = np.random.default_rng(4)
  s, t = rng.normal(size=(6, 2)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
  labels = np.tile(np.array([[1.0, 0.0]], np.float32), (6, 1))
  ref = np.mean(((s[:, 0] - s[:, 1]) - (t[:, 0] - t[:, 1])).astype(np.float64) ** 2)
  np.testing.assert_allclose(float(rl.margin_mse_loss(s, labels, teacher_scores=t)), ref,
                             rtol=RTOL)


def test_kl_is_zero_for_the_teacher_itself():
  scores, labels, where, _ = _lists(5)
  assert abs(float(rl.kl_distillation_loss(scores, labels, teacher_scores=scores,
                                           where=where))) < 1e-6


@pytest.mark.parametrize('name', list(LOSSES))
def test_padding_changes_neither_loss_nor_gradient(name):
  scores, labels, where, teacher = _lists(6)
  pad = ~where
  rng = np.random.default_rng(7)
  junk = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30, -50.0, 3.0], np.float32), (B, L))
  f = lambda s, y, t: _call(name, s, y, where, t)
  value, grad = jax.value_and_grad(f)(jnp.asarray(scores), labels, teacher)
  value2, grad2 = jax.value_and_grad(f)(jnp.asarray(np.where(pad, junk, scores)),
                                        np.where(pad, 2.0, labels).astype(np.float32),
                                        np.where(pad, junk[::-1], teacher))
  assert np.isfinite(float(value)) and float(value) == float(value2)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad2))
  assert np.all(np.asarray(grad)[pad] == 0.0)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize('name', ['softmax', 'poly1', 'lce', 'kl'])
def test_fully_padded_list_is_ignored(name):
  scores, labels, where, teacher = _lists(8)
  keep = np.arange(B) != 2
  empty = where.copy()
  empty[2] = False
  full = _call(name, scores, labels, empty, teacher)
  rest = _call(name, scores[keep], labels[keep], where[keep], teacher[keep])
  np.testing.assert_allclose(float(full), float(rest), rtol=1e-6)
  grad = jax.grad(lambda s: _call(name, s, labels, empty, teacher))(jnp.asarray(scores))
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[2] == 0)


def test_takes_teacher_scores():
  assert rl.takes_teacher_scores(rl.kl_distillation_loss)
  assert rl.takes_teacher_scores(rl.margin_mse_loss)
  assert not rl.takes_teacher_scores(rl.softmax_loss)
  assert not rl.takes_teacher_scores(rl.lce_loss)


def test_losses_are_selected_in_gin_by_reference():
  gin = pytest.importorskip('gin')
  scores, labels, where, _ = _lists(9)

  def configured(*lines):
    """The function a `loss_fn = @...` binding hands its consumer."""
    gin.clear_config()
    gin.parse_config('\n'.join(['from __gin__ import dynamic_registration',
                                'from t5dual import ranking_losses', *lines]))
    return gin.query_parameter('%LOSS').scoped_configurable_fn

  with gin.unlock_config():
    try:
      loss_fn = configured('LOSS = @ranking_losses.poly1_softmax_loss',
                           'ranking_losses.poly1_softmax_loss.epsilon = 0.25')
      np.testing.assert_allclose(
          float(loss_fn(scores, labels, where=where)),
          float(rax.poly1_softmax_loss(scores, labels, where=where, epsilon=0.25)), rtol=1e-6)
      assert not rl.takes_teacher_scores(loss_fn)
      assert rl.takes_teacher_scores(configured('LOSS = @ranking_losses.kl_distillation_loss'))
    finally:
      gin.clear_config()


def test_in_batch_builders_feed_any_ranking_loss():
  from t5dual import losses
  rng = np.random.default_rng(10)
  q, d, n = (rng.normal(size=s).astype(np.float32) for s in ((4, 8), (4, 8), (4, 2, 8)))
  qids, dids, nids = np.array([0, 1, 0, 2]), np.arange(4), np.array([[1, 5], [6, 7], [8, 9],
                                                                     [10, 3]])
  scores, labels, where = losses.query_to_doc_lists(
      q, d, n, temperature=0.5, same_tower=True, query_ids=qids, doc_ids=dids,
      negative_ids=nids)
  assert scores.shape == labels.shape == where.shape == (4, 4 + 8 + 4)
  np.testing.assert_array_equal(labels[:, :4], np.eye(4))
  np.testing.assert_allclose(scores[:, :4], q @ d.T / 0.5, rtol=1e-6)
  assert not where[0, 2] and not where[2, 0]             # same query id: not a negative
  assert not where[0, 4 + 8 + 0] and where[0, 4 + 8 + 1]  # SamToNe block: never itself
  assert not where[1, 4 + 0] and not where[3, 4 + 7]      # hard negative = own positive
  np.testing.assert_allclose(float(rl.lce_loss(scores, labels, where=where)),
                             float(rl.softmax_loss(scores, labels, where=where)), rtol=1e-6)
  dq_scores, dq_labels, _ = losses.doc_to_query_lists(q, d, temperature=0.5)
  np.testing.assert_allclose(dq_scores, (q @ d.T / 0.5).T, rtol=1e-6)
  np.testing.assert_array_equal(dq_labels, np.eye(4))
  p_scores, p_labels, p_where = losses.passage_centric_lists(q, d, n, temperature=0.5)
  np.testing.assert_allclose(p_scores[:, 0], np.sum(q * d, 1) / 0.5, rtol=1e-5)
  assert p_labels[:, 0].tolist() == [1] * 4 and p_labels[:, 1:].sum() == 0
  assert not p_where[np.arange(4), 1 + np.arange(4)].any()  # d_i is not its own negative
