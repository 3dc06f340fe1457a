"""Gradient strategies (t5dual/gradients.py) as configured: settings that cannot work are
named before anything runs, those that can pass. Their gradients on a sharded mesh are
checked in test_grad_strategies_mesh.py."""

import pytest

from t5dual import dual_encoders, gradients, rerankers, t5, trainer


# --------------------------------------------------------------------------- settings

TINY = t5.T5Config(vocab_size=64, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16,
                   num_layers=1, relative_attention_num_buckets=4, dtype='float32')
DUAL = dual_encoders.DualEncoderModel(dual_encoders.DualEncoderConfig(t5=TINY, projection_dim=8))
RERANKER = rerankers.RerankerModel(rerankers.RerankerConfig(t5=TINY, scorer='enc'))


@pytest.mark.parametrize('model,strategy,microbatches,batch,data,message', [
    (DUAL, 'full', 4, 64, 1, r"^trainer.TrainerConfig.grad_strategy: 'full' takes the batch "
                             r"at once; num_microbatches 4 needs 'grad_cache'"),
    (RERANKER, 'grad_cache', 4, 64, 1, r"'grad_cache' needs a model_api.ContrastiveModel .*"
                                       r"takes 'accumulate'$"),
    (DUAL, 'accumulate', 4, 64, 1, r"'accumulate' would shrink .* in-batch negatives"),
    (DUAL, 'grad_cache', 4, 48, 8, r'^trainer.TrainerConfig.num_microbatches: global batch '
                                   r'size 48 does not split into 4 microbatches on each of '
                                   r'the 8 data-parallel devices \(it must be a multiple of '
                                   r'32\)$'),
])
def test_strategies_that_cannot_work_are_named(model, strategy, microbatches, batch, data,
                                               message):
  with pytest.raises(trainer.ParameterError, match=message) as e:
    trainer.check_grad_strategy(model, strategy, microbatches, batch, data)
  assert '\n' not in str(e.value)


def test_strategies_that_work_pass():
  trainer.check_grad_strategy(DUAL, 'grad_cache', 4, 64, 8)
  trainer.check_grad_strategy(RERANKER, 'accumulate', 2, 16, 8)
  trainer.check_grad_strategy(DUAL, 'full', 1, 64, 8)
  assert isinstance(DUAL, gradients.model_api.ContrastiveModel)
  assert not isinstance(RERANKER, gradients.model_api.ContrastiveModel)


def test_an_unknown_strategy_names_the_config_key():
  with pytest.raises(trainer.ParameterError,
                     match=r"^trainer.TrainerConfig.grad_strategy: must be one of \('full', "
                           r"'grad_cache', 'accumulate'\), got 'gradcache'$"):
    trainer.TrainerConfig(grad_strategy='gradcache')
  with pytest.raises(trainer.ParameterError, match=r'^trainer.TrainerConfig.num_microbatches'):
    trainer.TrainerConfig(num_microbatches=0)
