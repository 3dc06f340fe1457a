"""Reranker training lists: window sampling, determinism, process slices, errors."""

import json
import logging
import os

import numpy as np
import pytest

from t5dual import vocab
from t5dual.data import lists, sources

WORDS = ('alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone '
         'cloud forest ember frost').split()
NUM_DOCS, NUM_QUERIES, RUN_DEPTH = 40, 8, 20


def _doc_text(i):
  return ' '.join(WORDS[(i * k) % len(WORDS)] for k in range(1, 6 + i % 7))


def _rank_of(q, r):
  """The run's document at 1-based rank r of query q (a permutation per query)."""
  return f'd{(q * 7 + r * 3) % NUM_DOCS}'


def _write_collection(folder, run_queries=NUM_QUERIES):
  (folder / 'qrels').mkdir(parents=True, exist_ok=True)
  with open(folder / 'corpus.jsonl', 'w') as f:
    for i in range(NUM_DOCS):
      f.write(json.dumps({'_id': f'd{i}', 'title': f'title {WORDS[i % 5]}',
                          'text': _doc_text(i)}) + '\n')
  with open(folder / 'queries.jsonl', 'w') as f:
    for q in range(NUM_QUERIES + 1):
      f.write(json.dumps({'_id': f'q{q}', 'text': f'query {WORDS[q]} {WORDS[q + 3]}'}) + '\n')
  qrels = ['query-id\tcorpus-id\tscore']
  for q in range(NUM_QUERIES - 1):  # q7 has only a non-relevant judgement
    qrels.append(f'q{q}\t{_rank_of(q, 2)}\t2')        # a positive inside the run
    qrels.append(f'q{q}\t{_rank_of(q, 30)}\t1')       # a positive the run missed
    qrels.append(f'q{q}\t{_rank_of(q, 5)}\t0')        # judged non-relevant
  qrels.append(f'q{NUM_QUERIES - 1}\t{_rank_of(NUM_QUERIES - 1, 1)}\t0')
  (folder / 'qrels' / 'train.tsv').write_text('\n'.join(qrels) + '\n')
  lines = []
  for q in list(range(run_queries)) + [NUM_QUERIES]:  # q8: in the run, not in the qrels
    for r in range(1, RUN_DEPTH + 1):
      lines.append(f'q{q} Q0 {_rank_of(q, r)} {r} {100.0 - r:.3f} bm25')
  lines.reverse()  # ranks come from the scores, not from the file order
  (folder / 'run.trec').write_text('\n'.join(lines) + '\n')
  return folder


@pytest.fixture(scope='module')
def collection(tmp_path_factory):
  return _write_collection(tmp_path_factory.mktemp('lists'))


@pytest.fixture(scope='module')
def tokenizer(collection):
  texts = [_doc_text(i) for i in range(NUM_DOCS)] + WORDS + ['Query: Document: title query']
  return vocab.Tokenizer(vocab.train_sentencepiece(texts, str(collection / 'spm'), 120))


def _lists(collection, **kwargs):
  return lists.load_lists(str(collection), 'train', str(collection / 'run.trec'), **kwargs)


def _batcher(collection, tokenizer, **kwargs):
  window = {k: kwargs.pop(k) for k in ('min_rank', 'max_rank', 'teacher_path') if k in kwargs}
  return lists.ListBatcher(_lists(collection, **window), tokenizer,
                           **{'batch_size': 4, 'list_size': 6, 'input_length': 24, **kwargs})


def _assert_batches_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_is_a_pure_function_of_seed_and_step(collection, tokenizer):
  first = _batcher(collection, tokenizer, seed=3)
  walked = [first.batch(s) for s in range(7)]  # several epochs: 7 queries, batch 4
  fresh = _batcher(collection, tokenizer, seed=3)  # a resumed run: no iterator state
  for s in (6, 2, 5):
    _assert_batches_equal(fresh.batch(s), walked[s])
  other_seed = _batcher(collection, tokenizer, seed=4).batch(2)
  assert not np.array_equal(other_seed['inputs'], walked[2]['inputs'])
  assert not np.array_equal(walked[0]['inputs'], walked[1]['inputs'])


def test_process_slices_concatenate_to_the_global_batch(collection, tokenizer):
  batcher = _batcher(collection, tokenizer, batch_size=8, teacher_path=None)
  for step in (0, 3):
    whole = batcher.batch(step)
    parts = [batcher.batch(step, p, 4) for p in range(4)]
    _assert_batches_equal(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})
  with pytest.raises(ValueError, match='not divisible'):
    batcher.batch(0, 0, 3)


def test_each_epoch_visits_every_query_once(collection, tokenizer):
  batcher = _batcher(collection, tokenizer, batch_size=7)
  assert len(batcher.lists) == 7  # q0..q6
  for step in range(3):
    assert sorted(batcher.list_indices(step).tolist()) == list(range(7))


def test_window_sampling_respects_ranks_and_labels(collection, tokenizer):
  batcher = _batcher(collection, tokenizer, min_rank=3, max_rank=9, num_positives=2,
                     list_size=5)
  data = batcher.lists
  for step in range(12):
    batch = batcher.batch(step)
    for row, (position, query) in enumerate(zip(batcher.positions(step),
                                                batcher.list_indices(step))):
      q = int(data.query_ids[query][1:])
      docs, labels = batcher.sample(int(position), int(query))
      ids = [data.doc_ids[d] for d in docs]
      expected = {_rank_of(q, 2): 2.0, _rank_of(q, 30): 1.0}
      for doc_id, label in zip(ids, labels):
        if label:
          assert expected[doc_id] == label
        else:  # a negative: inside the window, never a positive
          rank = next(r for r in range(1, RUN_DEPTH + 1) if _rank_of(q, r) == doc_id)
          assert 3 <= rank <= 9 and doc_id not in expected
      assert len(docs) == 5 and len(set(docs)) == 5 and sum(l > 0 for l in labels) == 2
      np.testing.assert_array_equal(batch['labels'][row], labels)
      assert batch['where'][row].all()
  # The judged non-relevant document at rank 5 is a valid negative.
  negatives = {data.doc_ids[d] for d in data.negatives[0]}
  assert _rank_of(0, 5) in negatives and _rank_of(0, 2) not in negatives
  assert [data.doc_ids[d] for d in data.negatives[0]] == [_rank_of(0, r) for r in range(3, 10)
                                                          if r not in (2,)]


def test_inputs_are_the_template_tokenized_with_eos(collection, tokenizer):
  for input_fn in (lists.reranker_input, lambda q, d: f'{d} || {q}'):
    batcher = _batcher(collection, tokenizer, input_fn=input_fn, input_length=16)
    batch = batcher.batch(1)
    data = batcher.lists
    for row, (position, query) in enumerate(zip(batcher.positions(1),
                                                batcher.list_indices(1))):
      docs, _ = batcher.sample(int(position), int(query))
      texts = [input_fn(data.queries[query], data.documents[d]) for d in docs]
      np.testing.assert_array_equal(batch['inputs'][row, :len(docs)],
                                    tokenizer.encode(texts, 16))
    assert batch['inputs'].dtype == np.int32 and batch['inputs'].shape == (4, 6, 16)
  assert lists.reranker_input('q', 'd') == 'Query: q Document: d'
  # Trimmed to 15 pieces, then EOS (T5 / seqio append_eos_after_trim).
  assert np.all(batch['inputs'][batch['where']][:, -1] == 1)


def test_short_windows_are_padded(collection, tokenizer):
  batcher = _batcher(collection, tokenizer, min_rank=1, max_rank=3, list_size=8)
  batch = batcher.batch(0)
  # Window of 3 ranks minus the positive at rank 2: 2 negatives + 1 positive.
  assert batch['where'].sum(axis=1).tolist() == [3] * 4
  assert np.all(batch['inputs'][~batch['where']] == 0)
  assert np.all(batch['labels'][~batch['where']] == 0)
  assert np.all((batch['labels'] > 0).sum(axis=1) == 1)


def test_queries_without_positive_or_negatives_are_skipped_once(collection, caplog):
  with caplog.at_level(logging.WARNING, logger='t5dual.data.lists'):
    data = _lists(collection)
  # q7: judged only non-relevant; q8: in the run, not in the qrels.
  assert data.skipped == {'no positive': 2}
  assert data.query_ids == [f'q{q}' for q in range(7)]
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and 'skipped 2 queries' in warnings[0].getMessage()


def test_queries_missing_from_the_run_are_skipped(tmp_path):
  folder = _write_collection(tmp_path / 'c', run_queries=3)
  data = _lists(folder)
  assert data.query_ids == ['q0', 'q1', 'q2']
  assert data.skipped == {'no positive': 2, 'no negative in the rank window': 4}


def test_teacher_scores_from_jsonl_and_run(collection, tokenizer, tmp_path):
  rng = np.random.default_rng(0)
  scored = {q: {_rank_of(q, r): float(rng.normal()) for r in range(1, 13)}
            for q in range(NUM_QUERIES)}
  scored[0].pop(_rank_of(0, 4))          # the teacher never saw this one
  for q in range(1, NUM_QUERIES):
    scored[q].pop(_rank_of(q, 2))        # q1..q6 lose their in-run positive ...
    scored[q][_rank_of(q, 30)] = 5.0      # ... but keep the one the run missed
  path = tmp_path / 'teacher.jsonl'
  lines = [json.dumps({'query_id': f'q{q}', 'scores': s}) for q, s in scored.items() if q]
  lines.append(json.dumps({'query_id': 'q0', 'ranking': list(scored[0])}))
  path.write_text('\n'.join(lines) + '\n')
  batcher = _batcher(collection, tokenizer, teacher_path=str(path), list_size=8)
  data = batcher.lists
  for step in range(4):
    batch = batcher.batch(step)
    for row, (position, query) in enumerate(zip(batcher.positions(step),
                                                batcher.list_indices(step))):
      q = int(data.query_ids[query][1:])
      docs, _ = batcher.sample(int(position), int(query))
      if q == 0:  # a ranking: score = -rank
        ranking = list(scored[0])
        expected = [-(ranking.index(data.doc_ids[d]) + 1.0) for d in docs]
      else:
        expected = [scored[q][data.doc_ids[d]] for d in docs]
      np.testing.assert_allclose(batch['teacher_scores'][row, :len(docs)], expected)
  assert _rank_of(0, 4) not in {data.doc_ids[d] for d in data.negatives[0]}
  assert np.all(batch['teacher_scores'][~batch['where']] == 0)
  # The same scores as a TREC run.
  run = tmp_path / 'teacher.trec'
  run.write_text(''.join(f'q{q} Q0 {d} 1 {s} t\n' for q, ss in scored.items() if q
                         for d, s in ss.items()))
  data = _lists(collection, teacher_path=str(run))
  assert data.skipped['no teacher score for a positive'] == 1  # q0 is not in this run
  assert data.teacher[0] == {r: scored[1][data.doc_ids[r]] for r in data.teacher[0]}


def _bad_run(collection, tmp_path, lines):
  path = tmp_path / 'bad.trec'
  path.write_text('\n'.join(lines) + '\n')
  return lambda: lists.load_lists(str(collection), 'train', str(path))


@pytest.mark.parametrize('bad_line, message', [
    ('q0 Q0 d1 1 2.0', r'bad.trec:2: expected "qid Q0 docid rank score tag"'),
    ('q0 Q0 d1 1 high run', r"bad.trec:2: score 'high' is not a number"),
    ('q0 Q0 d1 1 nan run', r"bad.trec:2: score 'nan' is not finite"),
    ('q99 Q0 d1 1 2.0 run', r"bad.trec:2: query id 'q99' is not in queries.jsonl"),
    ('q0 Q0 d999 1 2.0 run', r"bad.trec:2: document id 'd999' is not in corpus.jsonl"),
    ('q0 Q0 d3 2 2.0 run', r"bad.trec:2: document 'd3' listed twice for query 'q0' "
                           r"\(first on line 1\)"),
])
def test_bad_run_lines_name_file_and_line(collection, tmp_path, bad_line, message):
  with pytest.raises(sources.DataError, match=message):
    _bad_run(collection, tmp_path, ['q0 Q0 d3 1 3.0 run', bad_line])()


@pytest.mark.parametrize('record, message', [
    ('{"query_id": "q0", "scores": {"d1": "x"}}', r'teacher.jsonl:2: "scores" must map'),
    ('{"query_id": "q42", "scores": {}}', r"teacher.jsonl:2: \"query_id\" 'q42' is not in"),
    ('{"query_id": "q0", "scores": {"d77": 1}}', r"teacher.jsonl:2: document id 'd77'"),
    ('{"query_id": "q1", "ranking": ["d1"]}', r"teacher.jsonl:2: query 'q1' again"),
    ('{"query_id": "q0"}', r'teacher.jsonl:2: give exactly one of'),
    ('{"query_id": "q0", "ranking": ["d1", "d1"]}', r'teacher.jsonl:2: "ranking" must be'),
    ('{"query_id": ', r'teacher.jsonl:2: not valid JSON'),
])
def test_bad_teacher_lines_name_file_and_line(collection, tmp_path, record, message):
  path = tmp_path / 'teacher.jsonl'
  path.write_text('{"query_id": "q1", "scores": {"d1": 1.0}}\n' + record + '\n')
  with pytest.raises(sources.DataError, match=message):
    _lists(collection, teacher_path=str(path))


def test_bad_qrels_and_settings(collection, tokenizer, tmp_path):
  folder = _write_collection(tmp_path / 'c')
  with open(folder / 'qrels' / 'train.tsv', 'a') as f:
    f.write('q1\td404\t1\n')
  with pytest.raises(sources.DataError, match=r"train.tsv:\d+: corpus id 'd404'"):
    _lists(folder)
  with pytest.raises(ValueError, match='rank window'):
    _lists(collection, min_rank=5, max_rank=4)
  with pytest.raises(sources.DataError, match='no query has both'):
    _lists(collection, min_rank=200, max_rank=300)
  for size in (1, 101):
    with pytest.raises(ValueError, match='list_size'):
      _batcher(collection, tokenizer, list_size=size)
  with pytest.raises(ValueError, match='num_positives'):
    _batcher(collection, tokenizer, list_size=4, num_positives=4)


def test_a_run_too_large_for_memory_is_pointed_at_the_store(collection, caplog, monkeypatch):
  """Past sources.LARGE_SOURCE_GIB of estimated host memory, one warning gives the
  prepare command for the same lists; below it, nothing."""
  run = str(collection / 'run.trec')
  with caplog.at_level(logging.WARNING, logger='t5dual.data.lists'):
    _lists(collection, min_rank=2, max_rank=20)
  assert not [r for r in caplog.records if 'prepare it once' in r.getMessage()]
  monkeypatch.setattr(sources, 'LARGE_SOURCE_GIB', os.path.getsize(run) * 12 / 2**30)
  with caplog.at_level(logging.WARNING, logger='t5dual.data.lists'):
    _lists(collection, min_rank=2, max_rank=20)
  message, = [r.getMessage() for r in caplog.records if 'prepare it once' in r.getMessage()]
  assert message.startswith(f'{run}: reading this into memory takes ~0 GiB on every host')
  assert (f'scripts/prepare_data.py --source=beir:{collection}:train --run={run} '
          '--min_rank=2 --max_rank=20 --vocabulary=') in message
  assert "MIXTURE_OR_TASK_NAME='store:<dir>'" in message
