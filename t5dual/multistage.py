"""Multi-stage fine-tuning: a chain of training runs, each starting where the last one ended.

A chain is a list of `Stage`s, each the setup of a configured `train_lib.run`
(train_lib.TrainSetup) with its own model and loss, task, learning rate, steps
and batch size
(configs/runs/two_stage_rerank.gin builds them from gin scopes, one scope per
stage). `run_chain` trains them in order under one chain directory:

  MODEL_DIR/
    stages/<i>-<name>/   stage i: an ordinary model directory (model.json,
                         checkpoints/, metrics.jsonl, config.gin, eval/, and
                         teacher.trec for a stage taught by the previous one)
    stages.json          the record of the chain (below)
    final -> stages/<n>-<name>   made when the last stage is complete: use
                         MODEL_DIR/final as --model_dir of scripts/rerank.py
                         and scripts/eval.py (given MODEL_DIR, they use
                         MODEL_DIR/final: `resolve_model_dir`)
    writer.lock          held while the chain runs (one chain per directory)

Stage 1 starts from its configured INITIAL_CHECKPOINT_PATH (or a random
initialisation); stage i > 1 starts from the final checkpoint of stage i-1
(interop.load_initial_params: the parameters as they are for the same kind and
configuration, mapping.graft otherwise). After training, a stage's optional
evaluation runs (e.g. `rerank_evaluation`: rerank a BEIR split's first-stage
run and measure nDCG@10 before and after), before the next stage starts.

stages.json, rewritten atomically as the chain advances:

  {"final_model_dir": "stages/2-distill" (null until the last stage is complete),
   "stages": [{"index": 1, "name": "contrastive", "dir": "stages/1-contrastive",
               "starts_from": null, "teacher": null, "status": "complete",
               "step": 2000, "train_metrics": {...last line of metrics.jsonl...},
               "evaluation": {...} or null}, ...]}

  status 'trained': training ended at `step`; 'complete': evaluated too.
  starts_from: the previous stage's directory (null: the configured initial
  checkpoint). Paths are relative to MODEL_DIR.

Running the same command again resumes the chain: a stage recorded as
complete whose directory's latest checkpoint is its recorded step is skipped
(its recorded evaluation is reused); a trained but unevaluated stage is only
evaluated; an interrupted stage resumes from its latest checkpoint with the
same data (trainer.py), then the chain goes on. A completed stage is never
retrained, even if its settings change: a chain's stages are fixed once
trained (changing them needs a new MODEL_DIR).

Distillation from the previous stage (`Stage.previous_stage_teacher`): when
the stage starts, the previous stage's reranker scores the training candidates
the stage will consume: for each training query its `train_steps` batches of
`batch_size` lists visit (all of them once the steps reach an epoch), the
judged positives and the first-stage run's documents in ranks [MIN_RANK,
MAX_RANK] (`training_candidates`). The count is logged before scoring starts,
the rate and the time left as it goes. Finished chunks of scores are kept in
the stage directory's teacher.trec.partial/ (checksummed, each written
atomically), so a run killed while scoring resumes at the first missing chunk;
the scores are then written once, atomically, to teacher.trec (reused on
resume) and become the teacher of the stage's task (dataclasses.replace of its
data/tasks.ListTask; the model is the stage's, untouched). An explicit TEACHER
file (a TREC run or JSONL of scores) works in any stage without this.

Multi-host runs (scripts/train.py --multihost): every process runs the chain;
process 0 alone evaluates, writes stages.json and makes MODEL_DIR/final.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Optional, Sequence

import jax

from t5dual import checkpoints, cli, fileio
from t5dual.cli import ParameterError

log = logging.getLogger(__name__)

RECORD = checkpoints.CHAIN_RECORD
STAGES_DIR = 'stages'
FINAL = checkpoints.CHAIN_FINAL
TEACHER_FILE = 'teacher.trec'
# Teacher scores are kept in chunks of this many pairs while they are computed.
TEACHER_CHUNK_PAIRS = 4096
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a chain.

  Attributes:
    name: names the stage and its directory stages/<i>-<name> (letters, digits,
      '_', '.', '-'); in gin, the stage's scope (`@gin_utils.scope_name()`).
    setup: returns the stage's checked train_lib.TrainSetup; called with
      model_dir, run_config, initial_checkpoint_path (after stage 1) and, for a
      stage taught by the previous one, teacher_to_come=True. In gin,
      `train_lib.configured_setup` in the stage's scope (`@gin_utils.in_scope()`):
      train_lib.run's configuration there; nothing is read or written.
    evaluate: called with the stage's model directory once it is trained;
      returns a JSON-able summary whose 'metrics' maps a row name to
      {measure: value} (e.g. `rerank_evaluation`). None: no evaluation.
    previous_stage_teacher: distil from the previous stage (see the module
      docstring); the stage's loss must take teacher scores.
  """

  name: str
  setup: Callable[..., Any]
  evaluate: Optional[Callable[[str], dict]] = None
  previous_stage_teacher: bool = False

  def __post_init__(self):
    if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
      raise ParameterError(Stage, 'name', f'must be letters, digits, "_", "." or "-", got '
                           f'{self.name!r} (in gin, each stage is named after its scope: '
                           '@<name>/multistage.Stage())')
    if not callable(self.setup):
      raise ParameterError(Stage, 'setup', f'must be callable, got {self.setup!r}')
    if self.evaluate is not None and not callable(self.evaluate):
      raise ParameterError(Stage, 'evaluate', f'must be callable or None, got '
                           f'{self.evaluate!r}')


def stage_dir(model_dir: str, index: int, stage: Stage) -> str:
  """Where stage `index` (1-based) of a chain in `model_dir` trains."""
  return os.path.join(model_dir, STAGES_DIR, f'{index}-{stage.name}')


def run_chain(model_dir: str, stages: Sequence[Stage],
              run_config: Optional[Callable[[], str]] = None) -> dict:
  """Trains and evaluates `stages` in order in `model_dir`, resuming where a previous run stopped.

  Every stage still to train has its settings checked before anything is
  trained, and before MODEL_DIR is created or locked. Returns the record of the
  chain (stages.json, see the module docstring).

  Raises:
    cli.UserError (ConfigError, ...): a stage's setting, data or directory is
      unusable, or the configured stages differ from those already recorded.
  """
  stages = list(stages)
  _check_stages(stages)
  if os.path.exists(os.path.join(model_dir, checkpoints.MODEL_JSON)):
    raise cli.ConfigError(f'{model_dir} holds a model ({checkpoints.MODEL_JSON}); a chain '
                          'needs a MODEL_DIR of its own')
  # Every stage still to train is checked before MODEL_DIR is created or locked (and so
  # before any stage trains, rather than after hours of stage 1); again under the lock
  # only if another run advanced the chain meanwhile.
  _, checked = _check_untrained_stages(model_dir, stages)
  with checkpoints.exclusive_writer(model_dir):
    # exclusive_writer makes (and probes) MODEL_DIR/checkpoints, which a chain has
    # none of: an empty one would make MODEL_DIR look like a model directory.
    with contextlib.suppress(OSError):
      os.rmdir(os.path.join(model_dir, checkpoints.CHECKPOINTS))
    record, done = _check_untrained_stages(model_dir, stages, checked)
    entries = record['stages']
    previous = None
    for i, stage in enumerate(stages, 1):
      directory = stage_dir(model_dir, i, stage)
      where = f'stage {i}/{len(stages)} {stage.name!r}'
      if done[i - 1]:
        entry = entries[i - 1]
        log.info('%s is trained (step %d in %s): not training it again', where, entry['step'],
                 directory)
      else:
        entry = _train_stage(model_dir, i, stage, previous, run_config, where)
        entries[i - 1:] = [entry]
        _write_record(model_dir, record)
      if entry['status'] != 'complete':
        entry['evaluation'] = _evaluate(stage, directory, where)
        entry['status'] = 'complete'
        _write_record(model_dir, record)
      elif entry.get('evaluation') is not None:
        log.info('%s: evaluation recorded in %s', where, os.path.join(model_dir, RECORD))
      _log_evaluation(where, entry.get('evaluation'))
      previous = directory
    record['final_model_dir'] = entries[len(stages) - 1]['dir']
    _write_record(model_dir, record)
    final = _link_final(model_dir, record['final_model_dir'])
  log.info('chain of %d stages complete; final model: %s (%s)', len(stages), final,
           os.path.join(model_dir, record['final_model_dir']))
  summary = summary_table(record)
  if summary:
    log.info('evaluation of each stage:\n%s', summary)
  return record


def _check_untrained_stages(model_dir: str, stages: Sequence[Stage],
                            checked: Optional[list] = None) -> tuple[dict, list]:
  """(the record, which stages are trained), after checking the settings of the others
  (unless `checked`, the stages trained when they were last checked, is the same)."""
  record = checkpoints.read_chain_record(model_dir)
  _check_record(model_dir, record, stages)
  entries = record['stages']
  done = [_is_trained(model_dir, e) for e in entries] + [False] * (len(stages) - len(entries))
  _check_nothing_after_untrained(model_dir, stages, done)
  if done == checked:
    return record, done
  for i, stage in enumerate(stages, 1):
    if not done[i - 1]:
      _stage_setup(model_dir, i, stage)
  return record, done


def _stage_setup(model_dir: str, index: int, stage: Stage, **kwargs):
  """The checked setup of stage `index` (nothing read or written)."""
  if stage.previous_stage_teacher:  # its task gets the teacher once the stage starts
    kwargs['teacher_to_come'] = True
  setup = stage.setup(model_dir=stage_dir(model_dir, index, stage), **kwargs)
  if stage.previous_stage_teacher:
    _check_teacher_stage(setup, index, stage)
  return setup


def summary_table(record: dict) -> str:
  """The stages' evaluations as one table, a row per stage and evaluated run ('' if none)."""
  from t5dual import evaluation
  rows = {}
  for entry in record['stages']:
    for row, metrics in ((entry.get('evaluation') or {}).get('metrics') or {}).items():
      rows[f'{entry["index"]}-{entry["name"]}: {row}'] = metrics
  return evaluation.format_table(rows) if rows else ''


# --------------------------------------------------------------------------- checks

def _check_stages(stages: Sequence[Stage]) -> None:
  if not stages:
    raise ParameterError(run_chain, 'stages', 'a chain needs at least one stage')
  for stage in stages:
    if not isinstance(stage, Stage):
      raise ParameterError(run_chain, 'stages', f'must be multistage.Stage objects, got '
                           f'{type(stage).__name__}')
  names = [s.name for s in stages]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ParameterError(run_chain, 'stages', f'stage names must differ; repeated: '
                         f'{", ".join(repeated)}')
  if stages[0].previous_stage_teacher:
    raise cli.ConfigError(f'stage 1 {stages[0].name!r} sets previous_stage_teacher, but has '
                          'no previous stage to learn from (give it a TEACHER file instead)')


def _check_record(model_dir: str, record: dict, stages: Sequence[Stage]) -> None:
  """The configured stages must begin with the recorded ones, in the same order."""
  path = os.path.join(model_dir, RECORD)
  entries = record['stages']
  if len(entries) > len(stages):
    raise cli.ConfigError(f'{path} records {len(entries)} stages but the configuration has '
                          f'{len(stages)}; a chain\'s stages cannot change once trained: use '
                          'a new MODEL_DIR')
  for i, (entry, stage) in enumerate(zip(entries, stages), 1):
    if entry.get('name') != stage.name or entry.get('index') != i:
      raise cli.ConfigError(f'{path} records stage {i} as {entry.get("name")!r} but the '
                            f'configuration names it {stage.name!r}; a chain\'s stages '
                            'cannot change once trained: use a new MODEL_DIR')


def _check_nothing_after_untrained(model_dir: str, stages: Sequence[Stage],
                                   done: Sequence[bool]) -> None:
  """A stage that trained from an earlier stage must not outlive a retraining of it."""
  if False not in done:
    return
  todo = done.index(False) + 1  # the first stage to train, 1-based
  for i in range(todo + 1, len(stages) + 1):
    directory = stage_dir(model_dir, i, stages[i - 1])
    if _latest_step(directory) is not None:
      raise cli.ConfigError(
          f'{directory} has checkpoints but stage {todo} before it is not trained (its '
          f'directory {stage_dir(model_dir, todo, stages[todo - 1])} lost its final '
          'checkpoint?); move the later stage directories away to retrain them')


def _check_teacher_stage(setup, index: int, stage: Stage) -> None:
  where = f'stage {index} {stage.name!r} learns from the previous stage'
  if not hasattr(setup.task, 'teacher'):
    raise cli.ConfigError(f'{where}, but its task {type(setup.task).__name__} has no teacher '
                          'scores (only rerankers distil)')
  if setup.task.teacher is not None:
    raise cli.ConfigError(f'{where} and also has the TEACHER {setup.task.teacher!r}; choose '
                          'one')
  if not getattr(setup.model, 'distils', False):
    loss = setup.model.describe().get('loss')
    raise cli.ConfigError(f'{where}, but its loss {loss} does not use teacher scores (e.g. '
                          'kl_distillation_loss, teacher_rank_pairwise_loss, margin_mse_loss)')


# --------------------------------------------------------------------------- one stage

def _train_stage(model_dir, index, stage, previous, run_config, where) -> dict:
  from t5dual import train_lib
  directory = stage_dir(model_dir, index, stage)
  kwargs = {'run_config': run_config}
  if previous is not None:
    kwargs['initial_checkpoint_path'] = previous
  setup = _stage_setup(model_dir, index, stage, **kwargs)
  teacher = None
  log.info('%s: training in %s, starting from %s', where, directory,
           previous or 'its configured initial checkpoint (if any)')
  if stage.previous_stage_teacher:
    teacher = os.path.join(directory, TEACHER_FILE)
    # Under the stage directory's lock: the scores are written into it.
    with checkpoints.exclusive_writer(directory):
      task = with_previous_stage_teacher(
          setup.task, setup.source, previous, teacher, batch_size=setup.batch_size,
          train_steps=setup.trainer_config.total_steps, seed=setup.trainer_config.seed)
    setup = setup._replace(task=task, teacher_to_come=False)
  result = train_lib.train(setup)
  step = _latest_step(directory)
  if step is None or step != result.get('step'):
    raise RuntimeError(f'{where}: training returned at step {result.get("step")} but the '
                       f'latest checkpoint in {directory} is {step}')
  return {'index': index, 'name': stage.name, 'dir': _relative(model_dir, directory),
          'starts_from': previous and _relative(model_dir, previous),
          'teacher': teacher and _relative(model_dir, teacher), 'status': 'trained',
          'step': step, 'train_metrics': _last_metrics(directory), 'evaluation': None}


def _evaluate(stage: Stage, directory: str, where: str) -> Optional[dict]:
  # By every process of a multi-host run: the evaluations split their work over the
  # processes and gather it (rerank_runs.rerank, export), so one process alone would wait
  # for the others forever; process 0 writes the runs and the record.
  if stage.evaluate is None:
    return None
  log.info('%s: evaluating %s', where, directory)
  return stage.evaluate(directory)


def _log_evaluation(where: str, summary: Optional[dict]) -> None:
  if not summary:
    return
  from t5dual import evaluation
  shown = {k: v for k, v in summary.items() if k != 'metrics'}
  log.info('%s evaluation (%s):\n%s', where, ', '.join(f'{k} {v}' for k, v in shown.items()),
           evaluation.format_table(summary.get('metrics') or {}))


def with_previous_stage_teacher(task, source: str, previous_dir: str, teacher_path: str,
                                batch_size: Optional[int] = None,
                                train_steps: Optional[int] = None, seed: int = 0):
  """`task` (a data/tasks.ListTask) with the previous stage's scores of its training
  candidates as its teacher.

  Scores the candidates the stage will consume (`training_candidates` with
  `batch_size`, `train_steps` and `seed`; all of them when those are None) with
  the reranker in `previous_dir` into `teacher_path`, written atomically. An
  existing file is reused, so a resumed stage trains against the same teacher;
  an interrupted scoring resumes from its finished chunks
  (`rerank_runs.score_pairs`, in `teacher_path`.partial/).
  """
  if os.path.exists(teacher_path):
    log.info('teacher scores of %s: reusing %s', previous_dir, teacher_path)
  else:
    from t5dual import rerank_runs, retrieval
    from t5dual.data import sources, tasks
    if source.startswith('store:'):  # the candidates are scored from their texts
      raise sources.DataError(
          f'{source}: a stage taught by the previous one scores its training candidates '
          "from their texts; give it the BEIR folder and run ('beir:<folder>[:<split>]' "
          'with FIRST_STAGE_RUN), not a prepared store')
    folder, split = tasks.beir_source(source)
    candidates, visited, total = training_candidates(folder, split, task, batch_size,
                                                     train_steps, seed)
    teacher, params, step, tokenizer, length = rerank_runs.load_reranker(
        previous_dir, command='teacher scoring for the next stage')
    pairs = [(q, d) for q, docs in candidates.items() for d in docs]
    if visited < total:
      which = (f'the {visited} of {total} {split} queries that {train_steps} steps of '
               f'{batch_size} lists visit')
    else:
      which = f'all {cli.plural(total, split + " query", split + " queries")}'
    log.info('teacher scores: the reranker in %s (step %d) scores %s of %s (judged positives '
             'and the first stage\'s ranks [%d, %d])', previous_dir, step,
             cli.plural(len(pairs), 'candidate'), which, task.min_rank, task.max_rank)
    doc_ids, doc_texts = sources.read_beir_corpus(folder)
    work_dir = teacher_path + '.partial'
    scores = rerank_runs.score_pairs(
        rerank_runs.make_score_fn(teacher, params), tokenizer, sources.read_beir_queries(folder),
        dict(zip(doc_ids, doc_texts)), pairs, length, teacher.template,
        progress=False, chunk_pairs=TEACHER_CHUNK_PAIRS, work_dir=work_dir,
        fingerprint={'teacher': os.path.basename(os.path.normpath(previous_dir)),
                     'step': step, 'template': teacher.template,
                     'input_length': length},
        label='teacher scores')
    run = {}
    for (q, d), score in zip(pairs, scores.tolist()):
      run.setdefault(q, {})[d] = score
    # Every process of a multi-host run holds all scores and writes the same file.
    retrieval.write_trec_run(teacher_path, run, tag='t5dual-teacher')
    if jax.process_index() == 0:
      shutil.rmtree(work_dir, ignore_errors=True)
    log.info('teacher scores written to %s', teacher_path)
  return dataclasses.replace(task, teacher=teacher_path)


def training_candidates(folder: str, split: str, task, batch_size: Optional[int] = None,
                        train_steps: Optional[int] = None, seed: int = 0
                        ) -> tuple[dict[str, list[str]], int, int]:
  """What a reranker's training lists can hold, for the queries a stage will visit.

  `task` is the stage's data/tasks.ListTask (first_stage_run None: BM25 of the
  split, as its make_batcher computes it). The training lists are
  built as the stage builds them without a teacher (data/lists.py): per query,
  its judged positives and the first-stage run's documents in ranks
  [min_rank, max_rank] that are not judged relevant. With `batch_size` and
  `train_steps`, only the queries that batches 0 .. train_steps - 1 visit in
  the lists' order for `seed` are kept (all of them once the steps cover an
  epoch); the stage, taught by scores of exactly these queries, then trains on
  them with the same candidates.

  Returns ({query id: [document ids: positives, then negatives in rank order]},
  queries kept, training lists in all).
  """
  import numpy as np
  from t5dual.data import lists as lists_lib
  plain = lists_lib.load_lists(folder, split, task.first_stage(folder, split),
                               min_rank=task.min_rank, max_rank=task.max_rank)
  rows = range(len(plain))
  if batch_size and train_steps and batch_size * train_steps < len(plain):
    batcher = lists_lib.ListBatcher(plain, None, batch_size, list_size=task.list_size,
                                    num_positives=task.num_positives, seed=seed)
    visited = np.concatenate([batcher.list_indices(step) for step in range(train_steps)])
    rows = sorted(set(visited.tolist()))
  out = {}
  for i in rows:
    docs = [r for r, _ in plain.positives[i]] + list(plain.negatives[i])
    out[plain.query_ids[i]] = [plain.doc_ids[r] for r in dict.fromkeys(docs)]
  return out, len(rows), len(plain)


# --------------------------------------------------------------------------- evaluations

def rerank_evaluation(model_dir: str, beir: str, split: str = 'test',
                      run: Optional[str] = None, top_k: int = 100,
                      measures: Sequence[str] = ('nDCG@10', 'RR@10', 'R@100'),
                      batch_size: int = 64, tail: str = 'append') -> dict:
  """A stage's evaluation as a reranker: rerank `run`'s top_k of a BEIR split, measure both runs.

  Args:
    model_dir: the stage's (reranker) directory.
    beir, split: the BEIR folder and the split whose qrels judge the runs.
    run: the first-stage TREC run; None: BM25 of the split as deep as the
      deepest measure (at least top_k; 1000 for a measure without cutoff), written
      once to model_dir/eval/bm25-<folder>-<split>-top<depth>.trec, so that
      R@100 is recall at 100 whatever top_k is.
    tail: as in `rerank_runs.rerank_beir`: 'append' puts the first stage's
      documents below the reranked top_k (measures deeper than top_k compare
      the same documents), 'drop' leaves the deeper measures out.
  Returns:
    {'beir', 'split', 'top_k', 'tail', 'first_stage_depth', 'step', 'first_stage'
    (run path), 'run' (reranked run path), 'metrics': {'first stage': {...},
    'reranked': {...}}}.
  """
  from t5dual import evaluation, rerank_runs
  name = os.path.basename(os.path.normpath(beir))
  eval_dir = os.path.join(model_dir, 'eval')
  if run is None:
    depth = max(top_k, evaluation.search_depth(measures))
    run = os.path.join(eval_dir, f'bm25-{name}-{split}-top{depth}.trec')
    if not os.path.exists(run):
      from t5dual import bm25, retrieval
      os.makedirs(eval_dir, exist_ok=True)
      # Every process writes the same run (write_trec_run's temporaries are per process).
      retrieval.write_trec_run(run, bm25.beir_run(beir, split, k=depth), tag='bm25')
  out = os.path.join(eval_dir, f'rerank-{name}-{split}-top{top_k}.trec')
  result = rerank_runs.rerank_beir(model_dir, beir, split, run, out, top_k=top_k,
                                 measures=measures, batch_size=batch_size, progress=False,
                                 tail=tail)
  return {'beir': beir, 'split': split, 'top_k': top_k, 'tail': tail,
          'first_stage_depth': result['first_stage_depth'], 'step': result['step'],
          'first_stage': run, 'run': out, 'metrics': result['metrics']}


def retrieval_evaluation(model_dir: str, beir: str, split: str = 'test',
                         measures: Optional[Sequence[str]] = None) -> dict:
  """A stage's evaluation as a dual encoder: retrieval on a BEIR split
  (evaluation.evaluate_checkpoint_on_beir; exports under model_dir/eval/)."""
  from t5dual import evaluation
  summary = evaluation.evaluate_checkpoint_on_beir(
      model_dir, beir, split, measures=measures or evaluation.DEFAULT_MEASURES)
  return {'beir': beir, 'split': split, 'step': summary['step'], 'run': summary['run'],
          'metrics': {'retrieval': summary['metrics']}}


# --------------------------------------------------------------------------- the record

def _write_record(model_dir: str, record: dict) -> None:
  if jax.process_index() != 0:
    return
  fileio.write_json(os.path.join(model_dir, RECORD), record, indent=2)


def _is_trained(model_dir: str, entry: dict) -> bool:
  """The stage ended its training at its recorded step, and that checkpoint is still there."""
  return (entry.get('status') in ('trained', 'complete') and
          _latest_step(os.path.join(model_dir, entry['dir'])) == entry.get('step'))


def _latest_step(directory: str) -> Optional[int]:
  if not os.path.isdir(os.path.join(directory, checkpoints.CHECKPOINTS)):
    return None
  manager = checkpoints.checkpoint_manager(directory)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def _last_metrics(directory: str) -> Optional[dict]:
  path = os.path.join(directory, 'metrics.jsonl')
  last = None
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          last = json.loads(line)
  return last


def _relative(model_dir: str, path: str) -> str:
  return os.path.relpath(path, model_dir)


def _link_final(model_dir: str, target: str) -> str:
  """MODEL_DIR/final -> target (relative), replaced atomically; returns its path."""
  link = os.path.join(model_dir, FINAL)
  if jax.process_index() != 0:
    return link
  if os.path.exists(link) and not os.path.islink(link):
    log.warning('%s exists and is not a link: not pointing it at the final stage', link)
    return os.path.join(model_dir, target)
  fileio.atomic_symlink(target, link)
  return link
