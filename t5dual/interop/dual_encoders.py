"""The interop of dual encoders (dual_encoders.DualEncoderModel): its `interop_module`.

Every model family's interop module offers the same two functions, so that
initial checkpoints (`interop.load_initial_params`) and `scripts/convert.py
t5dual-to-hf` reach the family's formats through the model, never through a
branch on its kind:

  load_initial(path, model, shardings) -> (params, mapping.MappingReport)
  write_hf(folder, params, model, vocab, max_lengths) -> [(folder written, line)]
"""

from __future__ import annotations

from typing import Any, Mapping, Optional


def load_initial(path: str, model, shardings: Any = None):
  """(params, report) of `model` (unrolled layers) from a sentence-transformers folder, a
  Hugging Face checkpoint or a T5X checkpoint, whichever `path` is."""
  from t5dual.interop import hf, t5x
  from t5dual.interop import sentence_transformers as st
  loader = (st.load_dual_encoder if st.is_st_folder(path) else
            hf.load_dual_encoder if hf.is_hf_checkpoint(path) else t5x.load_dual_encoder)
  params, _, report = loader(path, model.config, shardings=shardings)
  return params, report


def write_hf(folder: str, params: Mapping, model, vocab: Optional[str],
             max_lengths: dict) -> list[tuple[str, str]]:
  """Each tower as a Hugging Face T5EncoderModel folder (one for SDE, one per side
  otherwise); [(folder, the line that says what it holds)]."""
  from t5dual.interop import hf
  return [(out, f'wrote Hugging Face T5EncoderModel folder {out}:')
          for out in hf.save_t5_encoders(folder, params, model.config, vocab, max_lengths)]
