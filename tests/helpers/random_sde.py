"""A generated BEIR collection with a tiny random SDE model, and a model directory holding it:
what test_retrieval_eval.py (in process) and test_retrieval_eval_cli.py (the scripts run as
processes) evaluate."""

import numpy as np

import tolerances  # tests/helpers

# Metrics lie in [0, 1] and are float64 sums of at most 100 terms per query, then a mean over
# at most 100 queries: any two implementations agree to this.
METRICS = tolerances.tolerance(1.0, depth=2, width=100, dtype=np.float64)


def beir_with_random_sde(demo_beir, root):
  """A generated BEIR folder, its vocabulary, and a tiny random SDE model."""
  import jax
  from t5dual import dual_encoders, t5, vocab
  folder, spm = demo_beir(160, 40, 300)
  tok = vocab.Tokenizer(spm)
  model = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(
      t5=t5.t5_config('tiny', dtype='float32', vocab_size=tok.vocab_size), projection_dim=16))
  params = jax.jit(model.init_params)(jax.random.PRNGKey(0))
  return dict(root=root, folder=folder, tok=tok, model=model, params=params)


def write_model_dir(beir, path):
  """A t5dual model directory holding beir_with_random_sde's model at step 3."""
  import optax
  from t5dual import checkpoints
  desc = checkpoints.model_description(beir['model'], beir['tok'].path,
                                       {'inputs': 16, 'targets': 32})
  checkpoints.write_model_json(path, desc)
  manager = checkpoints.checkpoint_manager(path)
  checkpoints.save(manager, 3, beir['params'], optax.sgd(0.1).init(beir['params']), force=True)
  manager.wait_until_finished()
  manager.close()
