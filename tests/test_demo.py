"""The built-in demo (scripts/demo.py) on a smaller collection with fewer steps: every
stage is printed, its figures are those of the run files it leaves, and the reranked
runs keep the first stage's candidates. A user error is one line."""

import importlib.util
import pathlib
import re

import pytest

from t5dual import cli, evaluation, retrieval
from trec_files import assert_in_score_order  # tests/helpers
import cli_output  # tests/helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = ('BM25', 'SDE dual encoder, untrained', 'SDE dual encoder',
          'BM25 -> RankT5-Enc top-20', 'SDE dual encoder -> RankT5-Enc top-20')


@pytest.fixture
def demo_script(monkeypatch):
  spec = importlib.util.spec_from_file_location('demo_script', REPO / 'scripts' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.chdir(REPO)  # the demo's gin files are relative to the repository
  monkeypatch.setattr(module, 'COLLECTION',
                      dict(num_docs=300, num_concepts=30, lexical_overlap=0.5))
  return module


def _table(out):
  """{stage: [nDCG@10, MRR@10, R@100]} of the demo's printed table."""
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split() == ['stage', 'nDCG@10',
                                                                        'MRR@10', 'R@100'])
  rows = {}
  for line in lines[start + 1:]:
    found = re.fullmatch(r'(.+?)\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d\.\d{4})', line)
    if not found:
      break
    rows[found.group(1)] = [float(v) for v in found.groups()[1:]]
  return rows


@pytest.mark.slow
def test_demo_prints_every_stage_from_its_run_files(demo_script, tmp_path, capsys):
  work = tmp_path / 'demo'
  demo_script.main(['--workdir', str(work), '--gin.TRAIN_STEPS=150', '--gin.BATCH_SIZE=32',
                    '--rerank_gin.TRAIN_STEPS=10', '--rerank_gin.BATCH_SIZE=8'])
  out = capsys.readouterr().out
  rows = _table(out)
  assert tuple(rows) == STAGES
  # Each progress line gives its own stage's time, and they add up to the total.
  stage_times = [int(t) for t in re.findall(r'^\[demo\] .*\((\d+) s\)$', out, re.M)]
  total = int(re.search(r'^\[demo\] done in (\d+) s;', out, re.M).group(1))
  assert len(stage_times) == 5 and abs(sum(stage_times) - total) <= len(stage_times), out
  qrels = evaluation.load_qrels(str(work / 'data'), 'test')
  runs = {'BM25': work / 'runs' / 'bm25-test.trec',
          'SDE dual encoder': work / 'dual_encoder' / 'eval' / 'data-test-150' / 'run.trec'}
  for name, path in runs.items():
    first = retrieval.read_trec_run(str(path))
    reranked = retrieval.read_trec_run(str(work / 'runs' /
                                           f'{name.split()[0].lower()}-test-reranked.trec'))
    # Every run file the demo writes is in score order with ranks 1..k.
    written = assert_in_score_order(str(work / 'runs' /
                                        f'{name.split()[0].lower()}-test-reranked.trec'))
    assert {q: list(d) for q, d in reranked.items()} == written
    for stage, run in ((name, first), (f'{name} -> RankT5-Enc top-20', reranked)):
      metrics = evaluation.evaluate(run, qrels, demo_script.MEASURES)
      assert rows[stage] == pytest.approx([metrics[m] for m in demo_script.MEASURES],
                                          abs=5e-5), stage
    for qid, docs in first.items():
      if qid not in qrels:
        continue
      order = [d for d, _ in sorted(docs.items(), key=lambda kv: -kv[1])]
      new = [d for d, _ in sorted(reranked[qid].items(), key=lambda kv: -kv[1])]
      # The reranker reorders the top 20 only; ranks 21.. stay the first stage's.
      assert sorted(new[:20]) == sorted(order[:20]) and new[20:] == order[20:], qid
  # Each model directory holds the configuration the trainer wrote.
  for model in ('dual_encoder', 'reranker'):
    assert (work / model / 'config.gin').is_file()


@pytest.mark.parametrize('flag, expected', [
    ('--rerank_gin.NO_SUCH_MACRO=1', 'NO_SUCH_MACRO'),
    ('--gin.TRAIN_STEPS=100', 'is not empty and holds no earlier demo')])
def test_demo_user_error_is_one_line_and_loses_nothing(demo_script, tmp_path, capsys, flag,
                                                       expected):
  work = tmp_path / 'demo'
  work.mkdir()
  (work / 'notes.txt').write_text('mine')
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(demo_script.main, ['--workdir', str(work), flag])
  assert exit_info.value.code == 2
  err = cli_output.error_lines(capsys.readouterr().err)
  assert len(err) == 1 and err[0].startswith('error:') and expected in err[0], err
  assert sorted(p.name for p in work.iterdir()) == ['notes.txt']
