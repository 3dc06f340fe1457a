"""The prepared store: batches equal to the in-memory batchers', damaged or stale stores
refused, interrupted prepares continued, reranker inputs assembled from stored ids."""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pyarrow
import pytest

from t5dual import cli, rerankers, t5, vocab
from t5dual.data import lists, pipeline, sources, store, store_batchers, store_runs, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {'inputs': 12, 'targets': 20}


def _assert_batches_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope='module')
def tokenizer(demo_collection):
  return vocab.Tokenizer(os.path.join(demo_collection, 'spm.model'))


@pytest.fixture(scope='module')
def run_files(demo_collection, tmp_path_factory):
  """A depth-30 TREC run over the training queries (each query's lines together, worst
  first: ranks come from scores), with ties, and a teacher (JSONL scores) for it."""
  folder = tmp_path_factory.mktemp('runs')
  doc_ids, _ = sources.read_beir_corpus(demo_collection)
  qrels = sources.read_qrels(demo_collection, 'train')
  rng = np.random.default_rng(0)
  lines, teacher = [], []
  for q, judged in qrels.items():
    docs = list(rng.choice(doc_ids, 30, replace=False))
    if q != list(qrels)[0]:  # the first query's positive is missing from the run
      docs[int(rng.integers(30))] = next(iter(judged))
    docs = list(dict.fromkeys(docs))
    scores = np.round(rng.normal(size=len(docs)), 1)  # ties among 30 scores
    for r, (d, s) in enumerate(zip(docs, scores), 1):
      lines.append(f'{q} Q0 {d} {r} {s} run')
    # The teacher scores all but a few documents (those are never sampled with it).
    teacher.append({'query_id': q, 'scores': {d: float(rng.normal()) for d in docs[:-3]}})
  (folder / 'run.trec').write_text('\n'.join(lines[::-1]) + '\n')
  with open(folder / 'teacher.jsonl', 'w') as f:
    f.writelines(json.dumps(t) + '\n' for t in teacher)
  return str(folder / 'run.trec'), str(folder / 'teacher.jsonl')


@pytest.fixture(scope='module')
def pairs_jsonl(demo_collection, tmp_path_factory):
  """JSONL pairs of the demo's training split with 1..6 hard negatives each (shared texts)."""
  path = str(tmp_path_factory.mktemp('jsonl') / 'pairs.jsonl')
  doc_ids, texts = sources.read_beir_corpus(demo_collection)
  ex = sources.beir_pairs(demo_collection, 'train')
  rng = np.random.default_rng(1)
  with open(path, 'w') as f:
    for q, p in zip(ex.queries, ex.positives):
      negs = [texts[i] for i in rng.choice(len(texts), int(rng.integers(1, 7)), replace=False)]
      f.write(json.dumps({'query': q, 'positive': p, 'negatives': negs}) + '\n')
  return path


@pytest.fixture(scope='module')
def beir_store(demo_collection, run_files, tokenizer, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('stores') / 'beir')
  store.prepare(f'beir:{demo_collection}:train', out, tokenizer, max_length=40, shard_size=64,
                lists=store.ListOptions(run_files[0], min_rank=2, max_rank=25))
  return out


@pytest.fixture(scope='module')
def teacher_store(demo_collection, run_files, tokenizer, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('stores') / 'teacher')
  store.prepare(f'beir:{demo_collection}', out, tokenizer, max_length=40, shard_size=50,
                lists=store.ListOptions(run_files[0], max_rank=30, teacher=run_files[1]))
  return out


@pytest.fixture(scope='module')
def jsonl_store(pairs_jsonl, tokenizer, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('stores') / 'jsonl')
  store.prepare(f'jsonl:{pairs_jsonl}', out, tokenizer, max_length=40, shard_size=100)
  return out


@pytest.mark.parametrize('seed', [0, 5])
def test_pair_batches_equal_the_in_memory_batcher(demo_collection, beir_store, tokenizer, seed):
  memory = pipeline.make_batcher(f'beir:{demo_collection}:train', tokenizer, 16, LENGTHS,
                                 seed=seed)
  stored = pipeline.make_batcher(f'store:{beir_store}', tokenizer, 16, LENGTHS, seed=seed)
  assert isinstance(stored, store_batchers.StorePairBatcher)
  for step in (0, 1, 7, 23):  # 23: past the first epoch
    _assert_batches_equal(stored.batch(step), memory.batch(step))
    for n in (2, 4):
      slices = [stored.batch(step, k, n) for k in range(n)]
      for k in range(n):
        _assert_batches_equal(slices[k], memory.batch(step, k, n))
      _assert_batches_equal(_concat(slices), memory.batch(step))


@pytest.mark.parametrize('seed', [0, 3])
def test_hard_negative_batches_equal_the_in_memory_batcher(pairs_jsonl, jsonl_store, tokenizer,
                                                           seed):
  lengths = {'inputs': 10, 'targets': 41}  # 41: the whole stored length (40) and EOS
  memory = pipeline.make_batcher(f'jsonl:{pairs_jsonl}', tokenizer, 8, lengths, 4, seed)
  stored = pipeline.make_batcher(f'store:{jsonl_store}', tokenizer, 8, lengths, 4, seed)
  for step in (0, 2, 11, 40):
    _assert_batches_equal(stored.batch(step), memory.batch(step))
    slices = [stored.batch(step, k, 4) for k in range(4)]
    for k in range(4):
      _assert_batches_equal(slices[k], memory.batch(step, k, 4))
    _assert_batches_equal(_concat(slices), memory.batch(step))


def _reranker(template=None, **lists_config):
  """A reranker's lists task, with the template its model reads (RankT5's by default)."""
  tiny = t5.T5Config(vocab_size=256, emb_dim=8, num_heads=1, head_dim=4, mlp_dim=8,
                     num_layers=1)
  model = rerankers.RerankerModel(
      rerankers.RerankerConfig(t5=tiny, scoring_token_id=5, template=template))
  return functools.partial(tasks.ListTask(**lists_config).make_batcher,
                           template=model.template)


@pytest.mark.parametrize('template', [None, 'Query: {query} Document: {document} Relevant:',
                                      '{document} | {query}'])
def test_list_batches_equal_the_in_memory_batcher(demo_collection, beir_store, run_files,
                                                  tokenizer, template):
  config = dict(first_stage_run=run_files[0], list_size=6, num_positives=1, min_rank=2,
                max_rank=25)
  make_batcher = _reranker(template, **config)
  for seed in (0, 9):
    memory = make_batcher(f'beir:{demo_collection}', tokenizer, 4, {'inputs': 30}, seed)
    stored = make_batcher(f'store:{beir_store}', tokenizer, 4, {'inputs': 30}, seed)
    assert len(stored) == len(memory.lists)
    for step in (0, 3, 30):
      _assert_batches_equal(stored.batch(step), memory.batch(step))
      slices = [stored.batch(step, k, 2) for k in range(2)]
      _assert_batches_equal(_concat(slices), memory.batch(step))


def test_teacher_lists_equal_the_in_memory_batcher(demo_collection, teacher_store, run_files,
                                                   tokenizer):
  run, teacher = run_files
  memory = lists.ListBatcher(
      lists.load_lists(demo_collection, 'train', run, max_rank=30, teacher_path=teacher),
      tokenizer, 4, list_size=8, input_length=41, num_positives=1, seed=2)
  stored = store_batchers.StoreListBatcher(store.Store(teacher_store, tokenizer), tokenizer, 4,
                                           list_size=8, input_length=41, seed=2)
  for step in (0, 1, 17):
    _assert_batches_equal(stored.batch(step), memory.batch(step))


def test_a_far_step_equals_the_in_memory_batch(demo_collection, beir_store, jsonl_store,
                                               pairs_jsonl, tokenizer, run_files):
  """Step 10**6 is computed from (seed, step) alone, as the in-memory batchers compute it:
  no batch before it is read (BENCHMARKS.md has its time from a fresh process)."""
  far = 10**6
  stored = pipeline.make_batcher(f'store:{jsonl_store}', tokenizer, 8, LENGTHS, 4)
  memory = pipeline.make_batcher(f'jsonl:{pairs_jsonl}', tokenizer, 8, LENGTHS, 4)
  _assert_batches_equal(stored.batch(far, 1, 2), memory.batch(far, 1, 2))
  config = dict(first_stage_run=run_files[0], list_size=6, num_positives=1, min_rank=2,
                max_rank=25)
  make_batcher = _reranker(**config)
  _assert_batches_equal(
      make_batcher(f'store:{beir_store}', tokenizer, 4, {'inputs': 30}).batch(far),
      make_batcher(f'beir:{demo_collection}', tokenizer, 4, {'inputs': 30}).batch(far))


def test_store_must_match_the_configuration(beir_store, jsonl_store, tokenizer, run_files):
  with pytest.raises(cli.ConfigError, match=re.escape(
      "TASK_FEATURE_LENGTHS['targets'] is 42, but the store ") + '.* holds at most 40 ids per '
      r'text \(max_length\); prepare it with --max_length 41 or more'):
    pipeline.make_batcher(f'store:{jsonl_store}', tokenizer, 8, {'inputs': 12, 'targets': 42})
  with pytest.raises(cli.ConfigError, match=re.escape(
      "INPUT_LENGTH (TASK_FEATURE_LENGTHS['inputs']) is 64, but the store")):
    _reranker(min_rank=2, max_rank=25)(f'store:{beir_store}', tokenizer, 4, {'inputs': 64})
  with pytest.raises(cli.ConfigError, match='MAX_RANK is 100'):
    _reranker(min_rank=2)(f'store:{beir_store}', tokenizer, 4, {'inputs': 30})
  with pytest.raises(cli.ConfigError, match='have no negatives'):
    pipeline.make_batcher(f'store:{beir_store}', tokenizer, 8, LENGTHS, num_negatives=2)
  with pytest.raises(store.StoreError, match='holds no training lists'):
    _reranker()(f'store:{jsonl_store}', tokenizer, 4, {'inputs': 30})
  with pytest.raises(ValueError, match='whitespace'):
    store.template_pieces('Query:{query} Document: {document}')


def _one_line(excinfo):
  assert '\n' not in str(excinfo.value)
  return str(excinfo.value)


def test_damaged_or_stale_store_is_refused_in_one_line(demo_collection, beir_store, tokenizer,
                                                       tmp_path):
  copy = str(tmp_path / 'copy')
  shutil.copytree(beir_store, copy)
  store.Store(copy, tokenizer, verify=True)
  tokens = os.path.join(copy, 'corpus', 'tokens-00001.bin')
  data = bytearray(open(tokens, 'rb').read())
  data[3] ^= 1  # same size, one bit changed: only the checksum sees it
  open(tokens, 'wb').write(bytes(data))
  store.Store(copy, tokenizer)
  with pytest.raises(store.StoreError) as e:
    store.Store(copy, tokenizer, verify=True)
  assert 'tokens-00001.bin: checksum' in _one_line(e)
  open(tokens, 'ab').write(b'\0\0')
  with pytest.raises(store.StoreError) as e:
    store.Store(copy, tokenizer)
  assert 'tokens-00001.bin' in _one_line(e) and 'bytes' in str(e.value)
  os.remove(tokens)
  with pytest.raises(store.StoreError, match='tokens-00001.bin: missing'):
    store.Store(copy, tokenizer)
  # Another vocabulary.
  other = vocab.Tokenizer(vocab.train_sentencepiece(
      ['alpha beta gamma delta'] * 20, str(tmp_path / 'other'), 30))
  with pytest.raises(store.StoreError) as e:
    store.Store(beir_store, other)
  assert 'vocabulary' in _one_line(e)
  # An input changed since: a prepare-time copy of the folder, edited.
  folder = str(tmp_path / 'beir')
  shutil.copytree(demo_collection, folder)
  stale = str(tmp_path / 'stale')
  store.prepare(f'beir:{folder}', stale, tokenizer, max_length=16)
  with open(os.path.join(folder, 'qrels', 'train.tsv'), 'a') as f:
    f.write('\n')
  with pytest.raises(store.StoreError) as e:
    pipeline.make_batcher(f'store:{stale}', tokenizer, 8, LENGTHS)
  assert 'train.tsv: changed since' in _one_line(e)
  with pytest.raises(store.StoreError, match='prepared from something else'):
    store.prepare(f'beir:{folder}', str(tmp_path / 'copy'), tokenizer, max_length=16)


def _files(path):
  return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), 'rb').read()
          for d, _, fs in os.walk(path) for f in fs}


class _Interrupt(Exception):
  pass


def test_interrupted_prepare_continues_to_the_same_store(demo_collection, run_files, tokenizer,
                                                         beir_store, tmp_path):
  options = store.ListOptions(run_files[0], min_rank=2, max_rank=25)
  prepare = lambda out, **kw: store.prepare(  # noqa: E731
      f'beir:{demo_collection}:train', out, tokenizer, max_length=40, shard_size=64,
      lists=options, **kw)
  messages = []
  prepare(str(tmp_path / 'whole'), progress=messages.append)
  shard_messages = [m for m in messages if 'shard' in m]
  assert any(m.startswith('lists: run shard 3 ') for m in shard_messages)
  # Stopped after the 2nd corpus shard, in the queries, and after the 4th shard of the run.
  for stop_after in (2, 5, len(shard_messages) - 3):
    out = str(tmp_path / f'stopped-{stop_after}')
    shards = []

    def interrupt():
      shards.append(1)
      if len(shards) == stop_after:
        raise _Interrupt
    with pytest.raises(_Interrupt):
      prepare(out, _after_shard=interrupt)
    assert not os.path.exists(os.path.join(out, store.MANIFEST))
    before = _files(out)
    resumed = []
    prepare(out, progress=resumed.append)
    # What was complete was neither done again nor changed.
    assert [m for m in resumed if 'shard' in m] == shard_messages[stop_after:]
    assert before['corpus/shard-00000.json'] == _files(out)['corpus/shard-00000.json']
    expected, got = _files(beir_store), _files(out)
    assert set(got) == set(expected)
    for name in expected:
      if name not in (store.PLAN, store.MANIFEST):  # they name the store's own inputs
        assert got[name] == expected[name], name
    assert (json.loads(got[store.MANIFEST])['files']
            == json.loads(expected[store.MANIFEST])['files'])


@pytest.mark.multiprocess
def test_prepare_killed_with_sigkill_continues(pairs_jsonl, jsonl_store, tokenizer, tmp_path):
  out = str(tmp_path / 'store')
  script = (f'import os, sys; sys.path.insert(0, {REPO!r})\n'
            'from t5dual import vocab\nfrom t5dual.data import store\n'
            f'tok = vocab.Tokenizer({tokenizer.path!r})\n'
            'n = [0]\n'
            'def kill():\n'
            '  n[0] += 1\n'
            '  if n[0] == 2: os.kill(os.getpid(), 9)\n'
            f'store.prepare("jsonl:{pairs_jsonl}", {out!r}, tok, max_length=40, '
            'shard_size=100, _after_shard=kill)\n')
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, timeout=300)
  assert done.returncode == -9, done.stderr.decode()[-2000:]
  store.prepare(f'jsonl:{pairs_jsonl}', out, tokenizer, max_length=40, shard_size=100)
  expected, got = _files(jsonl_store), _files(out)
  assert {k for k in got if k != store.PLAN} == {k for k in expected if k != store.PLAN}
  for name in expected:
    if name not in (store.PLAN, store.MANIFEST):
      assert got[name] == expected[name], name


# Texts that stress the joins: odd whitespace, unicode that NFKC changes, empty texts.
ODD_TEXTS = ['plain words here', '  leading and trailing  ', 'tabs\tand\nnew lines',
             'non\u00a0breaking\u2003em space\u3000ideographic', 'ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ',
             'ligature ﬁne ½ ² ℃', 'combining e\u0301 \u0301start', 'Ünïcödé naïve café',
             '中文文本 日本語 한국어', 'emoji 🙂 ok', '', ' ', '"quotes" (brackets) a-b_c',
             'Query: Document: inside', '\u00a8diaeresis alone', 'x' * 300]


def _assembled(tokenizer, template, query, document, length):
  literals, fields = store.template_pieces(template)
  pieces = tokenizer.encode_ids([t.strip() for t in literals] + [query, document], 10**6)
  texts = {'query': pieces[-2], 'document': pieces[-1]}
  ids = list(pieces[0])
  for field, literal in zip(fields, pieces[1:len(literals)]):
    ids += texts[field] + literal
  ids = ids[:length - 1] + [1]
  return ids + [0] * (length - len(ids))


@pytest.mark.parametrize('which', ['demo', 't5'])
def test_joined_pieces_equal_the_filled_template(which, tokenizer, shared_dir):
  if which == 't5':
    tokenizer = vocab.Tokenizer(str(shared_dir / 'vocab' / 't5_spiece.model'))
  corpus = [json.loads(line)['text'] for line, _ in
            zip(open(shared_dir / 'data' / 'scifact' / 'corpus.jsonl'), range(50))]
  queries = ODD_TEXTS + corpus[:5]
  documents = ODD_TEXTS + corpus
  for template in [rerankers.DEFAULT_TEMPLATE, *rerankers.DEFAULT_TEMPLATES.values(),
                   '{query} {document}', ' {document}\t|| {query} ']:
    for length in (16, 512):
      pairs = [(q, d) for q in queries for d in documents[:12]] + [
          (q, d) for q, d in zip(queries * 4, documents)]
      want = rerankers.encode_pairs(tokenizer, [q for q, _ in pairs], [d for _, d in pairs],
                                    template, length)
      got = np.asarray([_assembled(tokenizer, template, q, d, length) for q, d in pairs])
      np.testing.assert_array_equal(got, want, err_msg=template)


@pytest.mark.multiprocess
def test_synthetic_msmarco_prepares_and_trains_from_the_store(shared_dir, tmp_path):
  """The benchmark's generator at a tiny scale, its two stores, batches equal to memory."""
  data = str(tmp_path / 'msmarco')
  subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'make_synthetic_msmarco.py'),
                  f'--out_dir={data}', '--scale=0.0002', '--depth=60', '--negatives=5',
                  f'--real={shared_dir / "data" / "scifact"}'], check=True, capture_output=True)
  info = json.load(open(os.path.join(data, 'synthetic.json')))
  assert (info['passages'], info['queries']) == (1768, 101)
  assert len(open(os.path.join(data, 'run.trec')).readlines()) == 101 * 60
  tok = vocab.Tokenizer(str(shared_dir / 'vocab' / 't5_spiece.model'))
  run = os.path.join(data, 'run.trec')
  for args in ([f'--source=beir:{data}', f'--run={run}', '--max_rank=60',
                f'--teacher={os.path.join(data, "teacher.trec")}'],
               [f'--source=jsonl:{os.path.join(data, "negatives.jsonl")}']):
    out = str(tmp_path / ('lists' if len(args) > 1 else 'pairs'))
    done = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'prepare_data.py'),
                           *args, f'--vocabulary={tok.path}', f'--out_dir={out}',
                           '--max_length=63', '--shard_size=500', '--verify'],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
  memory = pipeline.make_batcher(f'jsonl:{os.path.join(data, "negatives.jsonl")}', tok, 8,
                                 {'inputs': 16, 'targets': 64}, 5)
  stored = pipeline.make_batcher(f'store:{tmp_path / "pairs"}', tok, 8,
                                 {'inputs': 16, 'targets': 64}, 5)
  for step in (0, 13, 10**6):
    _assert_batches_equal(stored.batch(step), memory.batch(step))
  memory = lists.ListBatcher(lists.load_lists(data, 'train', run, max_rank=60,
                                              teacher_path=os.path.join(data, 'teacher.trec')),
                             tok, 4, list_size=8, input_length=64)
  stored = store_batchers.StoreListBatcher(store.Store(str(tmp_path / 'lists'), tok), tok, 4,
                                           list_size=8, input_length=64)
  for step in (0, 7, 10**6):
    _assert_batches_equal(stored.batch(step), memory.batch(step))


def _id_lookups(demo_collection):
  doc_ids, _ = sources.read_beir_corpus(demo_collection)
  query_rows = {q: i for i, q in enumerate(sources.read_beir_queries(demo_collection))}
  return doc_ids, query_rows, store_runs.IdIndex(pyarrow.array(doc_ids, pyarrow.string()))


def _read_groups(path, query_rows, doc_index, block_bytes):
  groups = list(store_runs.run_groups(path, query_rows, doc_index, len(query_rows),
                                      block_bytes=block_bytes))
  return {name: np.concatenate([getattr(g, name) if name != 'offsets' else np.diff(g.offsets)
                                for g in groups])
          for name in ('query_rows', 'offsets', 'doc_rows', 'scores', 'last_lines')}


@pytest.mark.parametrize('block_bytes', [1 << 25, 300])
@pytest.mark.parametrize('layout', ['as written', 'tabs, blank lines, CRLF'])
def test_fast_run_reader_equals_the_line_by_line_reader(demo_collection, run_files, tmp_path,
                                                        block_bytes, layout):
  doc_ids, query_rows, doc_index = _id_lookups(demo_collection)
  path = run_files[0]
  if layout != 'as written':  # what only the line-by-line parse reads: those blocks go there
    lines = open(path).read().splitlines()
    text = ''.join(line.replace(' ', '\t', 2) + ('\r\n\n' if i % 7 == 0 else '\n')
                   for i, line in enumerate(lines))
    path = str(tmp_path / 'run.trec')
    with open(path, 'w', newline='') as f:
      f.write(text)
  got = _read_groups(path, query_rows, doc_index, block_bytes)
  # lists.read_run: each query's documents by descending score, ties in file order.
  expected = lists.read_run(path, query_rows, set(doc_ids))
  last_line = {}
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if line.split():
        last_line[line.split()[0]] = lineno
  doc_row = {d: i for i, d in enumerate(doc_ids)}
  np.testing.assert_array_equal(got['query_rows'], [query_rows[q] for q in expected])
  np.testing.assert_array_equal(got['offsets'], [len(r) for r in expected.values()])
  np.testing.assert_array_equal(got['doc_rows'],
                                [doc_row[d] for r in expected.values() for d, _ in r])
  np.testing.assert_array_equal(got['scores'], [s for r in expected.values() for _, s in r])
  np.testing.assert_array_equal(got['last_lines'], [last_line[q] for q in expected])


def test_id_index_maps_ids_to_rows(demo_collection):
  doc_ids, _, index = _id_lookups(demo_collection)
  wanted = doc_ids[::-3] + ['absent', '', doc_ids[0] + ' ']
  np.testing.assert_array_equal(index.rows(wanted),
                                [len(doc_ids) - 1 - 3 * i for i in range(len(doc_ids[::-3]))]
                                + [-1, -1, -1])
  assert index[doc_ids[5]] == 5 and doc_ids[7] in index and 'absent' not in index


@pytest.mark.parametrize('fault, message', [
    (lambda q, d: f'{q} Q0 {d} 1 high run', ":{line}: score 'high' is not a number"),
    (lambda q, d: f'{q} Q0 {d} 1 2.5', ':{line}: expected "qid Q0 docid rank score tag"'),
    (lambda q, d: f'{q} Q0 no-such-doc 1 2.5 run',
     ":{line}: document id 'no-such-doc' is not in corpus.jsonl"),
    (lambda q, d: f'{q} Q0 {d} 1 2.5 run', ':{line}: document .* listed twice for query'),
])
def test_bad_run_line_is_named_by_its_line(demo_collection, run_files, tmp_path, tokenizer,
                                           fault, message):
  _, query_rows, doc_index = _id_lookups(demo_collection)
  lines = open(run_files[0]).read().splitlines()
  bad = 157  # in the middle of a block of 300 bytes, after many blocks
  q, _, d = lines[bad - 2].split()[:3]  # the line before it: its query, a listed document
  lines.insert(bad - 1, fault(q, d))
  path = str(tmp_path / 'run.trec')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  pattern = re.escape(path) + message.format(line=bad)
  for block_bytes in (300, 1 << 25):
    with pytest.raises(sources.DataError, match=pattern):
      _read_groups(path, query_rows, doc_index, block_bytes)
  with pytest.raises(sources.DataError, match=pattern):  # the same one line from prepare
    store.prepare(f'beir:{demo_collection}:train', str(tmp_path / 'store'), tokenizer,
                  max_length=40, shard_size=64, lists=store.ListOptions(path))


def test_run_query_lines_apart_are_refused(demo_collection, run_files, tmp_path):
  _, query_rows, doc_index = _id_lookups(demo_collection)
  lines = open(run_files[0]).read().splitlines()
  first_query = lines[0].split()[0]
  moved = lines.pop(0)
  later = next(i for i, line in enumerate(lines) if line.split()[0] != first_query) + 40
  lines.insert(later, moved)
  path = str(tmp_path / 'run.trec')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  for block_bytes in (300, 1 << 25):
    with pytest.raises(sources.DataError,
                       match=re.escape(f'{path}:{later + 1}: query {first_query!r} again after '
                                       'other queries (first on line 1)')):
      _read_groups(path, query_rows, doc_index, block_bytes)


@pytest.mark.parametrize('teacher_format', ['trec', 'jsonl'])
def test_teacher_on_disk_equals_the_line_by_line_reader(demo_collection, run_files, tmp_path,
                                                        monkeypatch, teacher_format):
  """Every (query, document) of the collection looked up in the teacher's files: its
  score where lists.read_teacher has one (float32, as the store keeps it), else absent."""
  doc_ids, query_rows, doc_index = _id_lookups(demo_collection)
  path = run_files[0]
  if teacher_format == 'jsonl':  # in chunks of ~100 scores; a document given twice
    records = [json.loads(line) for line in open(run_files[1])]
    first = records[0]
    doubled = json.dumps(first)[:-2] + f', {json.dumps(next(iter(first["scores"])))}: 7.5}}}}'
    path = str(tmp_path / 'teacher.jsonl')
    with open(path, 'w') as f:
      f.write('\n'.join([doubled] + [json.dumps(r) for r in records[1:]]) + '\n')
    monkeypatch.setattr(store_runs, 'TEACHER_CHUNK', 100)
  folder = str(tmp_path / 'lists')
  os.makedirs(folder)
  files = store_runs.write_teacher(path, folder, query_rows, doc_index)
  assert sorted(os.listdir(folder)) == sorted(files)  # no temporary left
  for name, record in files.items():
    assert record == store._file_record(os.path.join(folder, name))
  expected = lists.read_teacher(path, query_rows, set(doc_ids))
  if teacher_format == 'jsonl':  # JSON's rule for a repeated key: the last value
    assert expected[first['query_id']][next(iter(first['scores']))] == 7.5
  want = np.full((len(query_rows), len(doc_ids)), np.nan, np.float32)
  doc_row = {d: i for i, d in enumerate(doc_ids)}
  for q, docs in expected.items():
    for d, score in docs.items():
      want[query_rows[q], doc_row[d]] = score
  queries, docs = np.divmod(np.arange(want.size)[::-1], len(doc_ids))  # any order
  found, scores = store_runs.TeacherScores(folder).lookup(queries, docs)
  np.testing.assert_array_equal(found, ~np.isnan(want[queries, docs]))
  np.testing.assert_array_equal(scores, np.nan_to_num(want[queries, docs], nan=0.0))
  assert found.sum() == sum(map(len, expected.values()))


def _teacher_options(run_files, teacher):
  return store.ListOptions(run_files[0], max_rank=30, teacher=teacher)


def _prepare_teacher_store(demo_collection, tokenizer, out, options, **kwargs):
  """The teacher_store fixture's prepare, with other list options."""
  return store.prepare(f'beir:{demo_collection}', out, tokenizer, max_length=40,
                       shard_size=50, lists=options, **kwargs)


def test_trec_and_jsonl_teachers_of_the_same_scores_prepare_the_same_store(
    demo_collection, run_files, teacher_store, tokenizer, tmp_path):
  records = [json.loads(line) for line in open(run_files[1])]
  trec = str(tmp_path / 'teacher.trec')
  with open(trec, 'w') as f:  # repr: the float64 the JSON holds, exactly
    for record in records:
      for rank, (d, score) in enumerate(record['scores'].items(), 1):
        f.write(f'{record["query_id"]} Q0 {d} {rank} {score!r} teacher\n')
  out = str(tmp_path / 'store')
  manifest = _prepare_teacher_store(demo_collection, tokenizer, out,
                                    _teacher_options(run_files, trec))
  expected = json.loads(open(os.path.join(teacher_store, store.MANIFEST)).read())
  assert manifest['counts']['lists']['teacher']
  assert manifest['files'] == expected['files']  # every file's bytes and sha256
  assert set(_files(out)) == set(_files(teacher_store))  # the teacher's files removed


def _bad_teacher_records(records, doc_ids):
  """(line 6 of a teacher built from `records`, its error's pattern)."""
  q = records[5]['query_id']
  d = next(iter(records[5]['scores']))
  return [
      ('{"query_id": "no-such-query", "scores": {}}',
       r":6: \"query_id\" 'no-such-query' is not in queries.jsonl"),
      (json.dumps({'query_id': records[0]['query_id'], 'scores': {}}),
       f":6: query '{records[0]['query_id']}' again \\(first on line 1\\)"),
      (json.dumps({'query_id': q}), ':6: give exactly one of'),
      (json.dumps({'query_id': q, 'scores': {d: float('inf')}}), ':6: "scores" must map'),
      (json.dumps({'query_id': q, 'ranking': [d, doc_ids[0], d]}), ':6: "ranking" must be'),
      (json.dumps({'query_id': q, 'scores': {d: 1, 'no-such-doc': 2}}),
       ":6: document id 'no-such-doc' is not in corpus.jsonl"),
      ('{"query_id": ', ':6: not valid JSON'),
  ]


@pytest.mark.parametrize('chunk', [1, 1 << 18])
@pytest.mark.parametrize('case', range(7))
def test_bad_jsonl_teacher_is_named_by_its_line(demo_collection, run_files, tokenizer, tmp_path,
                                                monkeypatch, chunk, case):
  """prepare's error is lists.read_teacher's, word for word, checked a chunk at a time."""
  doc_ids, query_rows, _ = _id_lookups(demo_collection)
  monkeypatch.setattr(store_runs, 'TEACHER_CHUNK', chunk)
  records = [json.loads(line) for line in open(run_files[1])]
  bad, message = _bad_teacher_records(records, doc_ids)[case]
  lines = [json.dumps(r) for r in records]
  path = str(tmp_path / 'teacher.jsonl')
  for unknown_before in (False, True):
    if unknown_before:  # an unknown document on line 2 comes first, whatever line 6 holds
      lines[1] = json.dumps(dict(records[1], scores={'no-such-doc': 1.0}))
      message = ":2: document id 'no-such-doc' is not in corpus.jsonl"
    with open(path, 'w') as f:
      f.write('\n'.join(lines[:5] + [bad] + lines[6:]) + '\n')
    with pytest.raises(sources.DataError) as expected:
      lists.read_teacher(path, query_rows, set(doc_ids))
    with pytest.raises(sources.DataError, match=re.escape(path) + message) as got:
      _prepare_teacher_store(demo_collection, tokenizer, str(tmp_path / f'{unknown_before}'),
                             _teacher_options(run_files, path))
    assert _one_line(got) == str(expected.value)


def test_bad_trec_teacher_is_named_by_its_line(demo_collection, run_files, tokenizer, tmp_path):
  """A query's lines apart (read_teacher accepts them; a store reads the teacher one query
  at a time, as the run) and a document twice for a query (read_teacher's error)."""
  doc_ids, query_rows, _ = _id_lookups(demo_collection)
  lines = open(run_files[0]).read().splitlines()
  first_query = lines[0].split()[0]
  apart = lines[1:41] + lines[:1] + lines[41:]
  twice = lines[:30] + [lines[3]] + lines[30:]
  path = str(tmp_path / 'teacher.trec')
  for teacher, message in [
      (apart, re.escape(f'{path}:41: query {first_query!r} again after other queries (first '
                        'on line 1)')),
      (twice, re.escape(f'{path}:31: document {lines[3].split()[2]!r} listed twice for query '
                        f'{lines[3].split()[0]!r} (first on line 4)'))]:
    with open(path, 'w') as f:
      f.write('\n'.join(teacher) + '\n')
    with pytest.raises(sources.DataError, match=message) as got:
      _prepare_teacher_store(demo_collection, tokenizer, str(tmp_path / f'{len(teacher)}'),
                             _teacher_options(run_files, path))
    _one_line(got)
    if teacher is twice:
      with pytest.raises(sources.DataError, match=message):
        lists.read_teacher(path, query_rows, set(doc_ids))


def test_interrupted_teacher_prepare_continues_to_the_same_store(
    demo_collection, run_files, teacher_store, tokenizer, tmp_path):
  """Stopped after two shards of the run: the teacher's complete files are used again;
  incomplete ones (one cut short, a temporary left) are read from the teacher again."""
  options = _teacher_options(run_files, run_files[1])
  expected = _files(teacher_store)
  for damage in (False, True):
    out = str(tmp_path / f'stopped-{damage}')
    lists_dir = os.path.join(out, 'lists')

    def interrupt():
      if os.path.exists(os.path.join(lists_dir, 'shard-00001.json')):
        raise _Interrupt
    with pytest.raises(_Interrupt):
      _prepare_teacher_store(demo_collection, tokenizer, out, options, _after_shard=interrupt)
    assert os.path.exists(os.path.join(lists_dir, 'teacher.json'))
    if damage:
      docs = os.path.join(lists_dir, 'teacher-docs.bin')
      os.truncate(docs, os.path.getsize(docs) - 4)
      open(os.path.join(lists_dir, 'teacher-scores.bin.tmp'), 'wb').write(b'partial')
    messages = []
    _prepare_teacher_store(demo_collection, tokenizer, out, options, progress=messages.append)
    assert any(m.startswith('lists: teacher ') for m in messages) == damage
    assert not any(m.startswith('lists: run shard 1 ') for m in messages)
    got = _files(out)
    assert set(got) == set(expected)
    for name in expected:
      if name not in (store.PLAN, store.MANIFEST):  # they name the store's own inputs
        assert got[name] == expected[name], name


def _train_from_store(model, model_dir, source, spm, steps, extra):
  files = {'sde': ['gin/models/sde.gin'], 'rankt5': ['gin/models/rankt5_encdec.gin']}[model]
  files += ['gin/sizes/tiny.gin', 'configs/runs/finetune.gin']
  files += ['configs/runs/rerank.gin'] if model == 'rankt5' else []
  return [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
          *[f'--gin_file={f}' for f in files], f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.MIXTURE_OR_TASK_NAME='store:{source}'", f"--gin.VOCABULARY_PATH='{spm}'",
          f'--gin.TRAIN_STEPS={steps}', "--gin.ACTIVATION_DTYPE='float32'",
          '--gin.DROPOUT_RATE=0.0', '--gin.BATCH_SIZE=4',
          '--gin.trainer.TrainerConfig.save_every=5', '--gin.trainer.TrainerConfig.log_every=1',
          *extra]


@pytest.mark.slow
@pytest.mark.parametrize('model', ['sde', 'rankt5'])
def test_training_from_a_store_stopped_and_resumed_ends_as_uninterrupted(
    model, demo_collection, beir_store, jsonl_store, tmp_path):
  """scripts/train.py from `store:` (the SDE with hard negatives, the reranker with lists
  of a run), stopped by SIGTERM and run again, ends with the uninterrupted run's params."""
  from t5dual import checkpoints
  spm = os.path.join(demo_collection, 'spm.model')
  steps = 40
  if model == 'sde':
    source, extra = jsonl_store, ['--gin.NUM_NEGATIVES=3', '--gin.VOCAB_SIZE=256',
                                  "--gin.TASK_FEATURE_LENGTHS={'inputs': 12, 'targets': 20}"]
  else:  # the store's list window: ranks [2, 25] of the run; RankT5 scores <extra_id_10>
    source, extra = beir_store, ['--gin.VOCAB_SIZE=32128', '--gin.MIN_RANK=2',
                                 '--gin.MAX_RANK=25', '--gin.LIST_SIZE=4',
                                 '--gin.INPUT_LENGTH=32']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
  done = subprocess.run(_train_from_store(model, straight, source, spm, steps, extra),
                        cwd=REPO, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  proc = subprocess.Popen(_train_from_store(model, stopped, source, spm, steps, extra),
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  metrics = os.path.join(stopped, 'metrics.jsonl')
  while proc.poll() is None and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.02)  # stopped once it trains: a step boundary well before the last
  proc.send_signal(signal.SIGTERM)
  err = proc.communicate()[1].decode()
  assert proc.returncode == 75, err[-2000:]  # preemption.PREEMPTED_EXIT_STATUS
  stopped_at = checkpoints.checkpoint_manager(stopped).latest_step()
  assert 0 < stopped_at < steps
  resumed = subprocess.run(_train_from_store(model, stopped, source, spm, steps, extra),
                           cwd=REPO, env=env, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'resuming from {stopped} at step {stopped_at}' in resumed.stderr
  _, expected, at = checkpoints.restore_params(straight)
  _, got, resumed_at = checkpoints.restore_params(stopped)
  assert at == resumed_at == steps
  # The same float32 programs on the same batches (a function of the step): the same bits.
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(expected),
                               jax.tree_util.tree_leaves_with_path(got)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(path))


def test_duplicate_document_id_is_named_by_its_lines(demo_collection, tokenizer, tmp_path):
  folder = tmp_path / 'beir'
  shutil.copytree(demo_collection, folder)
  corpus = (folder / 'corpus.jsonl').read_text().splitlines()
  first_id = json.loads(corpus[0])['_id']
  corpus[9] = json.dumps(dict(json.loads(corpus[9]), _id=first_id))
  (folder / 'corpus.jsonl').write_text('\n'.join(corpus) + '\n')
  with pytest.raises(sources.DataError, match=re.escape(
      f"corpus.jsonl:10: duplicate _id {first_id!r} (first on line 1)")):
    store.prepare(f'beir:{folder}:train', str(tmp_path / 'store'), tokenizer, max_length=40,
                  shard_size=64)


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_tfds_source_prepares_the_jsonl_store(pairs_jsonl, jsonl_store, tokenizer, tmp_path,
                                              monkeypatch, file_format):
  """A TFDS dataset of the same examples ('query', 'positive', 'negatives' features) gives
  the store of the JSONL file, read by row (array_record) or through tf.data."""
  pytest.importorskip('tensorflow_datasets')
  import tfds_negatives  # tests/helpers
  data_dir = str(tmp_path / 'tfds')
  tfds_negatives.build(pairs_jsonl, data_dir, file_format)
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  out = str(tmp_path / 'store')
  store.prepare(f'tfds:{tfds_negatives.NAME}:1.0.0:train', out, tokenizer, max_length=40,
                shard_size=100)
  expected, got = _files(jsonl_store), _files(out)
  assert set(got) == set(expected)
  for name in expected:
    if name not in (store.PLAN, store.MANIFEST):  # they name the store's own inputs
      assert got[name] == expected[name], name
  assert json.loads(got[store.PLAN])['tfds']['examples'] == len(open(pairs_jsonl).readlines())
  with pytest.raises(sources.UnknownSourceError, match='has no split \'test\''):
    store.prepare(f'tfds:{tfds_negatives.NAME}:test', str(tmp_path / 'other'), tokenizer)
