"""Reranker scorers against Hugging Face transformers (float64 reference), configs and inputs."""

import dataclasses

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from hf_t5 import (VARIANTS, double_copy, float32_tolerance, hf_logits, padded_ids,  # noqa: E402
                   t5dual_config, t5dual_params, tiny_hf)  # tests/helpers
from t5dual import rerankers, t5  # noqa: E402
from t5dual.interop import trees  # noqa: E402
from t5dual.vocab import Tokenizer, train_sentencepiece  # noqa: E402

# Token ids inside the tiny models' vocabulary of 70.
SCORING, YES, NO = 61, 11, 17


def _config(hf_cfg, scorer, **kw):
  return rerankers.RerankerConfig(t5=t5dual_config(hf_cfg), scorer=scorer,
                                  scoring_token_id=SCORING, yes_token_id=YES, no_token_id=NO,
                                  **kw)


def _lists(seed, vocab):
  """ids [2, 3, 20]: candidates of random lengths, the last one all padding."""
  ids = padded_ids(np.random.default_rng(seed), 6, 20, vocab)
  ids[5] = t5.PAD_ID
  return ids.reshape(2, 3, 20)


def _first_step_reference(model, ids):
  """HF's float64 first-step logits [N, vocab] from the start token, for ids [N, L]."""
  return hf_logits(model, ids, np.full((len(ids), 1), t5.DECODER_START_ID))[:, 0]


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_encdec_score_is_the_first_step_logit_of_the_scoring_token(variant):
  cfg, model = tiny_hf(variant)
  ids = _lists(0, cfg.vocab_size)
  ref = _first_step_reference(model, ids.reshape(6, 20))
  config = _config(cfg, 'encdec')
  scores = np.asarray(rerankers.scorer_module(config).apply(
      {'params': t5dual_params(model)}, ids))
  assert scores.shape == (2, 3) and scores.dtype == np.float32
  np.testing.assert_allclose(scores.reshape(6), ref[:, SCORING], rtol=0,
                             atol=float32_tolerance(ref))
  # The same sequences unbatched ([N, L]) score the same.
  flat = rerankers.scorer_module(config).apply({'params': t5dual_params(model)},
                                               ids.reshape(6, 20))
  np.testing.assert_allclose(flat, scores.reshape(6), rtol=0, atol=float32_tolerance(ref))


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_yes_no_score_is_the_log_softmax_over_the_two_answers(variant):
  cfg, model = tiny_hf(variant, seed=1)
  ids = _lists(1, cfg.vocab_size)
  ref = _first_step_reference(model, ids.reshape(6, 20))
  want = ref[:, YES] - np.logaddexp(ref[:, YES], ref[:, NO])
  scores = np.asarray(rerankers.scorer_module(_config(cfg, 'yes_no')).apply(
      {'params': t5dual_params(model)}, ids))
  assert scores.shape == (2, 3) and (scores <= 0).all()
  # A log-softmax of two logits carries at most twice their error.
  np.testing.assert_allclose(scores.reshape(6), want, rtol=0,
                             atol=2 * float32_tolerance(ref))


@pytest.mark.parametrize('pooling', rerankers.POOLINGS)
def test_enc_score_is_a_dense_layer_on_the_pooled_hf_encoder_output(pooling):
  cfg, model = tiny_hf('t5.1.1', seed=2)
  ids = _lists(2, cfg.vocab_size)
  flat_ids = ids.reshape(6, 20)
  with torch.no_grad():
    hidden = double_copy(model).encoder(
        input_ids=torch.tensor(flat_ids), attention_mask=torch.tensor(flat_ids != 0)
    ).last_hidden_state.numpy()
  mask = (flat_ids != 0)[..., None]
  pooled = hidden[:, 0] if pooling == 'first' else (
      (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1))
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(cfg.d_model, 1)).astype(np.float32)
  bias = np.array([0.7], np.float32)
  want = (pooled @ kernel + bias)[:, 0]

  config = _config(cfg, 'enc', pooling=pooling)
  tree = t5dual_params(model)
  params = {'token_embedder': tree['token_embedder'], 'encoder': tree['encoder'],
            'score_dense': {'kernel': kernel, 'bias': bias}}
  scores = np.asarray(rerankers.scorer_module(config).apply({'params': params}, ids))
  assert scores.shape == (2, 3)
  # The error of a sum of products is that of its terms' magnitudes.
  magnitude = (np.abs(pooled) @ np.abs(kernel))[:, 0] + abs(bias[0])
  np.testing.assert_allclose(scores.reshape(6), want, rtol=0,
                             atol=float32_tolerance(magnitude))


@pytest.mark.slow
def test_parameter_trees_and_logical_axes():
  base = t5.T5Config(vocab_size=70, emb_dim=24, num_heads=3, head_dim=10, mlp_dim=40,
                     num_layers=2, dtype='float32')
  for scorer in rerankers.SCORERS:
    config = rerankers.RerankerConfig(t5=base, scorer=scorer, scoring_token_id=SCORING,
                                      yes_token_id=YES, no_token_id=NO)
    params = trees.flatten(rerankers.init_params(config, jax.random.PRNGKey(0)))
    axes = trees.flatten(rerankers.logical_axes(config))
    assert sorted(axes) == sorted(params)
    assert all(len(axes[k]) == v.ndim for k, v in params.items())
    tops = sorted({k.split('/')[0] for k in params})
    if scorer == 'enc':
      assert tops == ['encoder', 'score_dense', 'token_embedder']
      assert tuple(axes['score_dense/kernel']) == ('embed', 'score')
      assert tuple(axes['score_dense/bias']) == ('score',)
      assert params['score_dense/kernel'].shape == (24, 1)
    else:
      assert tops == ['decoder', 'encoder', 'token_embedder']
      assert tuple(axes['decoder/logits_dense/kernel']) == ('embed', 'vocab')


@pytest.mark.slow
@pytest.mark.parametrize('scorer', rerankers.SCORERS)
def test_dropout_only_when_not_deterministic(scorer):
  config = rerankers.RerankerConfig(
      t5=t5.t5_config('tiny', vocab_size=70, dtype='float32', dropout_rate=0.3), scorer=scorer,
      scoring_token_id=SCORING, yes_token_id=YES, no_token_id=NO)
  module = rerankers.scorer_module(config)
  params = {'params': rerankers.init_params(config, jax.random.PRNGKey(0))}
  ids = padded_ids(np.random.default_rng(4), 4, 10, 70)
  quiet = [np.asarray(module.apply(params, ids)) for _ in range(2)]
  np.testing.assert_array_equal(quiet[0], quiet[1])
  noisy = [np.asarray(module.apply(params, ids, False, rngs={'dropout': jax.random.PRNGKey(i)}))
           for i in range(2)]
  assert np.isfinite(noisy).all()
  assert np.abs(noisy[0] - noisy[1]).max() > 1e-4 and np.abs(noisy[0] - quiet[0]).max() > 1e-4


def test_scores_reject_inputs_of_the_wrong_rank():
  config = rerankers.RerankerConfig(t5=t5.t5_config('tiny', vocab_size=70, dtype='float32'),
                                    scorer='enc')
  params = rerankers.init_params(config, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r'\[batch, list, length\]'):
    rerankers.scorer_module(config).apply({'params': params}, np.ones((4,), np.int32))


# --------------------------------------------------------------------------- config

TINY_T5 = t5.T5Config(vocab_size=100, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=8,
                      num_layers=1)


@pytest.mark.parametrize('fields, message', [
    (dict(scorer='cross'), 'RerankerConfig.scorer'),
    (dict(scorer='enc', pooling='max'), 'RerankerConfig.pooling'),
    (dict(template='Q: {query}'), 'RerankerConfig.template'),
    (dict(template='{query} {document} {title}'), 'RerankerConfig.template'),
    (dict(template='{query} {document'), 'RerankerConfig.template'),
    (dict(input_length=1), 'RerankerConfig.input_length'),
    (dict(scoring_token_id=100), r'RerankerConfig.scoring_token_id .*\[0, 100\)'),
    (dict(scorer='yes_no', yes_token_id=5, no_token_id=-1), 'RerankerConfig.no_token_id'),
    (dict(scorer='yes_no', yes_token_id=5, no_token_id=5), 'must differ'),
    (dict(t5={'vocab_size': 100}), 'RerankerConfig.t5 must be a T5Config'),
])
def test_config_errors_name_the_key(fields, message):
  fields = {'t5': TINY_T5, 'scoring_token_id': 3, 'yes_token_id': 4, 'no_token_id': 5,
            **fields}
  with pytest.raises(ValueError, match=message):
    rerankers.RerankerConfig(**fields)


def test_each_scorer_defaults_to_the_input_format_of_its_checkpoints(tmp_path):
  # monoT5 was trained on 'Query: q Document: d Relevant:', RankT5 on 'Query: q Document: d'.
  assert rerankers.RerankerConfig(t5=TINY_T5, scorer='yes_no', yes_token_id=4,
                                  no_token_id=5).template == (
      'Query: {query} Document: {document} Relevant:')
  for scorer in ('encdec', 'enc'):
    assert rerankers.RerankerConfig(t5=TINY_T5, scorer=scorer, scoring_token_id=3).template == (
        'Query: {query} Document: {document}')
  own = rerankers.RerankerConfig(t5=TINY_T5, scorer='yes_no', yes_token_id=4, no_token_id=5,
                                 template='{query} | {document}')
  assert own.template == '{query} | {document}'
  # The model files say the same, and a model.json of a yes/no reranker keeps its format.
  import gin
  from t5dual import gin_utils
  for name, want in (('monot5', rerankers.MONOT5_TEMPLATE),
                     ('rankt5_encdec', rerankers.DEFAULT_TEMPLATE),
                     ('rankt5_enc', rerankers.DEFAULT_TEMPLATE)):
    gin.clear_config()
    try:
      gin_utils.parse_gin([f'gin/models/{name}.gin', 'gin/sizes/tiny.gin',
                           'configs/runs/finetune.gin', 'configs/runs/rerank.gin'],
                          ['VOCAB_SIZE = 32128'])
      model = gin.get_configurable(rerankers.RerankerModel)()
    finally:
      gin.clear_config()
    assert model.config.template == want, name
    back = rerankers.RerankerModel.from_description(model.describe())
    assert back.config.template == want


def test_config_checks_only_the_token_ids_its_scorer_uses():
  # An 'enc' reranker of a small vocabulary keeps the (unused) T5 defaults.
  config = rerankers.RerankerConfig(t5=TINY_T5, scorer='enc')
  assert config.scoring_token_id == rerankers.EXTRA_ID_10 == 32089
  assert dataclasses.replace(config, pooling='mean').pooling == 'mean'
  with pytest.raises(ValueError, match='scoring_token_id'):
    dataclasses.replace(config, scorer='encdec')


# --------------------------------------------------------------------------- inputs

WORDS = ('the patient has a fever and a cough true false yes no what causes diabetes '
         'insulin glucose treatment symptoms of asthma ').split()


@pytest.fixture(scope='module')
def tiny_vocab(tmp_path_factory):
  rng = np.random.default_rng(0)
  texts = [' '.join(rng.choice(WORDS, size=12)) for _ in range(400)]
  return train_sentencepiece(texts, str(tmp_path_factory.mktemp('spm') / 'spm'), vocab_size=60)


def test_encode_pairs_fills_the_template_trims_and_appends_eos(tiny_vocab):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=tiny_vocab)
  tok = Tokenizer(tiny_vocab)
  queries = ['what causes diabetes', 'asthma']
  documents = ['insulin and glucose', 'symptoms of asthma ' * 20]
  ids = rerankers.encode_pairs(tok, queries, documents, length=24)
  assert ids.shape == (2, 24) and ids.dtype == np.int32
  for row, (q, d) in zip(ids, zip(queries, documents)):
    pieces = sp.encode(f'Query: {q} Document: {d}')[:23] + [t5.EOS_ID]
    np.testing.assert_array_equal(row[:len(pieces)], pieces)
    assert (row[len(pieces):] == t5.PAD_ID).all()
  assert ids[1, -1] == t5.EOS_ID  # trimmed: EOS after the cut, not lost
  custom = rerankers.encode_pairs(tok, ['q'], ['d'], template='{document} ? {query}', length=16)
  np.testing.assert_array_equal(custom[0, :len(sp.encode('d ? q')) + 1],
                                sp.encode('d ? q') + [t5.EOS_ID])
  with pytest.raises(ValueError, match='2 queries but 1 documents'):
    rerankers.encode_pairs(tok, queries, documents[:1])
  with pytest.raises(ValueError, match='template'):
    rerankers.encode_pairs(tok, queries, documents, template='{query}')


def test_answer_token_ids_in_a_small_vocabulary(tiny_vocab):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=tiny_vocab)
  if sp.piece_to_id('▁true') == sp.unk_id() or sp.piece_to_id('▁false') == sp.unk_id():
    pytest.fail('the tiny vocabulary should hold ▁true and ▁false whole')
  assert rerankers.yes_no_token_ids(tiny_vocab) == (sp.piece_to_id('▁true'),
                                                     sp.piece_to_id('▁false'))
  with pytest.raises(ValueError, match="'hypoglycaemia' is not a single piece"):
    rerankers.answer_token_id(Tokenizer(tiny_vocab), 'hypoglycaemia')


def test_default_answer_ids_are_those_of_the_t5_vocabulary(shared_dir):
  vocab = str(shared_dir / 'vocab' / 't5_spiece.model')
  assert rerankers.yes_no_token_ids(vocab) == (rerankers.T5_TRUE_ID, rerankers.T5_FALSE_ID)
  config = rerankers.RerankerConfig(scorer='yes_no')
  assert (config.yes_token_id, config.no_token_id) == (1176, 6136)
