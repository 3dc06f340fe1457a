#!/usr/bin/env bash
# One command per job on a fresh machine: creates .venv, installs t5dual with
# pinned versions, then runs the job.
#   bash scripts/run.sh demo   [demo flags]   train, export, retrieve, report metrics
#   bash scripts/run.sh test   [pytest flags] the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"; shift || true
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
extras="all"            # seqio/TF for the seqio tests, torch/transformers references
[ "$job" = demo ] && extras="demo"
stamp=".venv/.t5dual-installed-$extras-$(sha1sum setup.py | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONWARNINGS=ignore
case "$job" in
  demo) exec python scripts/demo.py "$@" ;;
  test) exec python -m pytest -q tests "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [args]" >&2; exit 2 ;;
esac
