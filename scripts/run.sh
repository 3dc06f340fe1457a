#!/usr/bin/env bash
# One command per job on a fresh machine: creates .venv, installs t5dual with
# pinned versions, then runs the job. Nothing needs an activated virtualenv.
#   bash scripts/run.sh demo    [demo flags]    train, export, retrieve, report metrics
#   bash scripts/run.sh test    [pytest flags]  the test suite
#   bash scripts/run.sh train|eval|export|convert|rerank|plan [flags]
#                                               scripts/<job>.py with the same set-up
# Conversions to Hugging Face / sentence-transformers need PyTorch: the `test`
# job installs it, or set T5DUAL_EXTRAS=torch for the others.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"; shift || true
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
case "$job" in
  test) extras="all" ;;   # seqio/TF for the seqio tests, torch/transformers references
  demo) extras="demo" ;;
  *) extras="${T5DUAL_EXTRAS:-demo}" ;;
esac
stamp=".venv/.t5dual-installed-$extras-$(sha1sum setup.py | cut -c1-12)"
if [ ! -f "$stamp" ] && ! ls .venv/.t5dual-installed-all-"$(sha1sum setup.py | cut -c1-12)" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONWARNINGS=ignore
case "$job" in
  demo) exec python scripts/demo.py "$@" ;;
  # Two workers, each test file on one (its module fixtures start their processes once);
  # T5DUAL_TEST_WORKERS=0 runs in this process, and flags given here come after these.
  test) exec python -m pytest -q tests -n "${T5DUAL_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  train|eval|export|convert|rerank|plan)
    [ -f "scripts/$job.py" ] || { echo "scripts/$job.py does not exist" >&2; exit 2; }
    exec python "scripts/$job.py" "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test|train|eval|export|convert|rerank|plan [args]" >&2
     exit 2 ;;
esac
