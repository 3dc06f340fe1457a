"""Shared test helpers for parameter trees."""

import jax
import numpy as np

from t5dual import models
from t5dual.interop import trees


def random_params(config, seed=0):
  """Random float32 params of `config` (layer-norm scales around 1, so none is trivial)."""
  shapes = jax.eval_shape(models.DualEncoderModel(config).init_params, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return trees.unflatten({
      k: (rng.uniform(0.5, 1.5, v.shape) if k.endswith('scale') else rng.normal(0, 0.5, v.shape)
          ).astype(np.float32) for k, v in trees.flatten(shapes).items()})
