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
  import jax
  from t5dual import checkpoints, layer_layout
  t5dual_params = None
  if os.path.exists(os.path.join(path, checkpoints.MODEL_JSON)):
    source, params = checkpoints.restore_for_inference(path)[:2]
    if source.kind == model.kind and source.describe()['config'] == model.describe()['config']:
      return params
    t5dual_params = layer_layout.scan_to_unrolled(params)  # a scanned source: T5X's names
  unrolled = layer_layout.unscanned_model(model)
  if unrolled is model:
    return _load_initial(path, model, shardings, t5dual_params)
  # Checkpoints name layers layers_{i}: load into the unrolled twin, then stack.
  params = layer_layout.unrolled_to_scan(_load_initial(path, unrolled, None, t5dual_params))
  return params if shardings is None else jax.device_put(params, shardings)


def _load_initial(path: str, model, shardings, t5dual_params):
  """load_initial_params for an unrolled `model`; t5dual_params: a t5dual dir's, unrolled."""
  from t5dual.interop import hf, mapping, t5x
  from t5dual.interop import rerankers as rerankers_interop
  from t5dual.interop import sentence_transformers as st
  if t5dual_params is not None:
    params, report = mapping.graft(t5dual_params, model)
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
