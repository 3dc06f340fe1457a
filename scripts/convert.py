#!/usr/bin/env python
"""Convert checkpoints between T5X, Hugging Face, sentence-transformers and t5dual.

  # a T5X checkpoint (t5x_retrieval dual encoder or T5 encoder-decoder) -> t5dual model dir
  python scripts/convert.py t5x-to-t5dual gs://bucket/model/checkpoint_1000 /tmp/gtr \
      --vocab /path/spiece.model --architecture sde
  python scripts/convert.py hf-to-t5dual /path/t5-v1_1-base /tmp/ade --architecture ade
  python scripts/convert.py st-to-t5dual /path/gtr-t5-base /tmp/gtr
  python scripts/convert.py t5dual-to-st /tmp/gtr /tmp/gtr_st        # ADE: one folder per tower
  python scripts/convert.py t5dual-to-hf /tmp/gtr /tmp/gtr_hf
  python scripts/convert.py t5dual-to-t5x /tmp/gtr /tmp/t5x/checkpoint_0
  # an encoder-decoder -> T5ForConditionalGeneration folder
  python scripts/convert.py t5x-to-hf /path/t5x/checkpoint_1000000 /tmp/t5_hf
  # rerankers (RankT5-EncDec by default; --scorer yes_no for monoT5, enc for RankT5-Enc)
  python scripts/convert.py hf-to-t5dual /path/t5-v1_1-base /tmp/rankt5 --scorer encdec
  python scripts/convert.py t5x-to-t5dual /path/t5x/checkpoint_1000000 /tmp/monot5 \
      --vocab /path/spiece.model --scorer yes_no
  python scripts/convert.py t5dual-to-hf /tmp/rankt5 /tmp/rankt5_hf  # T5ForConditionalGeneration

A t5dual model directory is converted out according to what it holds (model.json's
kind): a dual encoder's towers as T5EncoderModel folders, an 'encdec' or 'yes_no'
reranker as one T5ForConditionalGeneration folder whose first-step logit of the
scoring token (or log-softmax over the two answer tokens) is the reranker's score.

Conversions into t5dual print every parameter mapped, every checkpoint entry
skipped (optimizer state, a decoder, ...) and every parameter initialised because
the checkpoint lacks it. With --like MODEL_DIR the target model is taken from an
existing t5dual model.json, and any shape mismatch is an error naming the parameter.

Writing sentence-transformers or Hugging Face folders needs setup.py's `torch`
extra (PyTorch, transformers, sentence-transformers); without it those commands
stop with one line saying what to install.
"""

import argparse
import dataclasses
import importlib
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from t5dual import checkpoints, cli, interop, layer_layout, model_api, dual_encoders  # noqa: E402
from t5dual import rerankers  # noqa: E402
from t5dual.data import pipeline  # noqa: E402
from t5dual.interop import hf, mapping, t5x, trees  # noqa: E402
from t5dual.interop import rerankers as reranker_interop  # noqa: E402
from t5dual.interop import sentence_transformers as st  # noqa: E402
from t5dual.sides import Side  # noqa: E402

# Modules outside the core install, all in setup.py's 'torch' extra.
OPTIONAL_MODULES = ('torch', 'transformers', 'sentence_transformers')


# --------------------------------------------------------------------------- optional packages

def _install_hint() -> str:
  """How to install the 'torch' extra of this checkout into the environment that runs it
  (the run.sh way, or pip of this very interpreter: never a bare `pip`, which may belong
  to another Python than .venv's)."""
  here = os.path.abspath(os.getcwd()) == REPO
  repo = '.' if here else REPO
  python = sys.executable
  if here and os.path.abspath(python).startswith(REPO + os.sep):
    python = os.path.relpath(python)
  run_sh = 'scripts/run.sh' if here else os.path.join(REPO, 'scripts', 'run.sh')
  return (f'T5DUAL_EXTRAS=torch bash {run_sh} convert ... installs it (or: '
          f"{python} -m pip install -e '{repo}[torch]')")


def _needs(args) -> tuple[str, tuple[str, ...]]:
  """(what to name in the error, modules to import) of the command in `args`."""
  if args.command == 't5dual-to-st':
    return 'PyTorch and sentence-transformers', OPTIONAL_MODULES
  if args.command == 't5dual-to-hf' or (args.command == 't5x-to-hf' and args.vocab):
    return 'transformers (for the tokenizer files)', ('transformers',)
  return '', ()


def require_optional_packages(args) -> None:
  """Stops, before anything is read or written, when the command's packages are missing."""
  what, modules = _needs(args)
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError as e:
      reason = (str(e).splitlines() or [''])[0]  # one line, however the import failed
      raise cli.UserError(f'{args.command} needs {what}: {_install_hint()} '
                          f'(import {module}: {reason})') from e


# --------------------------------------------------------------------------- t5dual model dirs

def save_model_dir(model_dir: str, model, params, vocab_path: str,
                   feature_lengths: dict, step: int = 0) -> None:
  """A t5dual model directory (model.json + orbax 'params') that restore_for_inference reads.

  `model` is any model_api.Model; model.json records its kind.
  """
  if os.path.exists(os.path.join(model_dir, 'checkpoints')):
    raise FileExistsError(f'{model_dir} already holds checkpoints; choose a new directory')
  checkpoints.write_model_json(
      model_dir, checkpoints.model_description(model, vocab_path, feature_lengths))
  manager = checkpoints.checkpoint_manager(model_dir)
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
  manager.wait_until_finished()
  manager.close()


def _vocab(args, found=None) -> str:
  """The SentencePiece model: --vocab, or the checkpoint's own (copied into the new model
  directory by `_finish_import`, once everything else has worked)."""
  vocab = args.vocab or found
  if not vocab:
    raise cli.UserError('no SentencePiece model found in the checkpoint; pass --vocab')
  if not os.path.isfile(vocab) and '://' not in vocab:
    raise FileNotFoundError(f'{vocab}: SentencePiece model not found')
  return vocab


def _keep_vocab(args, vocab: str) -> str:
  """A vocabulary found in the checkpoint goes into the model directory (self-contained)."""
  if args.vocab:
    return vocab
  os.makedirs(args.output, exist_ok=True)
  return shutil.copyfile(vocab, os.path.join(args.output, 'spiece.model'))


def _target(args) -> dict:
  """Keyword arguments of the *load_dual_encoder functions from the command line."""
  if args.like:
    desc = checkpoints.read_model_json(args.like)
    return {'config': checkpoints.model_from_description(desc).config}
  overrides = {'architecture': args.architecture}
  if args.dtype:
    overrides['dtype'] = args.dtype
  if getattr(args, 'max_distance', None):
    overrides['relative_attention_max_distance'] = args.max_distance
  return overrides


def _print_report(report) -> None:
  for line in report.lines():
    print(line)


def _finish_import(args, params, model, report, vocab) -> None:
  _print_report(report)
  if isinstance(model, model_api.Scorer):  # one input per (query, document) pair
    lengths = {'inputs': model.input_length}
  else:  # one per side
    lengths = {'inputs': args.query_length, 'targets': args.doc_length}
  if os.path.exists(os.path.join(args.output, 'checkpoints')):  # before the vocabulary copy
    raise FileExistsError(f'{args.output} already holds checkpoints; choose a new directory')
  vocab = _keep_vocab(args, vocab)
  save_model_dir(args.output, model, params, vocab, lengths)
  print(f'wrote t5dual {model.name} model to {args.output} (vocabulary {vocab})')
  if isinstance(model, model_api.Scorer):
    print(f'input template: {model.template!r}')


def _reranker_target(args, vocab: str) -> dict:
  """Keyword arguments of interop.rerankers.load_reranker from the command line."""
  if args.like:
    desc = checkpoints.read_model_json(args.like)
    model = checkpoints.model_from_description(desc)
    if not isinstance(model, model_api.Scorer):
      raise cli.UserError(f'--like {args.like} holds a {model.name} model; with --scorer '
                          'it must name a reranker directory')
    return {'config': model.config}
  overrides = {'scorer': args.scorer, 'input_length': args.input_length}
  if args.template:
    overrides['template'] = args.template
  if args.dtype:
    overrides['dtype'] = args.dtype
  if getattr(args, 'max_distance', None):
    overrides['relative_attention_max_distance'] = args.max_distance
  if args.scoring_token is not None:
    overrides['scoring_token_id'] = args.scoring_token
  if args.scorer == 'yes_no':
    # The answer words are looked up in the model's own vocabulary: ids differ between
    # vocabularies, words do not.
    overrides['yes_token_id'], overrides['no_token_id'] = rerankers.yes_no_token_ids(
        vocab, *_answers(args))
  return overrides


DEFAULT_ANSWERS = 'true,false'  # monoT5's


def _answers(args) -> tuple[str, str]:
  """The two answer words of --answers (monoT5's true,false by default)."""
  words = (args.answers or DEFAULT_ANSWERS).split(',')
  if len(words) != 2 or not all(w.strip() for w in words) or words[0] == words[1]:
    raise cli.UserError(f'--answers must be two different words YES,NO (e.g. '
                        f'{DEFAULT_ANSWERS}), got {args.answers!r}')
  return words[0].strip(), words[1].strip()


def check_flags(args) -> None:
  """Flags that cannot work, before anything is read or written."""
  checkpoint = getattr(args, 'checkpoint', None)
  if checkpoint is not None and '://' not in checkpoint and not os.path.exists(checkpoint):
    raise FileNotFoundError(f'{checkpoint}: no such file or directory')
  if checkpoint is not None and os.path.exists(os.path.join(args.output, 'checkpoints')):
    raise FileExistsError(f'{args.output} already holds checkpoints; choose a new directory')
  if args.command == 'hf-to-t5dual' and not hf.is_hf_checkpoint(checkpoint):
    raise cli.UserError(f'{checkpoint} is not a Hugging Face checkpoint (no {hf.HF_WEIGHTS}, '
                        f'{hf.HF_INDEX} or pytorch_model.bin; a .safetensors or .bin file '
                        'works too); a T5X checkpoint converts with t5x-to-t5dual')
  scorer = getattr(args, 'scorer', None)
  if getattr(args, 'answers', None) is not None and scorer != 'yes_no':
    raise cli.UserError('--answers is for --scorer=yes_no')
  if getattr(args, 'scoring_token', None) is not None and scorer != 'encdec':
    raise cli.UserError('--scoring-token is for --scorer=encdec')
  if scorer == 'yes_no':
    _answers(args)
  if scorer and args.like:
    given = [f for f in ('answers', 'scoring_token', 'template') if getattr(args, f) is not None]
    if given:
      raise cli.UserError(f'--like takes the whole reranker configuration from {args.like}; '
                          f'drop --{given[0].replace("_", "-")}')


def _import(args, load_dual_encoder, found_vocab=None):
  """A checkpoint into a t5dual dual encoder, or a reranker when --scorer is given."""
  vocab = _vocab(args, found_vocab)
  target = _reranker_target(args, vocab) if args.scorer else _target(args)
  scanned = target.get('config') is not None and target['config'].t5.scan_layers
  if scanned:  # --like a scanned model: checkpoints name layers layers_{i}
    cfg = target['config']
    target['config'] = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5,
                                                                      scan_layers=False))
  load = reranker_interop.load_reranker if args.scorer else load_dual_encoder
  params, config, report = load(args.checkpoint, **target)
  if scanned:
    params, config = layer_layout.unrolled_to_scan(params), cfg
  model = rerankers.RerankerModel(config) if args.scorer else dual_encoders.DualEncoderModel(config)
  _finish_import(args, params, model, report, vocab)


# --------------------------------------------------------------------------- commands

def t5x_to_t5dual(args):
  _import(args, t5x.load_dual_encoder)


def hf_to_t5dual(args):
  _import(args, hf.load_dual_encoder, st.find_vocab(
      args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)))


def st_to_t5dual(args):
  if args.scorer:
    raise cli.UserError('a sentence-transformers folder holds a dual encoder; convert it with '
                        'st-to-t5dual (no --scorer), or a T5 checkpoint with hf-to-t5dual --scorer')
  params, config, report = st.load_dual_encoder(args.checkpoint, **_target(args))
  folder = st.read_folder(args.checkpoint)
  if folder.max_seq_length and args.doc_length == pipeline.DEFAULT_FEATURE_LENGTHS['targets']:
    args.doc_length = folder.max_seq_length
  _finish_import(args, params, dual_encoders.DualEncoderModel(config), report,
                 _vocab(args, st.find_vocab(args.checkpoint)))


def _restore(args, capability=None, needs=None):
  """(model, params, step, vocab path, feature lengths) of a model dir; a model without
  `capability` (a model_api protocol, when given) is refused first, in one line saying
  what the command `needs`."""
  if capability is not None:
    model_api.require(checkpoints.read_model(args.model_dir), capability, args.model_dir,
                      args.command, needs)
  restored = checkpoints.restore_for_inference(args.model_dir, args.step)
  params = jax.tree.map(np.asarray, restored.params)
  # Every format out names layers layers_{i}: a model trained with scanned layers
  # is written unrolled (exactly: slices of the stacked arrays).
  params = layer_layout.scan_to_unrolled(params)
  model = layer_layout.unscanned_model(restored.model)
  print(f'read {model.name} model {args.model_dir} at step {restored.step}')
  return model, params, restored.step, restored.tokenizer.path, restored.feature_lengths


def _print_written(folder: str) -> None:
  from safetensors.numpy import load_file
  for root, _, files in sorted(os.walk(folder)):
    for name in sorted(files):
      if name.endswith('.safetensors'):
        path = os.path.join(root, name)
        for key, value in sorted(load_file(path).items()):
          print(f'  {os.path.relpath(path, folder)}: {key} {list(value.shape)}')


def _max_lengths(lengths: dict) -> dict:
  """{side: tokens} of a model's feature lengths, for the exported tokenizers."""
  return {side: lengths.get(side.feature) for side in Side}


def t5dual_to_st(args):
  model, params, _, vocab, lengths = _restore(
      args, model_api.Encoder, 'writes the towers of a dual encoder (one per side)')
  for folder in st.save_sentence_transformers(args.output, params, model.config, vocab,
                                              _max_lengths(lengths)):
    print(f'wrote sentence-transformers folder {folder}:')
    _print_written(folder)


def t5dual_to_hf(args):
  model, params, _, vocab, lengths = _restore(args)
  # Each family writes its own layout (a dual encoder's towers as T5EncoderModel folders, a
  # reranker as one T5ForConditionalGeneration): interop/dual_encoders.py, rerankers.py.
  for folder, line in interop.family(model).write_hf(args.output, params, model, vocab,
                                                     _max_lengths(lengths)):
    print(line)
    _print_written(folder)


def t5dual_to_t5x(args):
  _, params, step, _, _ = _restore(args)
  t5x.write_checkpoint(args.output, params, step)
  for path, leaf in trees.flatten(params).items():
    print(f'  target/{path} {list(leaf.shape)}')
  print(f'wrote T5X checkpoint (format version {t5x.VERSION}) {args.output}')


def t5x_to_hf(args):
  ckpt = t5x.open_checkpoint(args.checkpoint)
  tree = trees.to_numpy(ckpt.target)
  overrides = {'relative_attention_max_distance': args.max_distance} if args.max_distance else {}
  skipped = list(trees.flatten(ckpt.state))
  if 'decoder' in tree:
    hf.save_encoder_decoder(args.output, tree, args.vocab, **overrides)
    kind = 'T5ForConditionalGeneration'
  elif 'encoder' in tree:
    config = mapping.infer_t5_config(tree, **overrides)
    known = {'token_embedder', 'encoder', 'projection_layer'}
    skipped += [k for k in tree if k not in known]
    hf.save_encoder(args.output, {k: v for k, v in tree.items() if k in known}, config,
                    args.vocab)
    kind = 'T5EncoderModel'
  else:
    raise cli.UserError(f'{args.checkpoint} has no encoder/ at the top level (found '
                        f'{sorted(tree)}); convert two-tower models with t5x-to-t5dual, then '
                        't5dual-to-hf')
  print(f'wrote Hugging Face {kind} folder {args.output}:')
  _print_written(args.output)
  print(f'skipped {len(skipped)} checkpoint entries:')
  for s in skipped:
    print(f'  {s}')


# --------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True)

  def importer(name, fn, what):
    q = sub.add_parser(name, help=f'{what} -> t5dual model directory')
    q.add_argument('checkpoint', help=what)
    q.add_argument('output', help='new t5dual model directory')
    q.add_argument('--architecture', default='sde', choices=dual_encoders.ARCHITECTURES,
                   help='t5dual architecture; a single-tower checkpoint fills both ADE towers')
    q.add_argument('--like', help='take the model config from this t5dual model dir instead')
    q.add_argument('--vocab', help='SentencePiece model for model.json')
    q.add_argument('--dtype', help="T5 activation dtype (default: T5Config's, bfloat16)")
    q.add_argument('--query-length', type=int,
                   default=pipeline.DEFAULT_FEATURE_LENGTHS['inputs'])
    q.add_argument('--doc-length', type=int,
                   default=pipeline.DEFAULT_FEATURE_LENGTHS['targets'])
    r = q.add_argument_group('rerankers', 'with --scorer, the checkpoint becomes a reranker '
                             '(an encoder-decoder for encdec / yes_no)')
    r.add_argument('--scorer', choices=rerankers.SCORERS,
                   help='make a reranker: encdec (RankT5-EncDec), yes_no (monoT5), '
                        'enc (RankT5-Enc: encoder + a new score head)')
    r.add_argument('--scoring-token', type=int, default=None,
                   help=f'encdec: the scored logit (default {rerankers.EXTRA_ID_10}, '
                        '<extra_id_10>)')
    r.add_argument('--answers', default=None,
                   help=f'yes_no: the answer words YES,NO, single pieces of the vocabulary '
                        f'(default {DEFAULT_ANSWERS}, monoT5\'s)')
    r.add_argument('--input-length', type=int, default=rerankers.DEFAULT_INPUT_LENGTH,
                   help='reranker input tokens, EOS included')
    r.add_argument('--template', help='input template (default: the format of the scorer\'s '
                   'checkpoints: ' + '; '.join(f'{k} {v!r}' for k, v in
                                               rerankers.DEFAULT_TEMPLATES.items()) + ')')
    q.set_defaults(fn=fn)
    return q

  importer('t5x-to-t5dual', t5x_to_t5dual, 'T5X checkpoint (msgpack or orbax, local or gs://)'
           ).add_argument('--max-distance', type=int,
                          help='relative_attention_max_distance (not stored by T5X; 128)')
  importer('hf-to-t5dual', hf_to_t5dual, 'Hugging Face T5 folder or .safetensors file')
  importer('st-to-t5dual', st_to_t5dual, 'sentence-transformers GTR / sentence-T5 folder')

  for name, fn, what in (('t5dual-to-st', t5dual_to_st, 'sentence-transformers folder(s)'),
                         ('t5dual-to-hf', t5dual_to_hf, 'Hugging Face T5EncoderModel folder(s), '
                          'or T5ForConditionalGeneration for a reranker'),
                         ('t5dual-to-t5x', t5dual_to_t5x, 'T5X checkpoint directory')):
    q = sub.add_parser(name, help=f't5dual model directory -> {what}')
    q.add_argument('model_dir')
    q.add_argument('output')
    q.add_argument('--step', type=int, help='checkpoint step (default: latest)')
    q.set_defaults(fn=fn)

  q = sub.add_parser('t5x-to-hf', help='T5X checkpoint -> Hugging Face folder '
                     '(T5ForConditionalGeneration for an encoder-decoder)')
  q.add_argument('checkpoint')
  q.add_argument('output')
  q.add_argument('--vocab', help='SentencePiece model to add as the tokenizer')
  q.add_argument('--max-distance', type=int, help='relative_attention_max_distance (128)')
  q.set_defaults(fn=t5x_to_hf)
  return p


def main(argv=None) -> int:
  """Runs one conversion; what the user can fix is raised as a one-line `cli.UserError`."""
  args = parser().parse_args(argv)
  require_optional_packages(args)
  check_flags(args)
  try:
    args.fn(args)
  except (ValueError, KeyError) as e:  # unreadable or mismatched checkpoints, named in `e`
    raise cli.UserError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
  except ImportError as e:  # e.g. torch for a pytorch_model.bin
    if (e.name or '').split('.')[0] not in OPTIONAL_MODULES:
      raise
    raise cli.UserError(f'{e}: {_install_hint()}') from e
  return 0


if __name__ == '__main__':
  cli.run_main(main)
