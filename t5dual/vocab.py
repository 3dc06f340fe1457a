"""SentencePiece tokenization to fixed-length int32 arrays (T5 conventions).

pad = 0, eos = 1; text is trimmed to `length - 1` pieces and EOS is appended
after trimming (seqio's `append_eos_after_trim`), then padded with 0.
This is the NumPy path used when TensorFlow / seqio are not installed; the
seqio tasks in `data/seqio_tasks.py` produce identical ids.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from t5dual import cli

# The ids every T5 vocabulary gives padding and end of sequence (t5.py's modules mask
# PAD_ID and end inputs with EOS_ID; T5 decodes from PAD_ID).
PAD_ID = 0
EOS_ID = 1


class Tokenizer:
  """Thin wrapper over a SentencePiece model file."""

  def __init__(self, spm_path: str):
    import sentencepiece as spm
    if not spm_path.startswith('gs://') and not os.path.exists(spm_path):
      raise FileNotFoundError(f'SentencePiece model not found: {spm_path}')
    self.path = spm_path
    if spm_path.startswith('gs://'):
      import tensorflow as tf  # only remote vocabularies need TF's gfile
      with tf.io.gfile.GFile(spm_path, 'rb') as f:
        proto = f.read()
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    else:
      self._sp = spm.SentencePieceProcessor(model_file=spm_path)
    if self._sp.pad_id() not in (PAD_ID, -1) or self._sp.eos_id() != EOS_ID:
      raise cli.UserError(f'{spm_path}: expected pad id {PAD_ID} and eos id {EOS_ID}, got '
                          f'pad {self._sp.pad_id()} eos {self._sp.eos_id()}')

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
    """[len(texts), length] int32 ids: trimmed, EOS appended, padded with 0."""
    out = np.zeros((len(texts), length), np.int32)
    for row, ids in enumerate(self._sp.encode(list(texts))):
      ids = ids[:length - 1] + [EOS_ID]
      out[row, :len(ids)] = ids
    return out

  def encode_ids(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Ids of each text, no EOS, cut at `max_length` (the prepared store's rows,
    data/store.py; `encode` of them is `ids[:length - 1] + [EOS]` for length <= max_length + 1)."""
    return [ids[:max_length] for ids in self._sp.encode(list(texts))]

  def sha256(self) -> str:
    """Checksum of the SentencePiece model: what a prepared store was tokenized with."""
    import hashlib
    return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if i not in (PAD_ID, EOS_ID)])


def train_sentencepiece(texts: Sequence[str], model_prefix: str, vocab_size: int = 2000) -> str:
  """Trains a small T5-style SentencePiece model (pad 0, eos 1, unk 2); returns its path.

  Used by the demo and the tests, which must not download the real vocabulary.
  """
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=2, bos_id=-1, model_type='unigram',
      character_coverage=1.0, num_threads=1, minloglevel=2,
      hard_vocab_limit=False)
  return model_prefix + '.model'
