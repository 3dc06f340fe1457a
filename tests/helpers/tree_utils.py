"""Shared test helpers for parameter trees."""

import jax
import numpy as np

from t5dual import dual_encoders
from t5dual.interop import trees


def random_params(config, seed=0):
  """Random float32 params of `config`, none trivial but the network well conditioned.

  Kernels have variance 1/fan-in (fan-in = shape[0]) as T5 initialises them, so that rounding
  errors are not amplified from layer to layer (tests/helpers/tolerances.py assumes this);
  layer-norm scales are uniform around 1 and embeddings have standard deviation 0.5.
  """
  shapes = jax.eval_shape(dual_encoders.DualEncoderModel(config).init_params, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return trees.unflatten({
      k: (rng.uniform(0.5, 1.5, v.shape) if k.endswith('scale') else
          rng.normal(0, 1 / np.sqrt(v.shape[0]), v.shape) if k.endswith('kernel') else
          rng.normal(0, 0.5, v.shape)).astype(np.float32) for k, v in trees.flatten(shapes).items()})
