"""Sharded, bucketed, resumable embedding export (t5dual/export.py, encoding.py, corpus.py), in
process; the exports killed or drawn in a subprocess are in test_export_processes.py."""

import hashlib
import json
import pathlib

import numpy as np
import pytest

import jax

from t5dual import corpus, export, t5
from t5dual.data import sources
from t5dual.sides import Side

from tiny_export import OPTIONS, collection_and_model, files, numpy_encoder  # tests/helpers
import tolerances  # tests/helpers


@pytest.fixture(scope='module')
def setup(tmp_path_factory, demo_beir):
  return collection_and_model(demo_beir, tmp_path_factory.mktemp('export'))


class CountingEncoder:
  """Wraps an encode function; records batch shapes and can fail on the n-th call."""

  def __init__(self, encode, fail_at=None):
    self.encode, self.fail_at, self.shapes = encode, fail_at, []

  def __call__(self, ids):
    if self.fail_at is not None and len(self.shapes) == self.fail_at:
      raise KeyboardInterrupt('injected interruption')
    self.shapes.append(ids.shape)
    return self.encode(ids)


@pytest.mark.slow
def test_export_matches_direct_encoding_in_input_order(setup, tmp_path):
  encoder = CountingEncoder(setup['encode'])
  opts = export.ExportOptions(dtype='float32', **OPTIONS)
  manifest = export.export_embeddings(encoder, setup['tok'], setup['ids'], setup['texts'],
                                      str(tmp_path), opts, model_info={'name': 'tiny'}, step=7)
  emb = export.open_embeddings(str(tmp_path), verify_checksums=True)
  assert emb.ids == setup['ids']
  tokens = setup['tok'].encode(setup['texts'], 32)
  direct = np.asarray(jax.jit(setup['model'].encode, static_argnames='side')(
      setup['params'], tokens, side='right'))
  # Two float32 programs (bucketed and unbucketed padding) on unit vectors: 2 layers (4 residual
  # blocks) + head, widest reduction the 128-wide MLP.
  tolerances.assert_close(emb.to_numpy(), direct, magnitude=1.0, depth=5, width=128,
                          both_sides=True)

  # Bucketing: each shard's texts are sorted by token length and every batch of 8
  # is padded to the smallest bucket that holds its longest text.
  lengths = (tokens != 0).sum(1)
  expected = []
  for start in range(0, 120, 40):
    ordered = np.sort(lengths[start:start + 40])
    expected += [(8, min(b for b in (8, 16, 32) if b >= ordered[i:i + 8].max()))
                 for i in range(0, 40, 8)]
  assert encoder.shapes == expected
  assert {w for _, w in expected} == {8, 16, 32}

  # Manifest: model, step, tower, dimension, dtype, count and checksum per shard.
  assert manifest == json.loads((tmp_path / 'manifest.json').read_text())
  assert (manifest['model'], manifest['step'], manifest['tower']) == ({'name': 'tiny'}, 7, 'right')
  assert (manifest['dimension'], manifest['dtype'], manifest['count']) == (16, 'float32', 120)
  assert [s['count'] for s in manifest['shards']] == [40, 40, 40]
  for shard in manifest['shards']:
    for key in ('embeddings', 'ids'):
      data = (tmp_path / shard[key]).read_bytes()
      assert hashlib.sha256(data).hexdigest() == shard[key + '_sha256']
  assert np.load(tmp_path / manifest['shards'][1]['embeddings'], mmap_mode='r').shape == (40, 16)
  assert not list(tmp_path.glob('*.tmp'))


def test_float16_and_parquet(setup, tmp_path):
  import pyarrow.parquet as pq  # a core requirement (setup.py): never skipped
  encode = numpy_encoder(setup['tok'].vocab_size)
  full = export.export_embeddings(encode, setup['tok'], setup['ids'], setup['texts'],
                                  str(tmp_path / 'f32'), export.ExportOptions(
                                      dtype='float32', **OPTIONS))
  half = export.export_embeddings(encode, setup['tok'], setup['ids'], setup['texts'],
                                  str(tmp_path / 'f16'), export.ExportOptions(
                                      dtype='float16', parquet=True, **OPTIONS))
  assert half['dtype'] == 'float16' and full['dtype'] == 'float32'
  f32 = export.open_embeddings(str(tmp_path / 'f32')).to_numpy()
  f16 = export.open_embeddings(str(tmp_path / 'f16'))
  assert f16.shards[0].dtype == np.float16
  np.testing.assert_array_equal(f16.to_numpy(np.float16), f32.astype(np.float16))
  table = pq.read_table(tmp_path / 'f16' / half['shards'][2]['parquet'])
  assert table.column('id').to_pylist() == setup['ids'][80:]
  np.testing.assert_array_equal(np.array(table.column('vector').to_pylist(), np.float16),
                                f16.shards[2])


def test_interrupted_export_resumes_to_identical_files(setup, tmp_path):
  opts = export.ExportOptions(**OPTIONS)
  args = (setup['tok'], setup['ids'], setup['texts'])
  export.export_embeddings(setup['encode'], *args, str(tmp_path / 'whole'), opts)

  # Interrupted in the middle of shard 1 (each shard needs 5 batches).
  broken = CountingEncoder(setup['encode'], fail_at=7)
  with pytest.raises(KeyboardInterrupt):
    export.export_embeddings(broken, *args, str(tmp_path / 'resumed'), opts)
  done = sorted(p.name for p in (tmp_path / 'resumed').glob('shard-*.json'))
  assert done == ['shard-00000-of-00003.json']
  with pytest.raises(export.ExportError, match='incomplete'):
    export.open_embeddings(str(tmp_path / 'resumed'))

  again = CountingEncoder(setup['encode'])
  export.export_embeddings(again, *args, str(tmp_path / 'resumed'), opts)
  assert len(again.shapes) == 10  # shards 1 and 2 only
  assert files(tmp_path / 'resumed') == files(tmp_path / 'whole')

  # A complete export is not re-encoded; a corrupted shard is detected and redone.
  shard = tmp_path / 'resumed' / 'embeddings-00002-of-00003.npy'
  data = bytearray(shard.read_bytes())
  data[-1] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(export.ExportError, match='sha256'):
    export.open_embeddings(str(tmp_path / 'resumed'), verify_checksums=True)
  third = CountingEncoder(setup['encode'])
  export.export_embeddings(third, *args, str(tmp_path / 'resumed'), opts)
  assert len(third.shapes) == 5
  assert files(tmp_path / 'resumed') == files(tmp_path / 'whole')


def test_processes_write_their_own_shards(setup, tmp_path):
  encode = numpy_encoder(setup['tok'].vocab_size)
  opts = export.ExportOptions(**dict(OPTIONS, shard_size=25))
  args = (encode, setup['tok'], setup['ids'], setup['texts'])
  export.export_embeddings(*args, str(tmp_path / 'one'), opts)
  multi = str(tmp_path / 'multi')
  assert export.export_embeddings(*args, multi, opts, process_index=1, process_count=2) is None
  assert sorted(p.name for p in pathlib.Path(multi).glob('shard-*')) == [
      'shard-00001-of-00005.json', 'shard-00003-of-00005.json']
  manifest = export.export_embeddings(*args, multi, opts, process_index=0, process_count=2)
  assert [s['process_index'] for s in manifest['shards']] == [0, 1, 0, 1, 0]
  one, two = files(tmp_path / 'one'), files(multi)
  assert one.keys() == two.keys()
  assert all(one[k] == two[k] for k in one if k.startswith(('embeddings-', 'ids-')))
  assert export.open_embeddings(multi).ids == setup['ids']


def test_bad_inputs_give_clear_errors(setup, tmp_path):
  tok, encode = setup['tok'], numpy_encoder(setup['tok'].vocab_size)
  opts = export.ExportOptions(**OPTIONS)
  run = lambda ids, texts, out='x', o=opts: export.export_embeddings(
      encode, tok, ids, texts, str(tmp_path / out), o)
  with pytest.raises(sources.DataError, match=r"duplicate id 'b' at positions 1 and 3"):
    run(['a', 'b', 'c', 'b'], ['w', 'x', 'y', 'z'])
  with pytest.raises(sources.DataError, match='without whitespace'):
    run(['a b'], ['text'])
  with pytest.raises(sources.DataError, match='2 ids but 1 texts'):
    run(['a', 'b'], ['text'])
  with pytest.raises(export.ExportError, match='dtype must be one of'):
    run(['a'], ['text'], o=export.ExportOptions(**dict(OPTIONS, dtype='int8')))
  with pytest.raises(export.ExportError, match="unknown side 'middle'"):
    run(['a'], ['text'], o=export.ExportOptions(**dict(OPTIONS, side='middle')))
  # Any name of a side works; the plan records its tower.
  assert export.ExportOptions(**dict(OPTIONS, side='right')).side is Side.DOCUMENT
  assert run(['a'], ['text'], 'left', export.ExportOptions(**dict(OPTIONS, side='inputs')))[
      'tower'] == 'left'

  # A directory holding another export is never mixed with a new one.
  run(['a', 'b'], ['one', 'two'], 'taken')
  with pytest.raises(export.ExportError, match='different export.*texts_sha256'):
    run(['a', 'b'], ['one', 'three'], 'taken')
  with pytest.raises(export.ExportError, match='not an embeddings export'):
    export.open_embeddings(str(tmp_path))


def test_empty_texts_are_encoded_with_one_warning(setup, tmp_path, caplog):
  """Empty texts get the vector of a lone EOS; one warning counts them."""
  tok, encode = setup['tok'], numpy_encoder(setup['tok'].vocab_size)
  ids, texts = ['a', 'b', 'c', 'd'], ['some words', '', 'more words', '  ']
  with caplog.at_level('WARNING'):
    manifest = export.export_embeddings(encode, tok, ids, texts, str(tmp_path),
                                        export.ExportOptions(**dict(OPTIONS, dtype='float32')),
                                        name='docs.jsonl')
  assert manifest['count'] == 4
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert warnings == ["docs.jsonl: 2 of 4 texts are empty ('b', 'd'); each empty text is "
                      "encoded as EOS only"]
  vectors = export.open_embeddings(str(tmp_path)).to_numpy()
  eos_only = encode(np.array([[t5.EOS_ID, 0]], np.int32))[0].astype(np.float32)
  np.testing.assert_array_equal(vectors[[1, 3]], [eos_only, eos_only])
  np.testing.assert_array_equal(vectors[0],
                                encode(tok.encode(['some words'], 32))[0].astype(np.float32))


def test_jsonl_and_tf_dataset_readers(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text('{"id": "a", "title": "T", "body": "one"}\n\n'
                  '{"id": 7, "body": "two"}\n{"id": "c", "title": "", "body": "three"}\n')
  assert corpus.read_jsonl_corpus(str(path), 'id', ['title', 'body']) == (
      ['a', '7', 'c'], ['T one', 'two', 'three'])
  path.write_text('{"id": "a", "body": "one"}\n{"id": "a", "body": "two"}\n')
  with pytest.raises(sources.DataError, match=r"docs.jsonl:2: duplicate id 'a' \(first on line 1"):
    corpus.read_jsonl_corpus(str(path), 'id', ['body'])
  path.write_text('{"id": "a", "body": "one"}\n{"id": "b", "body": "two"\n')
  with pytest.raises(sources.DataError, match='docs.jsonl:2: not valid JSON'):
    corpus.read_jsonl_corpus(str(path), 'id', ['body'])
  path.write_text('{"body": "one"}\n')
  with pytest.raises(sources.DataError, match="docs.jsonl:1: missing or non-string id field 'id'"):
    corpus.read_jsonl_corpus(str(path), 'id', ['body'])
  path.write_text('{"id": "a", "text": "one"}\n')
  with pytest.raises(sources.DataError, match=r"docs.jsonl:1: none of the text fields \['body'\]"):
    corpus.read_jsonl_corpus(str(path), 'id', ['body'])
  path.write_bytes(b'{"id": "a", "body": "one"}\n{"id": "b", "body": "caf\xe9"}\n')
  with pytest.raises(sources.DataError, match=r'docs.jsonl:2: not valid UTF-8 \(byte 0xe9 at '
                                              r'column 25\)'):
    corpus.read_jsonl_corpus(str(path), 'id', ['body'])
  with pytest.raises(FileNotFoundError, match='nope.jsonl: file not found'):
    corpus.read_jsonl_corpus(str(tmp_path / 'nope.jsonl'))

  class Dataset:  # what read_tf_dataset uses of a tf.data.Dataset
    def __init__(self, rows):
      self.rows = rows

    def as_numpy_iterator(self):
      return iter(self.rows)

  rows = [{'docid': b'x1', 'title': b'Head', 'text': b'body one'},
          {'docid': b'x2', 'title': b'', 'text': b'body two'}]
  assert corpus.read_tf_dataset(Dataset(rows), 'docid', ['title', 'text'], 'ds:test') == (
      ['x1', 'x2'], ['Head body one', 'body two'])
  assert corpus.read_tf_dataset(Dataset(rows), None, ['text'], 'ds:test')[0] == ['0', '1']
  with pytest.raises(sources.DataError, match="ds:test example 1: duplicate id 'x1'"):
    corpus.read_tf_dataset(Dataset([rows[0], rows[0]]), 'docid', ['text'], 'ds:test')
  with pytest.raises(sources.DataError, match=r"ds:test example 0: field 'text' is not valid "
                                              r'UTF-8 \(byte 0xff at position 4\)'):
    corpus.read_tf_dataset(Dataset([{'docid': b'x', 'text': b'body\xff'}]), 'docid', ['text'],
                           'ds:test')


def _large_beir_corpus(folder, docs=4000, words=10, word_length=400):
  """A corpus.jsonl of docs * words * word_length (16 MB) characters of text in few,
  long words: many bytes of text, few tokens (BM25 keeps the tokens, never the text)."""
  rng = np.random.default_rng(0)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  pool = [''.join(rng.choice(letters, word_length)) for _ in range(50)]
  folder.mkdir()
  with open(folder / 'corpus.jsonl', 'w') as f:
    for i in range(docs):
      text = ' '.join(pool[j] for j in rng.integers(0, len(pool), words))
      f.write(json.dumps({'_id': f'd{i}', 'title': '', 'text': text}) + '\n')
  return docs * words * (word_length + 1)


def _peak_traced_bytes(fn):
  """(fn(), the peak of Python and NumPy allocations while it ran)."""
  import tracemalloc
  tracemalloc.start()
  try:
    out = fn()
    return out, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_export_and_bm25_hold_one_chunk_of_texts(setup, tmp_path):
  """A corpus read from its file is indexed and exported holding one chunk (shard) of
  texts: the peak of allocations stays a fraction of the text's size, which reading the
  whole corpus exceeds."""
  from t5dual import bm25
  folder = tmp_path / 'beir'
  text_bytes = _large_beir_corpus(folder)
  budget = text_bytes // 4
  everything, peak = _peak_traced_bytes(lambda: sources.read_beir_corpus(str(folder)))
  assert peak > text_bytes  # the measure sees a corpus held whole

  source, peak = _peak_traced_bytes(lambda: corpus.beir_corpus(str(folder)))
  assert peak < budget
  assert source.ids == everything[0] and source.texts_sha256 == corpus.sha256_strings(
      everything[1])
  assert source.texts(1234, 1240) == everything[1][1234:1240]
  del everything

  bm25.BM25Index.build(['a', 'b'], ['warm up', 'the imports'])  # imports are not the corpus
  index, peak = _peak_traced_bytes(
      lambda: bm25.BM25Index.build_from_corpus(source, chunk_size=100))
  assert peak < budget
  assert index.doc_ids == source.ids

  def encode(ids):  # the vectors do not matter here, only what the export holds
    return np.asarray(ids[:, :4], np.float32)
  options = export.ExportOptions(max_length=8, side='document', batch_size=16, shard_size=50,
                                 progress=False)
  manifest, peak = _peak_traced_bytes(lambda: export.export_corpus(
      encode, setup['tok'], source, str(tmp_path / 'out'), options))
  assert peak < budget
  assert manifest['count'] == len(source) and manifest['num_shards'] == 80


def test_jsonl_corpus_reads_any_range_of_rows(tmp_path):
  """Rows are found by byte offset (a BOM, blank lines and non-ASCII text included) and
  read the same as read_jsonl_corpus; a file changed after the first pass is an error."""
  path = tmp_path / 'docs.jsonl'
  rows = [{'id': f'x{i}', 'body': f'é{i} ' * i} for i in range(7)]
  lines = [json.dumps(r, ensure_ascii=False) for r in rows]
  path.write_bytes(('\ufeff' + '\n\n'.join(lines[:3]) + '\n\n' + '\n'.join(lines[3:]) + '\n'
                    ).encode('utf-8'))
  want = corpus.read_jsonl_corpus(str(path), 'id', ['body'])
  source = corpus.JsonlCorpus(str(path), corpus.jsonl_parser('id', ['body']))
  assert source.ids == want[0] and source.texts_sha256 == corpus.sha256_strings(want[1])
  for start, stop in ((0, 7), (0, 1), (2, 5), (6, 7), (3, 3)):
    assert source.texts(start, stop) == want[1][start:stop]
  assert [t for _, chunk in source.chunks(3) for t in chunk] == want[1]
  path.write_text('\n'.join(json.dumps(dict(r, id=f'y{i}')) for i, r in enumerate(rows)))
  with pytest.raises(sources.DataError, match=r"docs.jsonl:1: id 'y0' where 'x0' was .*changed"):
    source.texts(0, 2)
