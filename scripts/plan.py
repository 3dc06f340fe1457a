#!/usr/bin/env python
"""Compile the real train (and encode) step ahead of time for a target this host does not own.

  python scripts/plan.py --gin_file=gin/models/sde.gin --gin_file=gin/sizes/xxl.gin \
      --gin_file=configs/runs/finetune.gin --gin_file=configs/topologies/v4-128.gin \
      --topology=v4:4x4x4 [--batch=512] [--encode] [--search] [--write=BENCHMARKS.md]

The gin files are those of the training run (MODEL_DIR, data and vocabulary are
not needed and not read). TPU topologies (v4:4x4x4, v5e:16x16, ...) need libtpu:
pip install -e '.[tpu]'; 'cpu:N' compiles for N simulated CPU devices (this
script sets XLA_FLAGS for it). Prints, per device, the closed-form bytes of
parameters, optimizer state, gradients, batch and activations beside XLA's
compiled memory analysis and cost-model FLOPs, and whether the step fits the
target's HBM; with --search, a step that does not fit is retried with 'full'
remat, then on meshes with 2x, 4x, ... the model-parallel size (the same devices;
parameters that would not split are skipped), then with more microbatches (GradCache for dual encoders, accumulation
for rerankers: the same gradient, fewer activations alive), then with halved
batches, until one fits (planning.search). The batch is the run's task's
(data/tasks.py: hard negatives, teacher scores). The gradient strategy of the run
(trainer.TrainerConfig.grad_strategy / num_microbatches in gin) is the first
one tried.
"""

import argparse
import datetime
import os
import resource
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _flags(argv):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      epilog='gin flags, as for scripts/train.py: --gin_file=FILE (repeated) for the gin files '
      'of the training run: a model (gin/models/*.gin), a size (gin/sizes/*.gin) and the run '
      'file (configs/runs/*.gin, e.g. finetune.gin or rerank.gin); --gin.NAME=VALUE overrides '
      'one binding (e.g. --gin.BATCH_SIZE=256).')
  p.add_argument('--topology', required=True, help="e.g. v4:4x4x4, v5e:16x16, cpu:8")
  p.add_argument('--batch', type=int, help='global batch (default: the gin BATCH_SIZE)')
  p.add_argument('--encode', action='store_true', help='also compile the encode step')
  p.add_argument('--encode_batch', type=int, default=1024)
  p.add_argument('--search', action='store_true',
                 help='if it does not fit: full remat, wider model-parallel meshes, more '
                 'microbatches, then halved batches')
  p.add_argument('--max_meshes', type=int, default=2,
                 help='--search: how many wider model-parallel meshes to try (x2, x4, ...)')
  p.add_argument('--hbm_gib', type=float, help="override the target's HBM per device")
  p.add_argument('--write', help='append the report to this markdown file')
  return p.parse_known_args(argv)


def _with_large_thread_stacks(argv) -> None:
  """Re-executes this script with the stack limit raised to the hard limit.

  glibc sizes the default thread stack from RLIMIT_STACK at process start, and the
  TPU compiler's threads recurse deeply on XXL models: with the usual 8 MiB the
  compile of the T5.1.1-XXL step dies of a stack overflow (SIGSEGV in
  MakeConvWindows), with an unlimited stack it compiles.
  """
  soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
  if soft == hard or os.environ.get('T5DUAL_PLAN_REEXEC'):
    return
  resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
  os.environ['T5DUAL_PLAN_REEXEC'] = '1'
  os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv))


def main(argv):
  args, rest = _flags(argv)
  if not args.topology.startswith('cpu:'):
    _with_large_thread_stacks(argv)
  # libtpu takes a lock file that any other JAX process on the host (a training run,
  # the tests) may hold; a plan only compiles, so it may share libtpu.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if args.topology.startswith('cpu:'):  # before JAX starts
    count = 1
    for s in args.topology[4:].split('x'):
      count *= int(s) if s.isdigit() else 1
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={count}')
  from t5dual import cli, gin_utils, model_api, partitioning, planning, train_lib

  files, bindings, _ = gin_utils.parse_flags(rest)
  if not files:
    raise cli.ConfigError('no --gin_file given; see the usage in scripts/plan.py')
  # A plan reads no data: placeholders for what only a real run needs.
  defaults = ["MODEL_DIR = '/nonexistent/plan'", "MIXTURE_OR_TASK_NAME = 'plan'",
              "VOCABULARY_PATH = 'plan.model'"]
  gin_utils.parse_gin(files, defaults + list(bindings))
  if 'model_dir' not in gin_utils.bound_parameters(train_lib.run):
    raise cli.ConfigError(
        'no run file among the --gin_file flags (nothing configures train_lib.run): add the '
        "training run's, e.g. --gin_file=configs/runs/finetune.gin for a dual encoder or "
        '--gin_file=configs/runs/rerank.gin for a reranker')
  devices, acc = planning.target_devices(args.topology)
  hbm = int(args.hbm_gib * planning.GiB) if args.hbm_gib else acc.hbm_bytes
  overrides = {'batch_size': args.batch} if args.batch else {}
  t_start = time.time()
  rows = []

  def plan(c):
    try:
      p = planning.plan_train_step(c.model, setup.task, setup.optimizer, c.partitioner,
                                   c.batch_size, setup.feature_lengths,
                                   grad_strategy=c.grad_strategy,
                                   num_microbatches=c.num_microbatches)
    except Exception as e:  # a compile that fails is a finding, not a crash
      p = planning.StepPlan('train', c.batch_size, error=(str(e).splitlines() or ['?'])[0][:200],
                            grad_strategy=c.grad_strategy, num_microbatches=c.num_microbatches)
    remat = _remat(c.model)
    rows.append((p, remat, c.partitioner.mesh_shape))
    print(_line(p, remat, c.partitioner, hbm), flush=True)
    return p

  with partitioning.target_devices(devices):
    # The run's own setup, checked as for training; nothing is read or written.
    setup = train_lib.configured_setup(**overrides)
    model = setup.model
    config = setup.trainer_config
    start = planning.Candidate(model, setup.partitioner, setup.batch_size,
                               config.grad_strategy, config.num_microbatches)
    chunked = 'grad_cache' if isinstance(model, model_api.ContrastiveModel) else 'accumulate'
    if args.search:
      last, _ = planning.search(start, plan, hbm, args.max_meshes, chunked)
    else:
      plan(start)
      last = start
    if args.encode and isinstance(model, model_api.Encoder):  # a dual encoder's export
      try:
        e = planning.plan_encode_step(last.model, last.partitioner, args.encode_batch,
                                      setup.feature_lengths['targets'])
      except Exception as err:  # as for the train step: a finding
        e = planning.StepPlan('encode document', args.encode_batch,
                              error=(str(err).splitlines() or ['?'])[0][:200])
      rows.append((e, _remat(last.model), last.partitioner.mesh_shape))
      print(_line(e, _remat(last.model), last.partitioner, hbm), flush=True)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB -> GiB
  table = _table(args, argv, model, rows, hbm, time.time() - t_start, peak_rss, acc)
  print(table)
  if args.write:
    old = open(args.write).read() if os.path.exists(args.write) else '# Benchmarks\n'
    with open(args.write, 'w') as f:
      f.write(old.rstrip('\n') + '\n\n' + table)


def _remat(model) -> str:
  """The remat policy of a model built around a T5 (model_api.T5Model), else '-'."""
  from t5dual import model_api
  return model.t5_config.remat if isinstance(model, model_api.T5Model) else '-'


def _line(p, remat, partitioner, hbm):
  from t5dual import planning
  if p.error:
    return (f'{p.name} batch {p.batch} remat {remat} gradients {p.gradients}: did not '
            f'compile: {p.error}')
  fit = planning.fits(p, hbm)
  return (f'{p.name} batch {p.batch} remat {remat} gradients {p.gradients} mesh '
          f'{partitioner.mesh_shape}: closed form '
          f'{planning.gib(p.closed_form_total)} GiB/device, compiled peak '
          f'{planning.gib(p.compiled_peak)} GiB, {"fits" if fit else "does not fit" if fit is False else "no HBM limit"}'
          f', compiled in {p.compile_s:.0f} s')


def _at_peak(p, acc):
  if not acc.peak_flops or not p.model_flops:
    return '-'
  return f'{1e3 * p.model_flops / acc.peak_flops:,.0f}'


def _table(args, argv, model, rows, hbm, seconds, peak_rss, acc):
  from t5dual import cli, planning
  date = datetime.date.today().isoformat()
  cpu = cli.cpu_model()
  cmd = 'python scripts/plan.py ' + ' '.join(shlex.quote(a) for a in argv)
  head = (f'### Plan: {model.name}, {args.topology} ({date}; compiled on {cpu} x'
          f'{os.cpu_count()} cores)\n\n`{cmd}`\n\nHBM per device: {planning.gib(hbm)} GiB. '
          f'Whole command: {seconds:.0f} s, peak host RSS {peak_rss:.1f} GiB. Per device, GiB; '
          'closed form = params + optimizer + gradients + batch + activation estimate; '
          'compiled peak = XLA memory analysis, arguments + outputs - donated + temporaries; '
          'model TFLOP = 3 x the encoders\' forward in closed form (planning.train_model_flops), '
          'per device per step, and at the accelerator\'s peak the step time it bounds; cost-model '
          'TFLOP = XLA\'s count, which counts a scanned loop\'s body once.\n\n')
  lines = ['| step | batch | remat | gradients | mesh (data, model) | params | optimizer | grads | batch | '
           'activations (est.) | closed form | compiled args | compiled temp | compiled peak | '
           'fits | model TFLOP | step at peak (ms) | cost-model TFLOP | compile s |', '|' + '---|' * 19]
  for p, remat, mesh_shape in rows:
    if p.error:
      lines.append(f'| {p.name} | {p.batch} | {remat} | {p.gradients} | {mesh_shape} | '
                   f'did not compile: {p.error} |' + ' |' * 13)
      continue
    fit = planning.fits(p, hbm)
    lines.append(
        f'| {p.name} | {p.batch} | {remat} | {p.gradients} | {mesh_shape} | '
        f'{planning.gib(p.params)} | '
        f'{planning.gib(p.opt_state)} | {planning.gib(p.grads)} | '
        f'{planning.gib(p.batch_bytes)} | {planning.gib(p.activations)} | '
        f'{planning.gib(p.closed_form_total)} | {planning.gib(p.compiled_arguments)} | '
        f'{planning.gib(p.compiled_temp)} | {planning.gib(p.compiled_peak)} | '
        f'{"yes" if fit else "no" if fit is False else "-"} | '
        f'{p.model_flops / 1e12:,.1f} | {_at_peak(p, acc)} | '
        f'{"-" if p.flops is None else f"{p.flops / 1e12:,.1f}"} | {p.compile_s:.0f} |')
  return head + '\n'.join(lines) + '\n'


if __name__ == '__main__':
  from t5dual import cli
  cli.run_main(main)
