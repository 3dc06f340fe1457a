"""Which accelerator this machine has, so that the set-up installs the JAX that uses it.

scripts/run.sh runs this file with the system Python before anything is installed (so it
imports nothing but the standard library) and installs the setup.py extra it prints:

  T5DUAL_ACCELERATOR=cpu|cuda|tpu   forced (the launchers set it: tpu on a TPU pod,
                                    cuda on SLURM GPU nodes); cpu also means "run on the
                                    CPU although an accelerator is here"
  /dev/accel*, /dev/vfio/<N>        a TPU VM (v2-v4 chips / v5e and later)  -> tpu
  nvidia-smi -L lists a GPU         an NVIDIA GPU host                     -> cuda
  none of these                     -> cpu (no extra)

Signs of both, or an nvidia-smi that lists no GPU, are `Unsure`: one line that says
what to set. Every job script then checks, once JAX has started, that JAX uses what is
here (`t5dual.distributed.check_backend`): an accelerator JAX cannot see is refused in
one line, not trained on the CPU for hours.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from typing import Mapping, Optional

ENV = 'T5DUAL_ACCELERATOR'
KINDS = ('cpu', 'cuda', 'tpu')
# The setup.py extra of each kind (cpu: the core's CPU jaxlib), and JAX's backend name.
EXTRAS = {'cpu': '', 'cuda': 'cuda', 'tpu': 'tpu'}
JAX_BACKENDS = {'cpu': 'cpu', 'cuda': 'gpu', 'tpu': 'tpu'}
# Where the device files are (a test points it at a fake /dev).
ENV_DEV = 'T5DUAL_DEV_DIR'


class Unsure(Exception):
  """The machine's signs disagree or are incomplete; the message says what to set."""


def _tpu_devices(dev: str) -> list[str]:
  """TPU chips as device files: /dev/accel0.. (v2-v4), /dev/vfio/0.. (v5e, v5p, v6e)."""
  vfio = [p for p in glob.glob(os.path.join(dev, 'vfio', '*')) if os.path.basename(p).isdigit()]
  return sorted(glob.glob(os.path.join(dev, 'accel*'))) + sorted(vfio)


def _nvidia_gpus(environ: Mapping[str, str]) -> Optional[list[str]]:
  """GPU lines of `nvidia-smi -L`; None without nvidia-smi; raises Unsure when it fails."""
  smi = shutil.which('nvidia-smi', path=environ.get('PATH'))
  if smi is None:
    return None
  try:
    out = subprocess.run([smi, '-L'], capture_output=True, text=True, timeout=30,
                         env=dict(environ))
  except (OSError, subprocess.TimeoutExpired) as e:
    raise Unsure(f'{smi} -L failed ({e})') from None
  gpus = [line for line in out.stdout.splitlines() if line.startswith('GPU ')]
  if out.returncode != 0 or not gpus:
    said = (out.stderr or out.stdout).strip().splitlines()
    raise Unsure(f'{smi} -L lists no GPU (exit {out.returncode}'
                 f'{": " + said[-1] if said else ""})')
  return gpus


def detect(environ: Optional[Mapping[str, str]] = None) -> tuple[str, str]:
  """(kind, why): kind one of KINDS, why the evidence in a few words.

  Raises:
    Unsure: the evidence is contradictory or incomplete, or T5DUAL_ACCELERATOR is not
      one of KINDS; the message ends with what to set.
  """
  environ = os.environ if environ is None else environ
  hint = f'set {ENV}=cpu, cuda or tpu'
  forced = environ.get(ENV, '').strip()
  if forced:
    if forced not in KINDS:
      raise Unsure(f'{ENV}={forced!r} is not one of cpu, cuda, tpu')
    return forced, f'{ENV}={forced}'
  tpus = _tpu_devices(environ.get(ENV_DEV, '/dev'))
  try:
    gpus = _nvidia_gpus(environ)
  except Unsure as e:
    raise Unsure(f'cannot tell which accelerator this machine has: {e}; {hint}') from None
  if tpus and gpus:
    raise Unsure(f'cannot tell which accelerator this machine has: TPU devices '
                 f'({tpus[0]}, ...) and NVIDIA GPUs; {hint}')
  if tpus:
    return 'tpu', f'{len(tpus)} TPU device file(s) ({tpus[0]}, ...)'
  if gpus:
    return 'cuda', f'nvidia-smi lists {len(gpus)} GPU(s)'
  return 'cpu', 'no TPU device files, no nvidia-smi'


def main(argv=None) -> int:
  """`python t5dual/accelerator.py`: prints the extra to install ('' for the CPU) and, on
  stderr, what was found; exit 2 with one line when unsure."""
  del argv
  try:
    kind, why = detect()
  except Unsure as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(EXTRAS[kind])
  print(f'accelerator: {kind} ({why})', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
