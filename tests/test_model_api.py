"""The model contract's capabilities (model_api.Encoder / Scorer / T5Model), the one-line
errors of a command given a model without the capability it needs, the axis rules a
model declares, `with_t5`, and no branch on a model's kind outside the model families."""

import dataclasses
import functools
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from t5dual import checkpoints, cli, dual_encoders, evaluation, model_api, partitioning, ranking_losses
from t5dual import rerank_runs, rerankers, t5
import cli_output  # tests/helpers
from script_modules import load_script  # tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = t5.t5_config('tiny', vocab_size=300, dtype='float32')
LENGTHS = {'inputs': 8, 'targets': 16}


def _dual_encoder(architecture='sde'):
  return dual_encoders.DualEncoderModel(
      dual_encoders.DualEncoderConfig(t5=TINY, architecture=architecture, projection_dim=6),
      dual_encoders.LossConfig(name='pair'))


def _reranker(scorer):
  return rerankers.RerankerModel(
      rerankers.RerankerConfig(t5=TINY, scorer=scorer, scoring_token_id=7, yes_token_id=3,
                               no_token_id=4, input_length=12),
      functools.partial(ranking_losses.poly1_softmax_loss, epsilon=2.0))


# --------------------------------------------------------------------------- capabilities

@pytest.mark.parametrize('architecture', dual_encoders.ARCHITECTURES)
def test_a_dual_encoder_encodes_and_does_not_score(architecture):
  model = _dual_encoder(architecture)
  assert isinstance(model, model_api.Encoder) and not isinstance(model, model_api.Scorer)
  assert isinstance(model, model_api.ContrastiveModel) and isinstance(model, model_api.T5Model)
  assert model.embedding_dim == 6
  params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  for side in ('query', 'document'):
    out = jax.eval_shape(lambda p: model.encode(p, jnp.ones((3, 5), jnp.int32), side), params)
    assert (out.shape, out.dtype) == ((3, model.embedding_dim), jnp.float32)


@pytest.mark.parametrize('scorer', rerankers.SCORERS)
def test_a_reranker_scores_and_does_not_encode(scorer):
  model = _reranker(scorer)
  assert isinstance(model, model_api.Scorer) and not isinstance(model, model_api.Encoder)
  assert not isinstance(model, model_api.ContrastiveModel)
  assert isinstance(model, model_api.T5Model)
  assert model.template == rerankers.DEFAULT_TEMPLATES[scorer]
  assert model.input_length == 12
  params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  out = jax.eval_shape(lambda p: model.score(p, jnp.ones((2, 3, 5), jnp.int32)), params)
  assert (out.shape, out.dtype) == ((2, 3), jnp.float32)


def test_require_names_the_directory_what_it_holds_and_the_command_that_takes_it():
  encoder, scorer = _dual_encoder(), _reranker('encdec')
  assert model_api.require(encoder, model_api.Encoder, '/m', 'eval.py run') is encoder
  assert model_api.require(scorer, model_api.Scorer, '/m', 'rerank.py') is scorer
  with pytest.raises(model_api.MissingCapabilityError) as e:
    model_api.require(scorer, model_api.Encoder, '/r', 'eval.py run')
  assert str(e.value) == ('/r holds a reranker model; eval.py run encodes queries and documents '
                          'with a dual encoder; rerank a first-stage run with it: '
                          'scripts/rerank.py --model_dir=/r')
  with pytest.raises(model_api.MissingCapabilityError) as e:
    model_api.require(encoder, model_api.Scorer, '/d', 'rerank.py', 'needs a reranker')
  assert str(e.value) == ('/d holds a dual encoder model; rerank.py needs a reranker; evaluate '
                          'it on BEIR: scripts/eval.py run --model_dir=/d')
  assert isinstance(e.value, cli.UserError)


# --------------------------------------------------------------------------- one-line errors

def _model_dir(path, model, lengths):
  """A model directory with model.json only: the capability checks read nothing else."""
  checkpoints.write_model_json(str(path), checkpoints.model_description(
      model, str(path / 'spm.model'), lengths))
  return str(path)


def test_each_command_refuses_a_model_without_its_capability_before_restoring(tmp_path):
  encoder_dir = _model_dir(tmp_path / 'de', _dual_encoder(), LENGTHS)
  scorer_dir = _model_dir(tmp_path / 'rr', _reranker('enc'), {'inputs': 12})
  with pytest.raises(model_api.MissingCapabilityError,
                     match=f'^{re.escape(encoder_dir)} holds a dual encoder model; rerank.py '
                           r'scores \(query, document\) pairs with a reranker; evaluate it on '
                           f'BEIR: scripts/eval.py run --model_dir={re.escape(encoder_dir)}$'):
    rerank_runs.load_reranker(encoder_dir)
  with pytest.raises(model_api.MissingCapabilityError,
                     match=f'^{re.escape(scorer_dir)} holds a reranker model; export.py encodes'):
    evaluation.require_dual_encoder(scorer_dir, 'export.py')
  assert evaluation.require_dual_encoder(encoder_dir, 'export.py') == encoder_dir
  assert rerank_runs.require_reranker(scorer_dir, 'rerank.py') == scorer_dir
  convert = load_script('convert')
  with pytest.raises(cli.UserError, match=f'^{re.escape(scorer_dir)} holds a reranker model; '
                     't5dual-to-st writes the towers of a dual encoder'):
    convert.main(['t5dual-to-st', scorer_dir, str(tmp_path / 'st')])
  assert not (tmp_path / 'st').exists()


@pytest.mark.multiprocess
def test_rerank_script_on_a_dual_encoder_is_one_line(demo_collection, tmp_path):
  """scripts/rerank.py reads its data first (a bad run is reported before a missing model),
  then refuses a dual encoder in one line without restoring it."""
  from t5dual.data import sources
  encoder_dir = _model_dir(tmp_path / 'de', _dual_encoder(), LENGTHS)
  qid = next(iter(sources.read_qrels(demo_collection, 'test')))
  run = tmp_path / 'first.trec'
  run.write_text(f'{qid} Q0 {sources.read_beir_corpus(demo_collection)[0][0]} 1 1.0 t\n')
  proc = subprocess.run(
      [sys.executable, 'scripts/rerank.py', f'--model_dir={encoder_dir}',
       f'--beir={demo_collection}', f'--run={run}', f'--out={tmp_path / "out.trec"}',
       '--no_progress'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO)))
  # (The one-query run leaves the other judged queries out: a warning, not an error.)
  lines = [line for line in cli_output.error_lines(proc.stderr) if 'WARNING' not in line]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0] == (f'error: {encoder_dir} holds a dual encoder model; rerank.py scores '
                      '(query, document) pairs with a reranker; evaluate it on BEIR: '
                      f'scripts/eval.py run --model_dir={encoder_dir}')
  assert not (tmp_path / 'out.trec').exists()


# --------------------------------------------------------------------------- axis rules

def test_models_declare_the_rules_of_their_own_axes():
  standard = {name for name, _ in partitioning.standard_logical_axis_rules()}
  assert not standard & {'projection', 'score'}  # no model's head in the standard rules
  encoder, scorer = _dual_encoder(), _reranker('enc')
  assert partitioning.Partitioner().for_model(encoder).rules[-1] == ('projection', None)
  assert partitioning.Partitioner().for_model(scorer).rules[-1] == ('score', None)
  # Replicated, as an axis without a rule is: the layout is what it was before the rules
  # moved into the models.
  bare = partitioning.Partitioner().param_shardings(scorer.logical_axes())
  ruled = partitioning.Partitioner().for_model(scorer).param_shardings(scorer.logical_axes())
  assert ruled == bare
  assert tuple(ruled['score_dense']['kernel'].spec) == (None, None)


def test_a_model_rule_places_its_axis_and_cannot_move_a_standard_one():
  class Sharded:
    logical_axis_rules = (('score', 'model'), ('embed', 'data'))
  partitioner = partitioning.Partitioner().for_model(Sharded())
  assert partitioner.mesh_axes(P('embed', 'score')) == P(None, 'model')
  assert partitioner.rules.count(('embed', 'data')) == 0  # the standard ('embed', None) rules
  # Given rules (gin's logical_axis_rules) are kept, the model's own appended.
  given = partitioning.Partitioner(logical_axis_rules=[('embed', 'model')]).for_model(Sharded())
  assert given.rules == (('embed', 'model'), ('score', 'model'))
  assert partitioning.Partitioner().for_model(object()).rules == partitioning.LOGICAL_AXIS_RULES
  assert given.for_model(Sharded()) == given  # idempotent: one copy of the model's rules


# --------------------------------------------------------------------------- with_t5

def _t5_changes(before, after) -> dict:
  a, b = dataclasses.asdict(before.t5_config), dataclasses.asdict(after.t5_config)
  return {k: b[k] for k in a if a[k] != b[k]}


@pytest.mark.parametrize('make', [lambda: _dual_encoder('ade_spl'), lambda: _reranker('yes_no')])
def test_with_t5_keeps_the_model_and_changes_only_the_fields_asked(make):
  model = make()
  again = model.with_t5(remat='full', dtype='bfloat16', attention='xla')
  assert type(again) is type(model) and again.kind == model.kind
  assert _t5_changes(model, again) == {'remat': 'full', 'dtype': 'bfloat16'}  # xla: as before
  desc, new = model.describe(), again.describe()
  assert {k: v for k, v in new.items() if k != 'config'} == {
      k: v for k, v in desc.items() if k != 'config'}  # loss (and lists) kept
  assert {k: v for k, v in new['config'].items() if k != 't5'} == {
      k: v for k, v in desc['config'].items() if k != 't5'}  # heads, template kept
  assert again.loss is model.loss  # a configured loss too (model.json holds its name only)
  assert model.t5_config.remat != 'full'  # the original is untouched
  with pytest.raises(TypeError):
    model.with_t5(no_such_field=1)


# --------------------------------------------------------------------------- no kind branches

# A branch on a model's kind: a comparison with .kind or with a model kind's name, model.json's
# kind read outside checkpoints.py, an isinstance check of a family's config or model class, or
# a probe for a T5 config. Data-source kinds ('beir', 'jsonl') and device kinds ('cpu') are no
# model kinds and do not match.
_KINDS = '|'.join(re.escape(k) for k in model_api.kinds())
BRANCH = re.compile(
    r"\.kind\s*[!=]=|[!=]=\s*[\w.]+\.kind\b"
    rf"|\bkind\s*[!=]=\s*['\"]({_KINDS})['\"]|['\"]({_KINDS})['\"]\s*[!=]=\s*\w*kind"
    r"|\bkind\s+(not\s+)?in\s*\("
    r"|(get\(|\[)\s*['\"]kind['\"]"
    r"|isinstance\([^)]*\b(RerankerConfig|DualEncoderConfig|RerankerModel|DualEncoderModel)\b"
    r"|(hasattr|getattr)\([^)]*['\"]t5['\"]")
OWNERS = {'t5dual/dual_encoders.py', 't5dual/rerankers.py', 't5dual/model_api.py',
          't5dual/checkpoints.py'}


def test_the_branch_pattern_finds_kind_branches_and_nothing_else():
  for line in ["if model.kind == 'reranker':", "kind != dual_encoders.DualEncoderModel.kind",
               "if kind == 'dual_encoder':", "desc.get('kind', 'dual_encoder')",
               "isinstance(config, rerankers.RerankerConfig)", "hasattr(cfg, 't5')",
               "getattr(getattr(cfg, 't5', None), 'scan_layers', False)",
               "if kind not in ('dual_encoder',):"]:
    assert BRANCH.search(line), line
  for line in ["if kind == 'beir':", "if kind != 'cpu':", "device_kind = d.device_kind",
               "'kind': model.kind,", "isinstance(model, model_api.Encoder)"]:
    assert not BRANCH.search(line), line


def test_no_branch_on_a_model_kind_outside_the_model_families():
  found = []
  for path in sorted(list(REPO.glob('t5dual/**/*.py')) + list(REPO.glob('scripts/*.py'))):
    name = path.relative_to(REPO).as_posix()
    if name in OWNERS:
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if BRANCH.search(line.split('#')[0]):
        found.append(f'{name}:{number}: {line.strip()}')
  assert not found, '\n'.join(found)
