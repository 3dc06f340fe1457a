"""What test_export.py (in process) and test_export_processes.py (exports killed or drawn in
a subprocess) export: a generated collection with lengths that fill every bucket, a tiny
random SDE model, and a deterministic NumPy encoder that a subprocess imports from here."""

import pathlib

import numpy as np

OPTIONS = dict(max_length=32, side='document', batch_size=8, shard_size=40, buckets=(8, 16, 32),
               progress=False)


def collection_and_model(demo_beir, root):
  """A generated BEIR folder (120 docs), its vocabulary and a tiny random SDE model."""
  import jax
  from t5dual import dual_encoders, encoding, t5, vocab
  from t5dual.data import sources
  folder, spm = demo_beir(120, 40, 300)
  tok = vocab.Tokenizer(spm)
  ids, texts = sources.read_beir_corpus(folder)
  # Short, medium and long documents, so that the length buckets 8, 16, 32 are all used.
  texts = [' '.join(t.split()[:2]) if i % 3 == 0 else t if i % 3 == 1 else f'{t} {t} {t}'
           for i, t in enumerate(texts)]
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=t5.t5_config('tiny', dtype='float32', vocab_size=tok.vocab_size), projection_dim=16))
  params = jax.jit(model.init_params)(jax.random.PRNGKey(0))
  encode = encoding.make_encode_fn(model, params, 'document')
  return dict(root=root, tok=tok, ids=ids, texts=texts, model=model, params=params,
              encode=encode)


def numpy_encoder(vocab_size, dim=8):
  """A deterministic NumPy 'model': mean of fixed random token vectors, normalised."""
  table = np.random.default_rng(0).normal(size=(vocab_size, dim)).astype(np.float32)

  def encode(ids):
    mask = (ids != 0)[..., None]
    pooled = (table[ids] * mask).sum(1) / np.maximum(mask.sum(1), 1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  return encode


def files(folder):
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).iterdir())}
