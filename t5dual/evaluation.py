"""Retrieval metrics through ir_measures (pytrec_eval underneath), and tables of them.

Measures are named as in ir_measures ('nDCG@10', 'RR@10', 'R@100', 'P@5',
'AP', 'MRR@10' = 'RR@10', 'Recall@100' = 'R@100') or as in trec_eval
('ndcg_cut_10', 'recip_rank', 'recall_100'); results are keyed by the
ir_measures name. Relevance is graded as in the qrels (trec_eval's linear
gain, as BEIR). A query in the qrels that the run lacks scores 0, and a query
of the run without qrels is ignored.

On BEIR folders, only the queries judged in the evaluated split are encoded;
empty queries and documents are encoded (as EOS only) with a warning, and
judgements that cite documents missing from the corpus are kept, as BEIR and
trec_eval keep them (they count as relevant documents never retrieved), with
one warning that names them.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional, Sequence

from t5dual import cli
from t5dual.data import sources
from t5dual.data.sources import Qrels, Run
from t5dual.sides import Side

DEFAULT_MEASURES = ('nDCG@10', 'RR@10', 'R@100')


def parse_measures(names: Iterable[str]) -> list:
  """ir_measures measure objects for names in ir_measures or trec_eval syntax."""
  import ir_measures
  parsed = []
  for name in names:
    try:
      parsed.append(ir_measures.parse_measure(name))
      continue
    except (NameError, ValueError, SyntaxError, TypeError):
      pass
    try:
      parsed += ir_measures.parse_trec_measure(name)
    except (NameError, ValueError, SyntaxError, TypeError):
      raise cli.ConfigError(f'unknown measure {name!r}; use ir_measures names such as '
                            'nDCG@10, RR@10, R@100, P@5, AP, or trec_eval names such as '
                            'ndcg_cut_10') from None
  if not parsed:
    raise cli.ConfigError('no measures given')
  return list(dict.fromkeys(parsed))


def search_depth(measures: Iterable[str], default: int = 1000) -> int:
  """How many results per query the measures need: their largest cutoff, or `default`
  when a measure has none (AP, nDCG without @k)."""
  cutoffs = [m.params.get('cutoff') for m in parse_measures(measures)]
  return default if any(c is None for c in cutoffs) else max(cutoffs)


def load_qrels(path: str, split: Optional[str] = None) -> Qrels:
  """Qrels of a file (BEIR tsv or TREC), or of <BEIR folder>/qrels/<split>.tsv."""
  if split is not None:
    file = sources.qrels_path(path, split)
    if not os.path.exists(file):
      folder = os.path.join(path, 'qrels')
      have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith('.tsv')) \
          if os.path.isdir(folder) else []
      raise FileNotFoundError(f'{file}: qrels file not found (splits in {folder}: '
                              f'{", ".join(have) or "none"})')
  elif not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: qrels file not found')
  qrels = sources.read_qrels(path, split)
  if not qrels:
    raise sources.DataError(f'{file if split is not None else path}: no judgements')
  return qrels


def _check(run: Mapping, qrels: Mapping) -> None:
  if not qrels:
    raise sources.DataError('the qrels are empty')
  if not run:
    raise sources.DataError('the run is empty')
  if not set(run) & set(qrels):
    raise sources.DataError(f'none of the {len(run)} queries of the run has qrels (run ids '
                            f'such as {next(iter(run))!r}, qrels ids such as '
                            f'{next(iter(qrels))!r})')


def warn_missing_documents(qrels: Qrels, corpus_ids: Iterable[str], what: str = 'qrels',
                           consequence: str = 'they are kept and count as documents never '
                                              'retrieved, as in BEIR') -> None:
  """One warning for the positive judgements that cite documents not in the corpus.

  (A judgement of relevance <= 0 changes no measure, and training ignores it.)
  """
  known = set(corpus_ids)
  cited = [d for judged in qrels.values() for d, rel in judged.items()
           if rel > 0 and d not in known]
  sources.warn_missing_documents(what, [repr(d) for d in dict.fromkeys(cited)], len(cited),
                                 consequence)


def evaluate(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES
             ) -> dict[str, float]:
  """{measure name: mean over the qrels' queries}."""
  import ir_measures
  parsed = parse_measures(measures)
  _check(run, qrels)
  results = ir_measures.calc_aggregate(parsed, qrels, run)
  return {str(m): float(results[m]) for m in parsed}


def evaluate_per_query(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES
                       ) -> dict[str, dict[str, float]]:
  """{measure name: {query id: value}} for the queries ir_measures scores."""
  import ir_measures
  parsed = parse_measures(measures)
  _check(run, qrels)
  out: dict[str, dict[str, float]] = {str(m): {} for m in parsed}
  for metric in ir_measures.iter_calc(parsed, qrels, run):
    out[str(metric.measure)][metric.query_id] = float(metric.value)
  return out


def format_table(rows: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
  """A plain-text table: one row per run (name), one column per measure."""
  measures = list(dict.fromkeys(m for row in rows.values() for m in row))
  header = ['run'] + measures
  body = [[name] + [f'{row[m]:.{digits}f}' if m in row else '-' for m in measures]
          for name, row in rows.items()]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  line = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in body])


def evaluate_beir(model, params, tokenizer, corpus_ids: Sequence[str],
                  corpus_texts: Sequence[str], queries: Mapping[str, str], qrels: Qrels,
                  query_length: int, doc_length: int,
                  measures: Sequence[str] = DEFAULT_MEASURES, batch_size: int = 64,
                  exclude_identical_ids: bool = False) -> dict[str, float]:
  """Encodes corpus and queries in memory, retrieves exactly, and evaluates.

  Only the queries that have qrels are encoded (as BEIR does); each must be in
  `queries`.
  """
  from t5dual import corpus, encoding, retrieval
  missing = [q for q in qrels if q not in queries]
  if missing:
    raise sources.DataError(f'{len(missing)} qrels queries have no text, first: '
                            f'{missing[0]!r}')
  qids = [q for q in queries if q in qrels]
  corpus.validate_corpus(list(corpus_ids), list(corpus_texts), 'corpus')
  corpus.validate_corpus(qids, [queries[q] for q in qids], 'queries')
  warn_missing_documents(qrels, corpus_ids)

  def encode(side, texts, length):
    return encoding.encode_texts(encoding.make_encode_fn(model, params, side), tokenizer,
                                 texts, length, batch_size)
  docs = encode(Side.DOCUMENT, corpus_texts, doc_length)
  query_vecs = encode(Side.QUERY, [queries[q] for q in qids], query_length)
  k = search_depth(measures)
  scores, index = retrieval.exact_search(query_vecs, docs, k + int(exclude_identical_ids))
  run = retrieval.to_run(qids, list(corpus_ids), scores, index, k, exclude_identical_ids)
  return evaluate(run, qrels, measures)


def beir_queries_with_qrels(folder: str, qrels: Qrels) -> tuple[list[str], list[str]]:
  """(ids, texts) of the queries that have qrels, in queries.jsonl order."""
  queries = sources.read_beir_queries(folder)
  missing = [q for q in qrels if q not in queries]
  if missing:
    raise sources.DataError(f'{len(missing)} qrels queries are not in {folder}/queries.jsonl, '
                            f'first: {missing[0]!r}')
  qids = [q for q in queries if q in qrels]
  return qids, [queries[q] for q in qids]


def require_dual_encoder(model_dir: str, command: str) -> str:
  """`model_dir` (a chain's MODEL_DIR: its final model) if it holds a dual encoder.

  Anything else is a one-line cli.UserError saying what it holds and which
  command takes it, before anything is read or written.
  """
  from t5dual import checkpoints, model_api
  model_dir = checkpoints.resolve_model_dir(model_dir)
  model_api.require(checkpoints.read_model(model_dir), model_api.Encoder, model_dir, command)
  return model_dir


def evaluate_checkpoint_on_beir(model_dir: str, beir: str, split: str = 'test',
                                step: Optional[int] = None, out_dir: Optional[str] = None,
                                measures: Sequence[str] = DEFAULT_MEASURES,
                                k: Optional[int] = None, backend: str = 'exact',
                                exclude_identical_ids: bool = False,
                                search_kwargs: Optional[dict] = None,
                                export_options: Optional[dict] = None,
                                tag: str = 't5dual', partitioner=None) -> dict:
  """Export corpus and queries -> retrieve -> run.trec -> metrics, for a model directory.

  Exports go to `out_dir` (default MODEL_DIR/eval/<folder>-<split>-<step>), in
  sub-directories 'corpus' and 'queries', so a second call resumes an
  interrupted export and reuses finished ones. The data is read and checked
  before the model is restored. Returns a summary with 'step', 'run' (path), 'k'
  and 'metrics'; also written as metrics.json. In a multi-host job every process
  exports its shards of both sides; process 0 alone then retrieves and writes
  the run, and the others return 'metrics' None. `partitioner` lays the model
  out on this process's devices (default: replicated, the batch split over them;
  `distributed.host_partitioner` splits the model too).
  """
  import jax
  from t5dual import checkpoints, corpus, encoding, export, fileio, retrieval
  model_dir = require_dual_encoder(model_dir, 'eval.py run')
  qrels = load_qrels(beir, split)
  # The documents are read a shard at a time by the export; only their ids stay in memory.
  texts = {Side.DOCUMENT: corpus.beir_corpus(beir),
           Side.QUERY: corpus.InMemoryCorpus(*beir_queries_with_qrels(beir, qrels),
                                             os.path.join(beir, 'queries.jsonl'))}
  warn_missing_documents(qrels, texts[Side.DOCUMENT].ids, sources.qrels_path(beir, split))
  k = k or search_depth(measures)
  restored = checkpoints.restore_for_inference(model_dir, step, partitioner)
  step = restored.step
  name = os.path.basename(os.path.normpath(beir))
  out = out_dir or os.path.join(model_dir, 'eval', f'{name}-{split}-{step}')
  info = checkpoints.read_model_json(model_dir)
  embeddings = {}
  for side, source in texts.items():
    options = export.ExportOptions(max_length=restored.feature_lengths[side.feature], side=side,
                                   **(export_options or {}))
    part = os.path.join(out, side.beir_part)
    encode = encoding.make_encode_fn(restored.model, restored.params, side,
                                     partitioner=partitioner)
    export.export_corpus(encode, restored.tokenizer, source, part, options, info, step)
    embeddings[side] = export.open_embeddings(part)
  run_path = os.path.join(out, 'run.trec')
  summary = {'model_dir': model_dir, 'step': step, 'beir': beir, 'split': split, 'k': k,
             'backend': backend, 'run': run_path, 'metrics': None}
  if jax.process_index() != 0:  # multi-host: every host exported its shards; one searches
    return summary
  run = retrieval.retrieve(embeddings[Side.QUERY], embeddings[Side.DOCUMENT], k, backend,
                           exclude_identical_ids, **(search_kwargs or {}))
  retrieval.write_trec_run(run_path, run, tag)
  summary['metrics'] = evaluate(run, qrels, measures)
  fileio.write_json(os.path.join(out, 'metrics.json'), summary, indent=2)
  return summary
