"""A TFDS dataset of (query, positive document) pairs built from a local JSONL file, for
the tests: nothing is downloaded. The file is the builder's manual_dir/pairs.jsonl
({"id", "query", "positive"} lines), prepared into a data_dir as array_record (random
access, `tfds.data_source`) or tfrecord.
"""

import json
import os

from etils import epath
import tensorflow_datasets as tfds

NAME = 't5dual_test_pairs'


class T5dualTestPairs(tfds.core.GeneratorBasedBuilder):
  """(id, query, positive) examples of manual_dir/pairs.jsonl, split 'train'."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for metadata files in the builder's package; tests/helpers is no package.
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'pairs.jsonl: {"id", "query", "positive"} lines'

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'id': tfds.features.Text(), 'query': tfds.features.Text(),
        'positive': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(os.path.join(dl_manager.manual_dir,
                                                          'pairs.jsonl'))}

  def _generate_examples(self, path):
    with open(path) as f:
      for row, line in enumerate(f):
        yield row, json.loads(line)


def build(pairs, data_dir: str, manual_dir: str, file_format: str = 'array_record'):
  """Writes `pairs` [(id, query, positive)] and prepares the dataset in `data_dir`."""
  os.makedirs(manual_dir, exist_ok=True)
  with open(os.path.join(manual_dir, 'pairs.jsonl'), 'w') as f:
    for doc_id, query, positive in pairs:
      f.write(json.dumps({'id': doc_id, 'query': query, 'positive': positive}) + '\n')
  builder = T5dualTestPairs(data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
