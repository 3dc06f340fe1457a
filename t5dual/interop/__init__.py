"""Checkpoint interop: Hugging Face / sentence-transformers and T5X formats.

  t5x                    T5X checkpoints read (msgpack or orbax) and written
  hf                     Hugging Face T5 state dicts and folders
  sentence_transformers  GTR / sentence-T5 folders
  mapping                T5X-named trees into t5dual models, t5dual towers out
  trees, lazy_arrays     nested parameter dicts; checkpoint arrays read on demand
  storage, msgpack_io    local / gs:// files; flax's msgpack encoding
"""

from __future__ import annotations

import logging
import os


def load_initial_params(path: str, model, shardings=None):
  """Params for `model` from a T5X, Hugging Face, sentence-transformers or t5dual checkpoint.

  What the checkpoint lacks (e.g. the projection of a pretrained T5, the decoder
  of a reranker started from a t5dual dual encoder) is freshly initialised; the
  conversion report is logged parameter by parameter.
  """
  from t5dual import checkpoints
  from t5dual.interop import hf, mapping, t5x
  from t5dual.interop import rerankers as rerankers_interop
  from t5dual.interop import sentence_transformers as st
  if os.path.exists(os.path.join(path, checkpoints.MODEL_JSON)):
    source, params = checkpoints.restore_for_inference(path)[:2]
    if source.kind == model.kind and source.describe()['config'] == model.describe()['config']:
      return params
    params, report = mapping.graft(params, model)
  elif getattr(model, 'kind', None) == 'reranker':
    params, _, report = rerankers_interop.load_reranker(path, model.config,
                                                        shardings=shardings)
  else:
    loader = (st.load_dual_encoder if st.is_st_folder(path) else
              hf.load_dual_encoder if hf.is_hf_checkpoint(path) else t5x.load_dual_encoder)
    params, _, report = loader(path, model.config, shardings=shardings)
  for line in report.lines():
    logging.info('initial checkpoint %s: %s', path, line)
  return params
