"""A TFDS dataset of (query, positive, hard negatives) examples built from a local JSONL
file, for the prepare tests: nothing is downloaded. The file is the builder's
manual_dir/examples.jsonl ({"query", "positive", "negatives"} lines, the pairs JSONL of a
store), prepared into a data_dir as array_record (read by row) or tfrecord (tf.data).
"""

import os
import shutil

from etils import epath
import tensorflow_datasets as tfds

NAME = 't5dual_test_negatives'


class T5dualTestNegatives(tfds.core.GeneratorBasedBuilder):
  """query, positive, negatives examples of manual_dir/examples.jsonl, split 'train'."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for metadata files in the builder's package; tests/helpers is no package.
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'examples.jsonl: {"query", "positive", "negatives"} lines'

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'query': tfds.features.Text(), 'positive': tfds.features.Text(),
        'negatives': tfds.features.Sequence(tfds.features.Text())}),
        disable_shuffling=True)  # the file's order: the JSONL store's

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(os.path.join(dl_manager.manual_dir,
                                                          'examples.jsonl'))}

  def _generate_examples(self, path):
    import json
    with open(path) as f:
      for row, line in enumerate(f):
        yield row, json.loads(line)


def build(jsonl_path: str, data_dir: str, file_format: str = 'array_record'):
  """Prepares the dataset of the pairs JSONL file `jsonl_path` in `data_dir`."""
  manual_dir = os.path.join(data_dir, 'manual')
  os.makedirs(manual_dir, exist_ok=True)
  shutil.copy(jsonl_path, os.path.join(manual_dir, 'examples.jsonl'))
  builder = T5dualTestNegatives(data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
