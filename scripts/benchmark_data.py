#!/usr/bin/env python
"""Training data at MS MARCO's shape: a prepared store against today's in-memory sources.

  python scripts/benchmark_data.py --scale=0.01 --work_dir=/tmp/bench-data

Generates a synthetic MS MARCO-shaped collection (scripts/make_synthetic_msmarco.py)
at --scale, prepares three stores (scripts/prepare_data.py: the BEIR folder with its
depth-1000 run for reranker lists, the JSONL pairs with 30 hard negatives, the run's
top --teacher_depth with a teacher's scores for distillation), then runs,
each in its own process (peak host memory: the process's maximum resident set, from
wait4), scripts/train.py for --steps steps of
  - a tiny SDE dual encoder with 30 hard negatives: jsonl:negatives.jsonl vs store:
  - a tiny RankT5-EncDec on the depth-1000 run: beir: + FIRST_STAGE_RUN vs store:
and, without a model, the time to build each batcher and produce the batch of step
1,000,000 (what a resumed run waits for). An in-memory job is stopped once it holds
more than --memory_cap_gib (and reported so). Prints a table and writes it into
BENCHMARKS.md between the markers of its scale (other scales' tables stay). --formats also measures the choice of
format (raw memory-mapped arrays vs ArrayRecord, when array_record is installed).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from t5dual import cli  # noqa: E402

BEGIN, END = '<!-- benchmark_data: begin -->', '<!-- benchmark_data: end -->'
T5_VOCAB = os.path.join(os.path.dirname(REPO), 'shared', 'vocab', 't5_spiece.model')


def _resident_gib(pid: int) -> float:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return 0.0


def measured(cmd: list[str], env: dict = None, cap_gib: float = None) -> dict:
  """Runs `cmd`; its wall time, peak resident memory (its own, from wait4) and output.

  cap_gib: the process is killed once its resident memory passes this (polled every
  0.2 s), and the result says so ('capped': True) instead of raising: what a source
  that holds everything in memory does on this machine."""
  start = time.perf_counter()
  capped = False
  with tempfile.TemporaryFile() as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO, **(env or {})))
    while True:
      pid, status, usage = os.wait4(proc.pid, 0 if cap_gib is None or capped else os.WNOHANG)
      if pid:
        break
      if _resident_gib(proc.pid) > cap_gib:
        proc.kill()
        capped = True
      else:
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    out.seek(0)
    text = out.read().decode(errors='replace')
  code = os.waitstatus_to_exitcode(status)
  if code and not capped:
    raise RuntimeError(f'{" ".join(cmd)} failed ({code}):\n{text[-3000:]}')
  return {'seconds': seconds, 'peak_gib': usage.ru_maxrss / 2**20, 'output': text,
          'capped': capped}


def train_command(model: str, model_dir: str, source: str, vocabulary: str, steps: int,
                  extra: list[str]) -> list[str]:
  files = {'sde': ['gin/models/sde.gin', 'gin/sizes/tiny.gin', 'configs/runs/finetune.gin'],
           'rankt5': ['gin/models/rankt5_encdec.gin', 'gin/sizes/tiny.gin',
                      'configs/runs/finetune.gin', 'configs/runs/rerank.gin']}[model]
  return [sys.executable, 'scripts/train.py', *[f'--gin_file={f}' for f in files],
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.MIXTURE_OR_TASK_NAME='{source}'",
          f"--gin.VOCABULARY_PATH='{vocabulary}'", f'--gin.TRAIN_STEPS={steps}',
          "--gin.ACTIVATION_DTYPE='float32'", *extra]


# The batch of a far step, built from nothing: what a run resumed there waits for.
FAR_STEP = r'''
import json, sys, time
start = time.perf_counter()
from t5dual import vocab
from t5dual.data import lists, pipeline, store, store_batchers
kind, source, vocabulary, run = sys.argv[1:5]
imported = time.perf_counter()
tok = vocab.Tokenizer(vocabulary)
if kind == 'pairs':
  b = pipeline.make_batcher(source, tok, 32, {'inputs': 32, 'targets': 128}, 30)
elif source.startswith('store:'):
  b = store_batchers.StoreListBatcher(store.Store(source[6:], tok), tok, 32, 8, 128)
else:
  b = lists.ListBatcher(lists.load_lists(source, 'train', run, max_rank=1000), tok, 32, 8, 128)
built = time.perf_counter()
b.batch(10**6)
done = time.perf_counter()
print(json.dumps({'imports': imported - start, 'build': built - imported,
                  'batch': done - built}))
'''


def format_comparison(work_dir: str, rows: int = 1_000_000) -> list[str]:
  """Raw arrays + offsets (np.memmap) vs ArrayRecord for `rows` rows of ~80 uint16 ids:
  write time, size, random batches of 1024 x 31 rows read (ids cut to 64)."""
  rng = np.random.default_rng(0)
  lengths = np.clip(rng.lognormal(4.3, 0.4, rows).astype(np.int64), 4, 512)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = rng.integers(3, 32000, int(offsets[-1])).astype(np.uint16)
  folder = os.path.join(work_dir, 'formats')
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)
  out = []

  def read_rate(read) -> float:
    start, batches = time.perf_counter(), 0
    while time.perf_counter() - start < 3:
      read(np.sort(rng.integers(0, rows, 1024 * 31)))
      batches += 1
    return (time.perf_counter() - start) / batches

  start = time.perf_counter()
  for name, array in (('tokens', tokens), ('offsets', offsets)):
    with open(os.path.join(folder, name + '.bin'), 'wb') as f:
      f.write(array.tobytes())
      os.fsync(f.fileno())
  write = time.perf_counter() - start
  tok = np.memmap(os.path.join(folder, 'tokens.bin'), np.uint16, 'r')
  off = np.memmap(os.path.join(folder, 'offsets.bin'), np.int64, 'r')

  def read_raw(idx):
    start, end = off[idx], np.minimum(off[idx + 1], off[idx] + 63)
    cols = np.arange(63)
    keep = cols[None] < (end - start)[:, None]
    return np.where(keep, tok[np.where(keep, start[:, None] + cols[None], 0)], 0)
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
  out.append(f'| raw arrays + offsets, np.memmap | {write:.2f} s | {size / 2**20:.0f} MiB | '
             f'{read_rate(read_raw) * 1e3:.0f} ms |')
  try:
    from array_record.python import array_record_module as ar
  except ImportError:
    return out + ['| ArrayRecord | (array_record not installed) | | |']
  path = os.path.join(folder, 'tokens.array_record')
  start = time.perf_counter()
  writer = ar.ArrayRecordWriter(path, 'group_size:1')
  for i in range(rows):
    writer.write(tokens[offsets[i]:offsets[i + 1]].tobytes())
  writer.close()
  write = time.perf_counter() - start
  reader = ar.ArrayRecordReader(path, 'readahead_buffer_size:0')

  def read_ar(idx):
    batch = np.zeros((len(idx), 63), np.int32)
    for i, record in enumerate(reader.read(idx.tolist())):
      ids = np.frombuffer(record, np.uint16)[:63]
      batch[i, :len(ids)] = ids
    return batch
  out.append(f'| ArrayRecord (group_size:1), one record per row | {write:.2f} s | '
             f'{os.path.getsize(path) / 2**20:.0f} MiB | {read_rate(read_ar) * 1e3:.0f} ms |')
  shutil.rmtree(folder)
  return out


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--scale', type=float, default=0.01, help='fraction of MS MARCO')
  p.add_argument('--work_dir', default=os.path.join(tempfile.gettempdir(), 'bench-data'))
  p.add_argument('--vocabulary', default=T5_VOCAB)
  p.add_argument('--steps', type=int, default=1)
  p.add_argument('--skip_in_memory', action='store_true',
                 help="only the store (today's in-memory runs need ~500 bytes a run entry)")
  p.add_argument('--memory_cap_gib', type=float, default=20.0,
                 help='an in-memory job is stopped once its resident memory passes this, '
                 'and reported so')
  p.add_argument('--teacher_depth', type=int, default=100,
                 help="teacher-scored candidates per query in the generated collection")
  p.add_argument('--formats', action='store_true', help='also compare storage formats')
  p.add_argument('--reuse_data', action='store_true',
                 help='keep a collection already generated at --scale in work_dir/data '
                 '(its generation time is then the one recorded in synthetic.json)')
  p.add_argument('--out', default=os.path.join(REPO, 'BENCHMARKS.md'))
  args = p.parse_args(argv)
  work = args.work_dir
  data, runs = os.path.join(work, 'data'), os.path.join(work, 'runs')
  stores = {'lists': os.path.join(work, 'store-lists'), 'pairs': os.path.join(work, 'store-pairs'),
            'teacher': os.path.join(work, 'store-teacher')}
  for path in [runs, *stores.values()]:
    shutil.rmtree(path, ignore_errors=True)
  py = sys.executable
  rows = []
  load_start = os.getloadavg()[0]
  info_path = os.path.join(data, 'synthetic.json')
  reuse = False
  if args.reuse_data and os.path.exists(info_path):
    with open(info_path) as f:
      reuse = json.load(f)['scale'] == args.scale
  if reuse:
    with open(info_path) as f:
      gen = {'seconds': json.load(f)['seconds']}
  else:
    gen = measured([py, 'scripts/make_synthetic_msmarco.py', f'--out_dir={data}',
                    f'--scale={args.scale}', f'--teacher_depth={args.teacher_depth}'])
  with open(info_path) as f:
    info = json.load(f)
  print(f'generated in {gen["seconds"]:.0f} s: {json.dumps(info)}', flush=True)
  run = os.path.join(data, 'run.trec')
  negatives = os.path.join(data, 'negatives.jsonl')
  prep = {
      'lists': measured([py, 'scripts/prepare_data.py', f'--source=beir:{data}',
                         f'--vocabulary={args.vocabulary}', f'--out_dir={stores["lists"]}',
                         f'--run={run}', '--max_rank=1000', '--max_length=127']),
      'pairs': measured([py, 'scripts/prepare_data.py', f'--source=jsonl:{negatives}',
                         f'--vocabulary={args.vocabulary}', f'--out_dir={stores["pairs"]}',
                         '--max_length=127']),
      # Distillation lists: the run's candidates the teacher scored (its depth).
      'teacher': measured([py, 'scripts/prepare_data.py', f'--source=beir:{data}',
                           f'--vocabulary={args.vocabulary}', f'--out_dir={stores["teacher"]}',
                           f'--run={run}', f'--teacher={os.path.join(data, "teacher.trec")}',
                           f'--max_rank={info["teacher_depth"]}', '--max_length=127'])}
  from t5dual.data import store
  for key, what in (('lists', 'BEIR + depth-1000 run -> store (lists)'),
                    ('pairs', 'JSONL, 30 negatives -> store (pairs)'),
                    ('teacher', f'BEIR + run + teacher scores of its top {info["teacher_depth"]} '
                     '-> store (distillation lists)')):
    size = store.size_bytes(stores[key]) / 2**20
    rows.append(f'| prepare: {what} | {prep[key]["seconds"]:.0f} s | '
                f'{prep[key]["peak_gib"]:.2f} GiB | store {size:.0f} MiB |')
    print(rows[-1], flush=True)
  sde = ['--gin.NUM_NEGATIVES=30', '--gin.BATCH_SIZE=8',
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 128}"]
  rankt5 = ['--gin.MAX_RANK=1000', '--gin.BATCH_SIZE=8', '--gin.LIST_SIZE=8',
            '--gin.INPUT_LENGTH=128']
  jobs = [('SDE, 30 hard negatives', 'sde', f'store:{stores["pairs"]}', sde, 'pairs'),
          ('RankT5-EncDec, depth-1000 run', 'rankt5', f'store:{stores["lists"]}', rankt5,
           'lists')]
  if not args.skip_in_memory:
    jobs += [('SDE, 30 hard negatives', 'sde', f'jsonl:{negatives}', sde, 'pairs'),
             ('RankT5-EncDec, depth-1000 run', 'rankt5', f'beir:{data}',
              rankt5 + [f"--gin.FIRST_STAGE_RUN='{run}'"], 'lists')]
  for name, model, source, extra, kind in jobs:
    in_store = source.startswith('store:')
    label = 'store' if in_store else source.split(':')[0] + ' (in memory)'
    model_dir = os.path.join(runs, f'{model}-{label.split()[0]}')
    cap = None if in_store else args.memory_cap_gib
    train = measured(train_command(model, model_dir, source, args.vocabulary, args.steps, extra),
                     cap_gib=cap)
    if train['capped']:
      rows.append(f'| {name}: {label} | stopped after {train["seconds"]:.0f} s, before step '
                  f'{args.steps} | > {cap:g} GiB (the cap) | killed when its resident memory '
                  'passed the cap |')
      print(rows[-1], flush=True)
      continue
    far_source = source if kind == 'pairs' or in_store else data
    far = measured([py, '-c', FAR_STEP, kind, far_source, args.vocabulary, run], cap_gib=cap)
    times = json.loads(far['output'].strip().splitlines()[-1])
    rows.append(f'| {name}: {label} | {train["seconds"]:.0f} s to step {args.steps} | '
                f'{train["peak_gib"]:.2f} GiB | step 10^6 from nothing: {far["seconds"]:.1f} s '
                f'(imports {times["imports"]:.1f} s, batcher {times["build"]:.2f} s, batch '
                f'{times["batch"] * 1e3:.0f} ms), {far["peak_gib"]:.2f} GiB |')
    print(rows[-1], flush=True)
  table = [f'Synthetic MS MARCO at scale {args.scale} ({info["passages"]} passages, '
           f'{info["queries"]} training queries, depth-{info["depth"]} run = '
           f'{info["queries"] * info["depth"]} entries, {info["negatives"]} hard negatives; '
           f'generated in {gen["seconds"]:.0f} s), tiny models, T5 vocabulary, '
           f'`python scripts/benchmark_data.py {" ".join(argv)}`, '
           f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; each row its own '
           f'process, peak = its maximum resident set; load average {load_start:.1f} at the '
           f'start, {os.getloadavg()[0]:.1f} at the end (other jobs share the cores: times '
           'are upper bounds):', '',
           '| what | time | peak host memory | notes |', '|---|---|---|---|', *rows]
  if args.formats:
    table += ['', 'Format (1M rows of ~80 uint16 ids; batch = 1024 x 31 random rows cut to 64):',
              '', '| format | write | size | random batch read |', '|---|---|---|---|',
              *format_comparison(work)]
  print('\n'.join(table))
  write_section(args.out, table, args.scale)


SECTION = '## Training data: prepared store vs in memory'


def write_section(path: str, table: list[str], scale: float) -> None:
  """Replaces the table of `scale` in `path`'s data section (added the first time; tables
  of other scales stay, largest scale first)."""
  with open(path) as f:
    text = f.read()
  begin, end = BEGIN.replace(':', f' scale={scale:g}:'), END.replace(':', f' scale={scale:g}:')
  body = '\n'.join([begin, *table, end])
  if begin in text and end in text:
    text = text[:text.index(begin)] + body + text[text.index(end) + len(end):]
  elif SECTION in text:  # a new scale: after the section's heading and introduction
    tables = [m.start() for m in re.finditer(r'<!-- benchmark_data scale=([0-9.e-]+): begin -->',
                                             text) if float(m.group(1)) < scale]
    at = tables[0] if tables else text.index('\n## ', text.index(SECTION) + 1) \
        if '\n## ' in text[text.index(SECTION) + 1:] else len(text)
    text = text[:at].rstrip('\n') + '\n\n' + body + '\n\n' + text[at:].lstrip('\n')
  else:
    text = text.rstrip('\n') + '\n\n' + SECTION + '\n\n' + body + '\n'
  with open(path, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  cli.run_main(main)
