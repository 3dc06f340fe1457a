#!/usr/bin/env bash
# The GPU host's library versions as a tested configuration, checked on any CPU machine:
# builds a Python 3.12 virtualenv (.venv-gpu-host/, git-ignored) from setup.py with
# constraints/gpu-host.txt (jax 0.11.2, flax 0.12.10, transformers 5.17.0), checks that
# those versions are the ones imported, then runs the tests that cover the GPU path there.
#   bash scripts/check_gpu_host_versions.sh                  # the default test files below
#   bash scripts/check_gpu_host_versions.sh tests/test_x.py  # other pytest arguments
# PYTHON312 names the interpreter (default: python3.12 on PATH, else pyenv's 3.12.x).
# PyTorch is not installed (its Linux wheels bring CUDA libraries, gigabytes): tests that
# need it are left to the default install.
set -euo pipefail
cd "$(dirname "$0")/.."

is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
PY="${PYTHON312:-}"
if [ -z "$PY" ]; then
  # python3.12 on PATH (a pyenv shim may exist and still fail), else pyenv's newest 3.12.x.
  for candidate in "$(command -v python3.12 || true)" \
      $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python 2>/dev/null | sort -rV); do
    if [ -n "$candidate" ] && is312 "$candidate"; then PY="$candidate"; break; fi
  done
fi
[ -n "$PY" ] && is312 "$PY" || {
  echo "no working Python 3.12 found: set PYTHON312=/path/to/python3.12" >&2; exit 2; }

VENV="${T5DUAL_GPU_HOST_VENV:-.venv-gpu-host}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.installed-$(cat setup.py constraints/gpu-host.txt "$0" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints/gpu-host.txt -e . \
    pytest==9.2.0 pytest-xdist==3.8.0 setuptools==84.2.1 transformers
  touch "$stamp"
fi

# The versions imported are the host's (and the interpreter is 3.12).
"$VENV/bin/python" - <<'EOF'
import re, sys
import flax, jax, jaxlib, transformers
want = dict(re.findall(r'^([\w-]+)==(\S+)', open('constraints/gpu-host.txt').read(), re.M))
got = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
       'transformers': transformers.__version__}
bad = {k: (v, want[k]) for k, v in got.items() if v != want[k]}
assert sys.version_info[:2] == (3, 12), sys.version
assert not bad, f'imported (got, wanted): {bad}'
print(f'Python {sys.version.split()[0]}:', ', '.join(f'{k} {v}' for k, v in got.items()))
EOF

if [ $# -eq 0 ]; then
  set -- tests/test_gpu_host_imports.py tests/test_attention.py \
    tests/test_attention_xla_parity.py tests/test_benchmark_speed.py tests/test_export.py \
    tests/test_export_processes.py tests/test_launchers.py tests/test_accelerator.py
fi
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONWARNINGS=ignore JAX_PLATFORMS=cpu
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
