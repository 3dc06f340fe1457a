#!/usr/bin/env bash
# Issue 10's GPU figures, each part in one device call (≤ 10 minutes), t5dual and the PyTorch
# peer side by side in the same command.
#
# On the development machine, once (copies what the GPU host lacks into the checkout; both
# folders are git-ignored: shared/ travels with every call, .whl/ when carried):
#   bash scripts/gpu_bench.sh prepare
# Then, one device call per part (the device tool's `run`, carry [".whl"]):
#   bash scripts/gpu_bench.sh part1   # W1, W2, W2b, W3 (t5dual at the gin defaults) + the peer
#   bash scripts/gpu_bench.sh part2   # levers (W1): dropout, cuDNN attention, remat policies
#   bash scripts/gpu_bench.sh part3   # W4: large, xl, xxl (full remat; xxl with GradCache)
#   bash scripts/gpu_bench.sh part4   # W3 levers: attention xla vs cudnn (dropout 0)
# Every run takes the model gin files' defaults (DROPOUT_RATE 0.1, attention 'xla') unless it
# names a lever: cuDNN attention has no dropout, so its rows run with --dropout_rate 0.
# A part exits non-zero when any of its runs failed (the table keeps each error's line).
# Each part writes $OUT/<part>.md (the table, also appended to BENCHMARKS.md there),
# $OUT/<part>.jsonl and $OUT/<part>.log.
#
# The GPU host has jax (CUDA), flax, optax, orbax, tensorstore, sentencepiece, torch and
# transformers, and no network: gin-config and rax travel as wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

part="${1:?usage: gpu_bench.sh prepare|part1|part2|part3|part4 [benchmark_speed flags]}"
shift
# Extra flags go after each part's own (argparse: the last value wins), e.g. a CPU check:
#   bash scripts/gpu_bench.sh part1 --size tiny --dtype float32 --attention xla --batch 8 ...
EXTRA=("$@")
PEAK=989  # H100 SXM bf16 dense TFLOP/s; 989 on H200 too

if [[ "$part" == prepare ]]; then
  mkdir -p shared/bench shared/vocab shared/data .whl
  cp ../shared/bench/peer_torch_t5.py shared/bench/
  cp ../shared/vocab/t5_spiece.model shared/vocab/
  cp -r ../shared/data/medquad shared/data/
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    gin-config==0.5.0 rax==0.4.0
  ls -la .whl shared
  exit 0
fi

OUT="${OUT:-/tmp/gpu_bench}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__)'

status=0
bench() {  # bench NAME ARGS...: one benchmark_speed run, its rows and table under $OUT
  local name="$1"; shift
  python3 scripts/benchmark_speed.py --peak_tflops "$PEAK" --json "$OUT/$name.jsonl" \
    --output BENCHMARKS.md "$@" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee -a "$OUT/$name.log" \
    || status=1
}

case "$part" in
  part1)
    bench part1 --workloads W1,W2,W2b,W3 --size base --timeout 240 \
      --corpus shared/data/medquad --vocab shared/vocab/t5_spiece.model \
      --peer shared/bench/peer_torch_t5.py
    # Finer buckets than the export's powers of two: closer to the bound, more compiles.
    bench part1 --workloads W2b --size base --timeout 150 \
      --corpus shared/data/medquad --vocab shared/vocab/t5_spiece.model \
      --buckets 16,32,64,96,128,160,192,224,256
    ;;
  part2)
    # Attention kernel (dropout 0: cuDNN has none), then remat at the gin defaults.
    bench part2 --workloads W1 --size base --attention xla --dropout_rate 0 --timeout 150
    bench part2 --workloads W1 --size base --attention cudnn --dropout_rate 0 --timeout 150
    for remat in none dots save_projections full; do
      bench part2 --workloads W1 --size base --remat "$remat" --timeout 150
    done
    ;;
  part3)
    bench part3 --workloads W4 --w4_sizes large,xl,xxl --w4_microbatches 8 --timeout 280
    ;;
  part4)
    # The reranker's train step with cuDNN: its one-step decoder runs XLA (odd lengths).
    for attention in xla cudnn; do
      bench part4 --workloads W3 --size base --attention "$attention" --dropout_rate 0 \
        --timeout 200
    done
    ;;
  *)
    echo "unknown part $part (prepare, part1, part2, part3, part4)" >&2; exit 2 ;;
esac
sed -n '/^### Speed/,$p' BENCHMARKS.md | tail -40 > "$OUT/$part.md"
exit "$status"
