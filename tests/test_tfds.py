"""The tfds: source for real: a TFDS dataset built from local files (tests/helpers/tfds_pairs.py,
nothing downloaded) trains pairs, resumes reading one batch, and exports a corpus
(t5dual/data/tfds_source.py, data/pipeline.py, corpus.py, scripts/export.py)."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip('tensorflow_datasets')
pytest.importorskip('array_record')

from t5dual import (cli, corpus, encoding, export, dual_encoders, t5, train_lib, trainer,  # noqa: E402
                    vocab)
from t5dual.data import pipeline, sources, tasks, tfds_source  # noqa: E402
import tfds_pairs  # noqa: E402  tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = {'inputs': 12, 'targets': 16}
SOURCE = f'tfds:{tfds_pairs.NAME}'


@pytest.fixture(scope='module')
def dataset(tmp_path_factory, demo_collection):
  """The demo collection's training pairs as a TFDS dataset, prepared twice: as
  array_record (read by row) and as tfrecord (read in order only)."""
  root = tmp_path_factory.mktemp('tfds')
  examples = sources.beir_pairs(demo_collection, 'train')
  pairs = [(f'p{i}', q, d) for i, (q, d) in enumerate(zip(examples.queries, examples.positives))]
  for file_format in ('array_record', 'tfrecord'):
    tfds_pairs.build(pairs, str(root / file_format), str(root / 'manual'), file_format)
  return dict(root=root, pairs=pairs, tok=vocab.Tokenizer(
      os.path.join(demo_collection, 'spm.model')))


class CountingRecords:
  """A data source that records which rows are read."""

  def __init__(self, records):
    self.records, self.read = records, []

  def __len__(self):
    return len(self.records)

  def __getitem__(self, row):
    self.read.append(int(row))
    return self.records[row]


@pytest.fixture
def counted(dataset, monkeypatch):
  """Points TFDS at the array_record data dir; the list of every CountingRecords opened."""
  monkeypatch.setenv('TFDS_DATA_DIR', str(dataset['root'] / 'array_record'))
  opened, open_split = [], tfds_source.open_split

  def counting_open_split(name, split):
    opened.append(CountingRecords(open_split(name, split)))
    return opened[-1]
  monkeypatch.setattr(tfds_source, 'open_split', counting_open_split)
  return opened


def test_batches_resume_reading_only_their_rows(dataset, counted):
  tok, batch_size = dataset['tok'], 8
  make = lambda: pipeline.make_batcher(SOURCE, tok, batch_size, LENGTHS, seed=3)
  batcher = make()
  n = len(batcher.examples)
  assert n == len(dataset['pairs'])
  steps = n // batch_size + 4  # past the end of the first epoch
  uninterrupted = [batcher.batch(s) for s in range(steps)]

  # The rows are the dataset's: the same batches as PairBatcher over the pairs in row order.
  records = counted[0].records
  in_memory = sources.PairExamples(
      [records[i]['query'].decode().strip() for i in range(n)],
      [records[i]['positive'].decode().strip() for i in range(n)],
      [[]] * n, list(range(n)), list(range(n)), [[]] * n)
  reference = pipeline.PairBatcher(in_memory, tok, batch_size, LENGTHS, seed=3)
  for s in (0, steps - 1):
    for key in ('inputs', 'targets'):
      np.testing.assert_array_equal(uninterrupted[s][key], reference.batch(s)[key])

  resume_at = steps - 3
  resumed = make()
  got = [resumed.batch(s) for s in range(resume_at, steps)]
  for want, batch in zip(uninterrupted[resume_at:], got):
    assert sorted(want) == sorted(batch)
    for key in want:
      np.testing.assert_array_equal(want[key], batch[key])
  assert len(counted[-1].read) == 3 * batch_size  # not resume_at + 3 batches

  far = make()
  batch = far.batch(10**6, shard_index=1, num_shards=2)  # a late step, one data shard of two
  assert counted[-1].read == list(far.example_indices(10**6, 1, 2))
  assert batch['inputs'].shape == (batch_size // 2, LENGTHS['inputs'])


def test_tfrecord_dataset_is_refused_for_training_in_one_line(dataset, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(dataset['root'] / 'tfrecord'))
  with pytest.raises(cli.UserError, match=r'prepared as tfrecord.*array_record') as e:
    pipeline.make_batcher(SOURCE, dataset['tok'], 8, LENGTHS)
  assert '\n' not in str(e.value)
  monkeypatch.setenv('TFDS_DATA_DIR', str(dataset['root'] / 'array_record'))
  with pytest.raises(cli.ConfigError, match='no hard negatives'):
    pipeline.make_batcher(SOURCE, dataset['tok'], 8, LENGTHS, num_negatives=1)
  with pytest.raises(tfds_source.TfdsError, match="no split 'test'"):
    pipeline.make_batcher(f'{SOURCE}:1.0.0:test', dataset['tok'], 8, LENGTHS)
  with pytest.raises(tfds_source.TfdsError, match='tfds:no_such_pairs ') as e:
    pipeline.make_batcher('tfds:no_such_pairs', dataset['tok'], 8, LENGTHS)
  assert '\n' not in str(e.value)


def _export_script():
  spec = importlib.util.spec_from_file_location('script_export', REPO / 'scripts' / 'export.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_train_resume_and_export(dataset, counted, demo_collection, tmp_path, monkeypatch):
  """train_lib trains on the tfds: source, resumes reading only the new steps' rows, and
  scripts/export.py exports the dataset (read by row, or whole from tfrecord) to the same
  files as an export of the same texts from memory."""
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=t5.t5_config('tiny', vocab_size=512, dtype='float32'), projection_dim=16))
  run_dir, batch_size = str(tmp_path / 'run'), 8
  spm = os.path.join(demo_collection, 'spm.model')
  config = trainer.TrainerConfig(log_every=1, save_every=2, progress_bar=False,
                                 tensorboard=False)
  for steps in (2, 4):
    result = train_lib.run(run_dir, model, SOURCE, spm, task=tasks.PairTask(),
                           batch_size=batch_size, task_feature_lengths=LENGTHS,
                           train_steps=steps, trainer_config=config)
    assert result['step'] == steps and np.isfinite(result['loss'])
  first, second = counted
  assert len(first.read) == 2 * batch_size and len(second.read) == 2 * batch_size
  expected = pipeline.PairBatcher(tfds_source.RandomAccessPairs(first.records, SOURCE),
                                 dataset['tok'], batch_size, LENGTHS)
  assert second.read == [int(i) for s in (2, 3) for i in expected.example_indices(s)]

  flags = [f'--model_dir={run_dir}', '--side=document', f'--tfds={tfds_pairs.NAME}',
           '--split=train', '--id_field=id', '--text_fields=positive', '--shard_size=50',
           '--batch_size=16', '--dtype=float32', '--no_progress']
  _export_script().main(flags + [f'--out_dir={tmp_path / "by_row"}'])
  records = counted[-1]
  assert len(records.read) == 2 * len(records)  # one pass for the ids, then shard by shard
  ids = [records.records[i]['id'].decode() for i in range(len(records))]
  texts = [records.records[i]['positive'].decode() for i in range(len(records))]

  from t5dual import checkpoints
  restored = checkpoints.restore_for_inference(run_dir)
  options = export.ExportOptions(max_length=LENGTHS['targets'], side='document',
                                 batch_size=16, shard_size=50, dtype='float32', progress=False)
  export.export_embeddings(
      encoding.make_encode_fn(restored.model, restored.params, 'document'), restored.tokenizer,
      ids, texts, str(tmp_path / 'in_memory'), options,
      model_info=checkpoints.read_model_json(run_dir), step=restored.step)

  monkeypatch.setenv('TFDS_DATA_DIR', str(dataset['root'] / 'tfrecord'))
  _export_script().main(flags + [f'--out_dir={tmp_path / "whole"}'])
  by_row = export.open_embeddings(str(tmp_path / 'by_row'), verify_checksums=True)
  for other in ('in_memory', 'whole'):
    emb = export.open_embeddings(str(tmp_path / other))
    assert emb.manifest['texts_sha256'] == by_row.manifest['texts_sha256']
    assert emb.manifest['ids_sha256'] == by_row.manifest['ids_sha256']
  # tfrecord keeps the generation order, array_record its own: the same vectors per id.
  want = dict(zip(by_row.ids, by_row.to_numpy()))
  whole = export.open_embeddings(str(tmp_path / 'whole'))
  for doc_id, vector in zip(whole.ids, whole.to_numpy()):
    np.testing.assert_array_equal(vector, want[doc_id])
  assert corpus.sha256_strings(texts) == by_row.manifest['texts_sha256']
