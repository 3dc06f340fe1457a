"""Reranker checkpoints: HF and T5X encoder-decoders in, T5ForConditionalGeneration out."""

import dataclasses

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from hf_t5 import (VARIANTS, float32_tolerance, hf_logits, padded_ids, t5dual_config,  # noqa: E402
                   t5dual_params, tiny_hf)  # tests/helpers
from t5dual import partitioning, rerankers, t5  # noqa: E402
from t5dual.interop import rerankers as interop  # noqa: E402
from t5dual.interop import t5x, trees  # noqa: E402

SCORING, YES, NO = 61, 11, 17


def _first_step_logits(model, ids):
  return hf_logits(model, ids, np.full((len(ids), 1), t5.DECODER_START_ID))[:, 0]


def _assert_trees_equal(got, want):
  got, want = trees.flatten(got), trees.flatten(want)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)


@pytest.mark.slow  # 11-17 s in the full record (tests/DURATIONS.md)
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_hf_folder_to_reranker_to_hf_folder(tmp_path, variant):
  cfg, model = tiny_hf(variant)
  model.save_pretrained(tmp_path / 'in')
  params, config, report = interop.load_reranker(str(tmp_path / 'in'), scorer='encdec',
                                                 dtype='float32', scoring_token_id=SCORING)
  assert config.t5 == t5dual_config(cfg) and config.t5.decoder_layers == 3
  assert config.t5.logits_via_embedding == (variant == 't5.1.0')
  assert not report.initialised and not report.skipped
  _assert_trees_equal(params, t5dual_params(model))

  ids = padded_ids(np.random.default_rng(0), 5, 16, cfg.vocab_size)
  ref = _first_step_logits(model, ids)
  scores = rerankers.scorer_module(config).apply({'params': params}, ids)
  np.testing.assert_allclose(scores, ref[:, SCORING], rtol=0, atol=float32_tolerance(ref))

  interop.save_hf(str(tmp_path / 'out'), params, config)
  back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'out').eval()
  assert back.config.scale_decoder_outputs == (variant == 't5.1.0')
  assert back.config.num_decoder_layers == 3 and back.config.d_kv == 10
  want, got = model.state_dict(), back.state_dict()
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
  np.testing.assert_array_equal(_first_step_logits(back, ids), ref)

  with pytest.raises(FileExistsError, match='not overwriting'):
    interop.save_hf(str(tmp_path / 'out'), params, config)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['in', 'out']  # no temporary left


@pytest.mark.slow
def test_t5x_checkpoint_loads_whole_into_a_yes_no_reranker(tmp_path):
  cfg, model = tiny_hf('t5.1.1', seed=1)
  tree = t5dual_params(model)
  t5x.write_checkpoint(str(tmp_path / 'checkpoint_7'), tree, step=7)
  mesh = partitioning.Partitioner(devices=jax.devices()[:1]).mesh
  # T5X checkpoints do not record max_distance; the tiny model's is 20.
  params, config, report = interop.load_reranker(
      str(tmp_path), scorer='yes_no', dtype='float32', relative_attention_max_distance=20,
      yes_token_id=YES, no_token_id=NO, shardings=mesh)
  assert config.scorer == 'yes_no' and config.t5 == t5dual_config(cfg)
  assert report.skipped == ['state/step'] and not report.initialised
  leaf = params['decoder']['logits_dense']['kernel']
  assert isinstance(leaf, jax.Array) and leaf.sharding.mesh == mesh
  _assert_trees_equal(params, tree)

  ids = padded_ids(np.random.default_rng(1), 4, 12, cfg.vocab_size)
  ref = _first_step_logits(model, ids)
  want = ref[:, YES] - np.logaddexp(ref[:, YES], ref[:, NO])
  scores = rerankers.scorer_module(config).apply({'params': params}, ids)
  np.testing.assert_allclose(scores, want, rtol=0, atol=2 * float32_tolerance(ref))


@pytest.mark.slow  # 11-17 s in the full record (tests/DURATIONS.md)
def test_enc_reranker_takes_the_encoder_and_initialises_its_head(tmp_path):
  cfg, model = tiny_hf('t5.1.0', seed=2)
  model.save_pretrained(tmp_path / 'in')
  params, config, report = interop.load_reranker(str(tmp_path / 'in'), scorer='enc',
                                                 pooling='mean', dtype='float32', seed=3)
  assert config.pooling == 'mean' and config.t5.decoder_layers == config.t5.num_layers
  assert report.initialised == ['score_dense/bias', 'score_dense/kernel']
  assert 'decoder/layers_2/mlp/wo/kernel' in report.skipped
  tree = t5dual_params(model)
  _assert_trees_equal({k: params[k] for k in ('token_embedder', 'encoder')},
                      {k: tree[k] for k in ('token_embedder', 'encoder')})
  fresh = rerankers.init_params(config, jax.random.PRNGKey(3))['score_dense']
  _assert_trees_equal(params['score_dense'], fresh)
  # Its own tree (head included) maps back onto itself.
  again, _, report = interop.reranker_from_tree(params, config)
  _assert_trees_equal(again, params)
  assert not report.initialised
  with pytest.raises(ValueError, match="'enc' reranker has no decoder"):
    interop.save_hf(str(tmp_path / 'out'), params, config)


def test_mismatched_checkpoints_are_errors(tmp_path):
  cfg, model = tiny_hf('t5.1.1', seed=3)
  tree = t5dual_params(model)
  encoder_only = {k: tree[k] for k in ('token_embedder', 'encoder')}
  with pytest.raises(ValueError, match="'encdec' reranker needs an encoder-decoder"):
    interop.reranker_from_tree(encoder_only, dtype='float32', scoring_token_id=SCORING)
  # A config with T5 1.0's tied head has no place for T5.1.1's logits_dense.
  tied = rerankers.RerankerConfig(
      t5=dataclasses.replace(t5dual_config(cfg), logits_via_embedding=True),
      scoring_token_id=SCORING)
  with pytest.raises(ValueError, match='decoder/logits_dense/kernel has no counterpart'):
    interop.reranker_from_tree(tree, tied)
  fewer_layers = rerankers.RerankerConfig(
      t5=dataclasses.replace(t5dual_config(cfg), num_decoder_layers=2), scoring_token_id=SCORING)
  with pytest.raises(ValueError, match='decoder/layers_2/.* has no counterpart'):
    interop.reranker_from_tree(tree, fewer_layers)
  with pytest.raises(TypeError, match='unknown'):
    interop.reranker_from_tree(tree, dtype='float32', temprature=0.1)
  with pytest.raises(ValueError, match='either config or'):
    interop.reranker_from_tree(tree, tied, dtype='float32')


# --------------------------------------------------------------------------- scripts/convert.py

@pytest.fixture(scope='module')
def convert():
  from script_modules import load_script  # tests/helpers
  return load_script('convert')


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
  from t5dual.vocab import train_sentencepiece
  # Few distinct words, so that the unigram model keeps 'true' and 'false' whole.
  words = 'true false passage query answers that is it or'.split()
  rng = np.random.default_rng(0)
  texts = [' '.join(rng.choice(words, 8)) for _ in range(200)]
  return train_sentencepiece(texts, str(tmp_path_factory.mktemp('spm') / 'sp'), vocab_size=60)


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert '\n' not in message, message
  return message


@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.slow
def test_convert_cli_hf_to_reranker_dir_and_back_is_exact(tmp_path, convert, spm, variant,
                                                          capsys):
  from t5dual import rerank_runs
  cfg, model = tiny_hf(variant, seed=4)
  model.save_pretrained(tmp_path / 'in')
  assert convert.main(['hf-to-t5dual', str(tmp_path / 'in'), str(tmp_path / 'rr'),
                       '--scorer=encdec', f'--scoring-token={SCORING}', f'--vocab={spm}',
                       '--dtype=float32', '--input-length=16']) == 0
  assert 'wrote t5dual encdec reranker model' in capsys.readouterr().out
  # The directory reloads by its kind, as scripts/rerank.py reads it.
  reranker, params, _, _, length = rerank_runs.load_reranker(str(tmp_path / 'rr'))
  assert length == 16 and reranker.config.scoring_token_id == SCORING
  assert reranker.config.t5 == t5dual_config(cfg)
  _assert_trees_equal(params, t5dual_params(model))
  ids = padded_ids(np.random.default_rng(4), 5, 16, cfg.vocab_size)
  ref = _first_step_logits(model, ids)
  np.testing.assert_allclose(reranker.score(params, ids), ref[:, SCORING], rtol=0,
                             atol=float32_tolerance(ref))

  assert convert.main(['t5dual-to-hf', str(tmp_path / 'rr'), str(tmp_path / 'out')]) == 0
  assert 'T5ForConditionalGeneration' in capsys.readouterr().out
  back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'out').eval()
  want, got = model.state_dict(), back.state_dict()
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
  assert (tmp_path / 'out' / 'spiece.model').exists()  # the tokenizer travels with it


def test_convert_cli_t5x_to_yes_no_reranker_dir(tmp_path, convert, spm):
  from t5dual import rerank_runs
  from t5dual.vocab import Tokenizer
  cfg, model = tiny_hf('t5.1.1', seed=5)
  t5x.write_checkpoint(str(tmp_path / 'checkpoint_3'), t5dual_params(model), step=3)
  answers = ['true', 'false']
  assert convert.main(['t5x-to-t5dual', str(tmp_path / 'checkpoint_3'), str(tmp_path / 'rr'),
                       '--scorer=yes_no', f'--answers={",".join(answers)}', f'--vocab={spm}',
                       '--dtype=float32', '--max-distance=20', '--input-length=12']) == 0
  reranker, params, _, _, _ = rerank_runs.load_reranker(str(tmp_path / 'rr'))
  yes, no = rerankers.yes_no_token_ids(Tokenizer(spm), *answers)
  assert (reranker.config.yes_token_id, reranker.config.no_token_id) == (yes, no)
  # monoT5's own input format, unless --template says otherwise.
  assert reranker.config.template == 'Query: {query} Document: {document} Relevant:'
  _assert_trees_equal(params, t5dual_params(model))
  ids = padded_ids(np.random.default_rng(5), 4, 12, cfg.vocab_size)
  ref = _first_step_logits(model, ids)
  want = ref[:, yes] - np.logaddexp(ref[:, yes], ref[:, no])
  np.testing.assert_allclose(reranker.score(params, ids), want, rtol=0,
                             atol=2 * float32_tolerance(ref))
  # T5X out and back in again is exact too.
  assert convert.main(['t5dual-to-t5x', str(tmp_path / 'rr'), str(tmp_path / 't5x_out')]) == 0
  _assert_trees_equal(t5x.load_tree(str(tmp_path / 't5x_out')), t5dual_params(model))


@pytest.mark.slow  # 11-17 s in the full record (tests/DURATIONS.md)
def test_convert_cli_reranker_errors_are_one_line(tmp_path, convert, spm):
  from t5dual import cli
  cfg, model = tiny_hf('t5.1.1', seed=6)
  tree = t5dual_params(model)
  t5x.write_checkpoint(str(tmp_path / 'enc_only'),
                       {k: tree[k] for k in ('token_embedder', 'encoder')}, step=1)
  with pytest.raises(cli.UserError) as e:
    convert.main(['t5x-to-t5dual', str(tmp_path / 'enc_only'), str(tmp_path / 'a'),
                  '--scorer=encdec', f'--scoring-token={SCORING}', f'--vocab={spm}'])
  assert 'needs an encoder-decoder checkpoint' in _one_line(e)
  with pytest.raises(cli.UserError) as e:  # the default <extra_id_10> is past a tiny vocabulary
    convert.main(['t5x-to-t5dual', str(tmp_path / 'enc_only'), str(tmp_path / 'a'),
                  '--scorer=encdec', f'--vocab={spm}'])
  assert 'scoring_token_id must be a token id in [0, 70)' in _one_line(e)
  with pytest.raises(cli.UserError) as e:
    convert.main(['t5x-to-t5dual', str(tmp_path / 'enc_only'), str(tmp_path / 'b'),
                  '--scorer=yes_no', '--answers=maybe,never', f'--vocab={spm}'])
  assert "'maybe'" in _one_line(e)
  # An 'enc' reranker has no T5ForConditionalGeneration, and a reranker no sentence-transformers.
  assert convert.main(['t5x-to-t5dual', str(tmp_path / 'enc_only'), str(tmp_path / 'enc'),
                       '--scorer=enc', f'--vocab={spm}', '--dtype=float32']) == 0
  with pytest.raises(cli.UserError) as e:
    convert.main(['t5dual-to-hf', str(tmp_path / 'enc'), str(tmp_path / 'c')])
  assert "'enc' reranker has no decoder" in _one_line(e)
  with pytest.raises(cli.UserError) as e:
    convert.main(['t5dual-to-st', str(tmp_path / 'enc'), str(tmp_path / 'd')])
  assert 'holds a reranker model' in _one_line(e)
  assert not (tmp_path / 'a').exists() or not any((tmp_path / 'a').iterdir())
  assert not (tmp_path / 'c').exists() and not (tmp_path / 'd').exists()


@pytest.mark.parametrize('flags, expected', [
    (['--scorer=yes_no', '--answers=yes'],
     "--answers must be two different words YES,NO (e.g. true,false), got 'yes'"),
    (['--scorer=yes_no', '--answers=yes,no,maybe'], "got 'yes,no,maybe'"),
    (['--scorer=yes_no', '--answers=true,true'], "got 'true,true'"),
    (['--scorer=encdec', '--answers=yes,no'], '--answers is for --scorer=yes_no'),
    (['--scorer=yes_no', f'--scoring-token={SCORING}'], '--scoring-token is for --scorer=encdec'),
    (['--scorer=yes_no', '--answers=maybe,never'], "'maybe'"),
])
def test_convert_cli_reranker_flag_errors_are_one_line_and_write_nothing(tmp_path, convert, spm,
                                                                         flags, expected):
  """The HF folder holds its own spiece.model, which a conversion copies: not before every
  flag has been checked."""
  from t5dual import cli
  import shutil
  _, model = tiny_hf('t5.1.1', seed=7)
  model.save_pretrained(tmp_path / 'in')
  shutil.copyfile(spm, tmp_path / 'in' / 'spiece.model')
  with pytest.raises(cli.UserError) as e:
    convert.main(['hf-to-t5dual', str(tmp_path / 'in'), str(tmp_path / 'out')] + flags)
  assert expected in _one_line(e)
  assert not (tmp_path / 'out').exists()


def test_convert_cli_names_a_missing_or_foreign_checkpoint(tmp_path, convert, spm):
  from t5dual import cli
  missing = tmp_path / 'no_such_folder'
  with pytest.raises(FileNotFoundError) as e:
    convert.main(['hf-to-t5dual', str(missing), str(tmp_path / 'out'), '--scorer=encdec',
                  f'--vocab={spm}'])
  assert _one_line(e) == f'{missing}: no such file or directory'
  (tmp_path / 'folder').mkdir()
  with pytest.raises(cli.UserError) as e:
    convert.main(['hf-to-t5dual', str(tmp_path / 'folder'), str(tmp_path / 'out'),
                  f'--vocab={spm}'])
  message = _one_line(e)
  assert 'is not a Hugging Face checkpoint' in message and 'T5X' not in message.split(';')[0]
  assert not (tmp_path / 'out').exists()
