"""Run files read back as a user's tool reads them: line by line, the rank column and the order
of the lines taken at their word (head, rank fusion, a person), not re-sorted by score."""

import math


def read_as_written(path):
  """{query id: [(doc id, rank, score), ...] in line order}; a query's lines must be together."""
  rows, order = {}, []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      qid, q0, doc, rank, score, tag = line.split()
      assert q0 == 'Q0', f'{path}:{lineno}: {line!r}'
      if not order or order[-1] != qid:
        assert qid not in rows, f'{path}:{lineno}: the lines of query {qid!r} are split'
        order.append(qid)
      rows.setdefault(qid, []).append((doc, int(rank), float(score)))
  return rows


def assert_in_score_order(path):
  """Every query's lines are in descending score order with ranks 1, 2, ..., k, so the line
  order, the rank column and the scores tell one ranking. Returns {query id: [doc ids]}."""
  rows = read_as_written(path)
  assert rows, f'{path} is empty'
  for qid, docs in rows.items():
    ranks = [r for _, r, _ in docs]
    assert ranks == list(range(1, len(docs) + 1)), f'{path}: query {qid!r} ranks {ranks[:10]}'
    scores = [s for _, _, s in docs if not math.isnan(s)]
    assert all(a >= b for a, b in zip(scores, scores[1:])), (
        f'{path}: query {qid!r} is not in score order: {scores[:10]}')
  return {qid: [d for d, _, _ in docs] for qid, docs in rows.items()}
