"""Tiny random Hugging Face T5ForConditionalGeneration models and float64 references.

Shared by the decoder and reranker tests. The reference runs in float64, so a
difference from it is the float32 rounding of whatever is compared.
"""

import copy

import numpy as np
import torch
import transformers

from t5dual import t5
from t5dual.interop import hf

from tolerances import float32_tolerance  # noqa: F401  (re-exported for the HF tests)

VARIANTS = {'t5.1.1': ('gated-gelu', False), 't5.1.0': ('relu', True)}


def tiny_hf(variant, seed=0, vocab_size=70):
  """A random T5ForConditionalGeneration with inner dim 30 != d_model 24, in eval mode.

  Few buckets and a short max_distance let a 25-step decoder reach the
  log-spaced and clipped causal buckets. Layer-norm scales are random so that a
  skipped or misplaced norm cannot pass; one token embedding, as in real T5.
  """
  proj, tied = VARIANTS[variant]
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
      vocab_size=vocab_size, d_model=24, d_kv=10, d_ff=40, num_layers=2, num_decoder_layers=3,
      num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj=proj, dropout_rate=0.0, layer_norm_epsilon=1e-6)
  # transformers 5 reads T5.1.1's untied, unscaled head from these two flags.
  cfg.tie_word_embeddings = cfg.scale_decoder_outputs = tied
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.uniform_(0.5, 1.5)
    for stack in (model.encoder, model.decoder):
      stack.embed_tokens.weight.copy_(model.shared.weight)
  return cfg, model


def t5dual_config(hf_cfg, **overrides):
  """The float32 t5dual T5Config of an HF config."""
  return hf.t5_config_from_hf(
      hf_cfg, dtype='float32', num_decoder_layers=hf_cfg.num_decoder_layers,
      logits_via_embedding=hf_cfg.scale_decoder_outputs, **overrides)


def t5dual_params(model):
  """The T5X-named tree (t5dual's EncoderDecoder params) of an HF model."""
  return hf.t5x_tree_from_hf({k: v.numpy() for k, v in model.state_dict().items()},
                             model.config.to_dict())


def padded_ids(rng, batch, length, vocab):
  """Random ids >= 2 with right padding; row 0 full, the others of random lengths."""
  ids = rng.integers(2, vocab, size=(batch, length))
  lengths = rng.integers(1, length + 1, size=batch)
  lengths[0] = length
  ids[np.arange(length)[None, :] >= lengths[:, None]] = t5.PAD_ID
  return ids


def double_copy(model):
  """A float64 copy of an HF model (the model itself is left as it is).

  A deep copy, not a model rebuilt from its config: transformers 5 configs say
  tie_word_embeddings=True even for T5.1.1, and a rebuilt model would tie its
  lm_head to the embedding.
  """
  return copy.deepcopy(model).double().eval()


def hf_logits(model, ids, decoder_ids):
  """float64 logits [B, T, vocab] of an HF model on ids [B, L] (0 = padding)."""
  with torch.no_grad():
    return double_copy(model)(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0),
        decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
