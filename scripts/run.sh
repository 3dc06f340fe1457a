#!/usr/bin/env bash
# One command per job on a fresh machine: creates .venv, installs t5dual with
# pinned versions, then runs the job. Nothing needs an activated virtualenv.
#   bash scripts/run.sh demo    [demo flags]    train, export, retrieve, report metrics
#   bash scripts/run.sh test    [pytest flags]  the test suite, then its 25 slowest tests
#   bash scripts/run.sh test-fast [pytest flags] the fast tier: not slow, not multiprocess
#                                               (T5DUAL_RECORD_DURATIONS=1: tests/DURATIONS.md)
#   bash scripts/run.sh train|eval|export|convert|rerank|plan|prepare_data [flags]
#                                               scripts/<job>.py with the same set-up
# Conversions to Hugging Face / sentence-transformers need PyTorch: the `test`
# job installs it, or set T5DUAL_EXTRAS=torch for the others.
# The accelerator's JAX comes with it: the 'tpu' extra on a TPU VM, 'cuda' on an NVIDIA GPU
# host, detected by t5dual/accelerator.py or forced with T5DUAL_ACCELERATOR=cpu|cuda|tpu
# (the launchers set it).
#   bash scripts/run.sh extras [JOB]            prints the extras JOB would install here
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"; shift || true
PY="${PYTHON:-python3}"
extras_for() {  # extras_for JOB: the job's extras, then the accelerator's
  local base accel
  case "$1" in
    test|test-fast) base="all" ;;   # seqio/TF for the seqio tests, torch/transformers references
    demo) base="demo" ;;
    *) base="${T5DUAL_EXTRAS:-demo}" ;;
  esac
  accel="$("$PY" t5dual/accelerator.py)" || exit 2   # one line when unsure
  echo "$base${accel:+,$accel}"
}
if [ "$job" = extras ]; then
  extras_for "${1:-demo}"
  exit 0
fi
extras="$(extras_for "$job")"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
sha="$(sha1sum setup.py | cut -c1-12)"
stamp=".venv/.t5dual-installed-$extras-$sha"
all=".venv/.t5dual-installed-all${extras#"${extras%%,*}"}-$sha"   # 'all' + the same accelerator
if [ ! -f "$stamp" ] && [ ! -f "$all" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONWARNINGS=ignore
case "$job" in
  demo) exec python scripts/demo.py "$@" ;;
  # Two workers, each test file on one (its module fixtures start their processes once);
  # T5DUAL_TEST_WORKERS=0 runs in this process, and flags given here come after these.
  # Tiers (pytest.ini, README "Test tiers"): `test` runs all, `test-fast` leaves out the slow and
  # multi-process tests; with T5DUAL_RECORD_DURATIONS=1, tests/conftest.py writes the durations
  # of the tests that ran into tests/DURATIONS.md, which tests/test_tiers.py checks markers by.
  test) exec python -m pytest -q tests -n "${T5DUAL_TEST_WORKERS:-2}" --dist loadfile \
          --durations=25 "$@" ;;
  test-fast) exec python -m pytest -q tests -n "${T5DUAL_TEST_WORKERS:-2}" --dist loadfile \
               -m "not slow and not multiprocess" --durations=10 "$@" ;;
  train|eval|export|convert|rerank|plan|prepare_data)
    [ -f "scripts/$job.py" ] || { echo "scripts/$job.py does not exist" >&2; exit 2; }
    exec python "scripts/$job.py" "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test|test-fast|train|eval|export|convert|rerank|plan|prepare_data|extras [args]" >&2
     exit 2 ;;
esac
