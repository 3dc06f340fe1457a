"""Data readers, tokenization, batching and the seqio path."""

import json
import logging

import numpy as np
import pytest

from t5dual import cli, corpus, evaluation, retrieval, vocab
from t5dual.data import pipeline, sources


@pytest.fixture(scope='module')
def demo_data(demo_beir):
  return demo_beir(200, 40, 300)


@pytest.fixture(scope='module')
def spm(demo_data):
  return demo_data[1]


def _write(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(l + '\n' for l in lines))
  return str(path)


def _beir(tmp_path, qrels_lines, corpus=None):
  corpus = corpus or [json.dumps({'_id': 'd1', 'title': 'T', 'text': 'one'}),
                      json.dumps({'_id': 'd2', 'text': 'two'})]
  _write(tmp_path / 'corpus.jsonl', corpus)
  _write(tmp_path / 'queries.jsonl', [json.dumps({'_id': 'q1', 'text': 'first'}),
                                      json.dumps({'_id': 'q2', 'text': 'second'})])
  _write(tmp_path / 'qrels' / 'train.tsv', ['query-id\tcorpus-id\tscore'] + qrels_lines)
  return str(tmp_path)


def test_beir_pairs_and_ids(tmp_path):
  folder = _beir(tmp_path, ['q1\td1\t1', 'q2\td1\t1', 'q2\td2\t0'])
  ex = sources.beir_pairs(folder)
  assert ex.queries == ['first', 'second'] and ex.positives == ['T one', 'T one']
  assert ex.doc_ids[0] == ex.doc_ids[1] and ex.query_ids[0] != ex.query_ids[1]


@pytest.mark.parametrize('qrels,corpus,message', [
    (['q7\td1\t1'], None, r'train.tsv:2: query id .q7. is not in queries.jsonl'),
    (['q1\td1'], None, r'train.tsv:2: expected'),
    (['q1\td1\t1'], ['{"_id": "d1", "text": "x"}', '{"_id": "d1", "text": "y"}'],
     r'corpus.jsonl:2: duplicate _id .d1.'),
    (['q1\td1\t1'], ['{"_id": "d1", "title": "x"}'],
     r"corpus.jsonl:1: missing or non-string field 'text'"),
    (['q1\td1\t1'], ['{"_id": "d1", "text": "x"', ], r'corpus.jsonl:1: not valid JSON'),
    (['q1\td9\t1'], None, r'train.tsv: no positive pairs \(score >= 1\) with a document in '
                           r'corpus.jsonl'),
])
def test_beir_errors_name_file_and_line(tmp_path, qrels, corpus, message):
  folder = _beir(tmp_path, qrels, corpus)
  with pytest.raises(sources.DataError, match=message):
    sources.beir_pairs(folder)
  assert issubclass(sources.DataError, cli.UserError) and issubclass(sources.DataError,
                                                                     ValueError)


def _messages(caplog, level='WARNING'):
  return [r.getMessage() for r in caplog.records if r.levelname == level]


def test_empty_and_title_only_documents_train_with_one_warning(tmp_path, caplog):
  """As Cranfield and CACM: a document with a title only, one with nothing, an empty query."""
  corpus_lines = [json.dumps({'_id': 'd1', 'title': 'Only a title', 'text': ''}),
                  json.dumps({'_id': 'd2', 'title': '', 'text': ''}),
                  json.dumps({'_id': 'd3', 'title': None, 'text': ' body '})]
  folder = _beir(tmp_path, ['q1\td1\t1', 'q2\td2\t1', 'q1\td3\t1', 'q3\td3\t1'],
                 corpus_lines)
  with open(tmp_path / 'queries.jsonl', 'a') as f:
    f.write(json.dumps({'_id': 'q3', 'text': ''}) + '\n')
  assert sources.read_beir_corpus(folder) == (['d1', 'd2', 'd3'], ['Only a title', '', 'body'])
  with caplog.at_level(logging.WARNING):
    ex = sources.beir_pairs(folder)
  assert ex.queries == ['first', 'second', 'first', '']
  assert ex.positives == ['Only a title', '', 'body', 'body']
  assert _messages(caplog) == [
      f'{folder}/qrels/train.tsv: 2 of 4 pairs hold an empty query or document (q2/d2 on '
      'line 3, q3/d3 on line 5); each empty text is encoded as EOS only']


def test_missing_documents_are_skipped_in_training_and_kept_in_evaluation(tmp_path, caplog):
  """One warning each, with the count and the first ids; training drops those pairs."""
  folder = _beir(tmp_path, ['q1\td1\t1', 'q1\tgone\t1', 'q2\td2\t1', 'q2\tgone\t2',
                            'q2\tlost\t1', 'q2\tzero\t0'])
  with caplog.at_level(logging.WARNING):
    ex = sources.beir_pairs(folder)
  assert ex.positives == ['T one', 'two']
  qrels = evaluation.load_qrels(folder, 'train')
  assert qrels['q2'] == {'d2': 1, 'gone': 2, 'lost': 1, 'zero': 0}  # scored as they are
  evaluation.warn_missing_documents(qrels, sources.read_beir_corpus(folder)[0], 'qrels')
  path = f'{folder}/qrels/train.tsv'
  assert _messages(caplog) == [
      f"{path}: 3 judgement(s) cite 2 document(s) not in the corpus ('gone' on line 3, "
      "'lost' on line 6); those pairs are skipped",
      "qrels: 3 judgement(s) cite 2 document(s) not in the corpus ('gone', 'lost'); they are "
      "kept and count as documents never retrieved, as in BEIR"]


def _latin1(path, lines):
  """Writes `lines` with 'CAFE' spelt 'café' in Latin-1, which is not valid UTF-8."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(''.join(l + '\n' for l in lines).replace('CAFE', 'café').encode('latin-1'))


@pytest.mark.parametrize('name,read', [
    ('corpus.jsonl', lambda p: sources.read_beir_corpus(str(p.parent))),
    ('queries.jsonl', lambda p: sources.read_beir_queries(str(p.parent))),
    ('qrels/train.tsv', lambda p: sources.read_qrels(str(p))),
    ('pairs.jsonl', lambda p: sources.jsonl_pairs(str(p))),
    ('run.trec', lambda p: retrieval.read_trec_run(str(p))),
    ('docs.jsonl', lambda p: corpus.read_jsonl_corpus(str(p))),
])
def test_non_utf8_input_names_file_and_line(tmp_path, name, read):
  lines = {
      'corpus.jsonl': ['{"_id": "d1", "text": "ok"}', '{"_id": "d2", "text": "CAFE"}'],
      'queries.jsonl': ['{"_id": "q1", "text": "ok"}', '{"_id": "q2", "text": "CAFE"}'],
      'qrels/train.tsv': ['query-id\tcorpus-id\tscore', 'q1\td1\t1', 'q2\tCAFE\t1'],
      'pairs.jsonl': ['{"query": "a", "positive": "b"}', '{"query": "CAFE", "positive": "b"}'],
      'run.trec': ['q1 Q0 d1 1 0.5 t', 'q1 Q0 CAFE 2 0.4 t'],
      'docs.jsonl': ['{"_id": "d1", "text": "ok"}', '{"_id": "d2", "text": "CAFE"}'],
  }[name]
  path = tmp_path / name
  _latin1(path, lines)
  with pytest.raises(sources.DataError, match=rf'{name}:{len(lines)}: not valid UTF-8 '
                                              r'\(byte 0xe9 at column \d+\)'):
    read(path)


def test_missing_qrels_split(tmp_path):
  folder = _beir(tmp_path, ['q1\td1\t1'])
  with pytest.raises(sources.DataError, match=r'qrels/test.tsv: qrels file not found'):
    sources.beir_pairs(folder, 'test')


def test_jsonl_pairs_and_errors(tmp_path):
  path = _write(tmp_path / 'p.jsonl', [
      json.dumps({'query': 'a', 'positive': 'x', 'negatives': ['y', 'z']}),
      json.dumps({'query': 'a', 'positive': 'y', 'negatives': ['x']})])
  ex = sources.jsonl_pairs(path)
  assert ex.query_ids == [0, 0] and ex.doc_ids == [0, 1]
  assert ex.negative_ids == [[1, 2], [0]]
  bad = _write(tmp_path / 'bad.jsonl', [json.dumps({'query': 'a', 'positive': 'x'}),
                                        json.dumps({'query': 'b'})])
  with pytest.raises(sources.DataError, match=r"bad.jsonl:2: missing or non-string field "
                                              r"'positive'"):
    sources.jsonl_pairs(bad)
  with pytest.raises(sources.UnknownSourceError, match='unknown data source'):
    sources.load_examples('nowhere:at/all')


def test_jsonl_pairs_keep_empty_texts(tmp_path, caplog):
  """Mined hard negatives of a collection with empty documents train as BEIR pairs do."""
  path = _write(tmp_path / 'p.jsonl', [
      json.dumps({'query': 'a', 'positive': 'x', 'negatives': ['', 'z']}),
      json.dumps({'query': 'b', 'positive': 'y'})])
  with caplog.at_level(logging.WARNING):
    ex = sources.jsonl_pairs(path)
  assert ex.negatives == [['', 'z'], []]
  assert _messages(caplog) == [f'{path}: 1 of 2 pairs hold an empty query or document '
                               '(line 1); each empty text is encoded as EOS only']


def test_eos_appended_after_trim(spm):
  tok = vocab.Tokenizer(spm)
  raw = tok._sp.encode(['what lives here', 'a'])
  ids = tok.encode(['what lives here', 'a'], 3)
  assert list(ids[0]) == raw[0][:2] + [1]
  assert list(ids[1]) == raw[1] + [1] + [0] * (2 - len(raw[1]))


def test_hard_negatives_in_batches(tmp_path, spm):
  lines = [json.dumps({'query': f'q{i}', 'positive': f'p{i}',
                       'negatives': [f'n{i}a', f'n{i}b']}) for i in range(10)]
  ex = sources.jsonl_pairs(_write(tmp_path / 'n.jsonl', lines))
  b = pipeline.PairBatcher(ex, vocab.Tokenizer(spm), 4, {'inputs': 8, 'targets': 8},
                           num_negatives=3)
  batch = b.batch(2)
  assert batch['negative_targets'].shape == (4, 3, 8)
  assert batch['negative_ids'].shape == (4, 3)
  for row, i in enumerate(b.example_indices(2)):
    assert set(batch['negative_ids'][row]) <= set(ex.negative_ids[i])
  no_negs = sources.jsonl_pairs(_write(tmp_path / 'm.jsonl', [
      json.dumps({'query': 'a', 'positive': 'b'}), json.dumps({'query': 'c', 'positive': 'd'})]))
  with pytest.raises(ValueError, match='have no negatives'):
    pipeline.PairBatcher(no_negs, vocab.Tokenizer(spm), 2, num_negatives=1)


def test_each_epoch_visits_every_example_once(spm, tmp_path):
  lines = [json.dumps({'query': f'q {i}', 'positive': f'p {i}'}) for i in range(12)]
  ex = sources.jsonl_pairs(_write(tmp_path / 'e.jsonl', lines))
  b = pipeline.PairBatcher(ex, vocab.Tokenizer(spm), 4, seed=3)
  epoch = np.concatenate([b.example_indices(s) for s in range(3)])
  assert sorted(epoch) == list(range(12))
  assert list(epoch) != list(np.concatenate([b.example_indices(s) for s in range(3, 6)]))


def test_batches_are_a_pure_function_of_the_step(demo_data):
  data, spm = demo_data
  batchers = [pipeline.PairBatcher(sources.load_examples(f'beir:{data}:train'),
                                   vocab.Tokenizer(spm), 32, {'inputs': 12, 'targets': 16})
              for _ in range(2)]
  b1, b2 = batchers
  for step in (5, 0, 40):
    x, y = b1.batch(step), b2.batch(step)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # Two hosts' slices make up the global batch.
  full = b1.batch(3)
  halves = [b1.batch(3, i, 2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h['inputs'] for h in halves]), full['inputs'])


@pytest.mark.slow
def test_seqio_task_matches_numpy_path(tmp_path, spm):
  seqio_tasks = pytest.importorskip('t5dual.data.seqio_tasks',
                                    reason='seqio extra (TensorFlow, seqio) not installed')
  lines = [json.dumps({'query': f'what is number {i} about', 'positive': f'it is {i} ' * (i + 1)})
           for i in range(8)]
  path = _write(tmp_path / 's.jsonl', lines)
  seqio_tasks.register_pair_task('t5dual_test_pairs', f'jsonl:{path}', spm)
  lengths = {'inputs': 6, 'targets': 10}
  got = seqio_tasks.SeqioBatcher('t5dual_test_pairs', 8, lengths, shuffle=False).batch(0)
  ex = sources.jsonl_pairs(path)
  tok = vocab.Tokenizer(spm)
  np.testing.assert_array_equal(got['inputs'], tok.encode(ex.queries, 6))
  np.testing.assert_array_equal(got['targets'], tok.encode(ex.positives, 10))
  assert len(set(got['doc_ids'].tolist())) == 8


@pytest.mark.slow
def test_seqio_resume_past_the_skip_limit_is_one_line(tmp_path, spm):
  """A seqio run resumes by re-reading the examples before its step: the same batches up to
  max_skipped_examples, then a one-line ConfigError pointing at the store."""
  seqio_tasks = pytest.importorskip('t5dual.data.seqio_tasks',
                                    reason='seqio extra (TensorFlow, seqio) not installed')
  from t5dual import cli
  lines = [json.dumps({'query': f'question {i}', 'positive': f'answer {i} ' * (i % 5 + 1)})
           for i in range(24)]
  path = _write(tmp_path / 'r.jsonl', lines)
  seqio_tasks.register_pair_task('t5dual_test_resume', f'jsonl:{path}', spm)
  lengths = {'inputs': 6, 'targets': 10}
  make = lambda: seqio_tasks.SeqioBatcher('t5dual_test_resume', 4, lengths, seed=5,
                                          max_skipped_examples=12)
  batcher = make()
  uninterrupted = [batcher.batch(s) for s in range(5)]
  resumed = make().batch(3)  # skips 12 examples: at the limit
  for key in uninterrupted[3]:
    np.testing.assert_array_equal(resumed[key], uninterrupted[3][key])
  with pytest.raises(cli.ConfigError, match=r'step 4 would re-read and skip 16 examples.*'
                     r'scripts/prepare_data\.py') as e:
    make().batch(4)
  assert '\n' not in str(e.value)
  assert make().batch(0)['inputs'].shape == (4, 6)


def test_large_jsonl_pairs_are_pointed_at_the_store(tmp_path, caplog, monkeypatch):
  path = _write(tmp_path / 'p.jsonl', [json.dumps({'query': 'q', 'positive': 'p'})])
  with caplog.at_level(logging.WARNING, logger='t5dual.data.sources'):
    sources.jsonl_pairs(path)
    assert not caplog.records
    monkeypatch.setattr(sources, 'LARGE_SOURCE_GIB', 0.0)
    sources.jsonl_pairs(path)
  message, = [r.getMessage() for r in caplog.records]
  assert message.startswith(f'{path}: reading this into memory takes ~0 GiB on every host')
  assert f'scripts/prepare_data.py --source=jsonl:{path} --vocabulary=' in message
