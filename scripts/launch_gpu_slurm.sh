#!/usr/bin/env bash
# Run one command as a multi-host JAX job on GPU nodes of a SLURM cluster.
#
#   scripts/launch_gpu_slurm.sh --nodes=N [--gpus_per_node=8] [--per=gpu|node] \
#       [--partition=P] [--account=A] [--time=HH:MM:SS] [--job_name=t5dual] \
#       [--workdir=DIR] [--srun] [--dry-run] -- COMMAND [ARGS...]
#
# e.g.
#   scripts/launch_gpu_slurm.sh --nodes=2 --partition=h100 -- \
#     bash scripts/run.sh train --gin_file=gin/models/sde.gin --gin_file=gin/sizes/xl.gin \
#       --gin_file=configs/runs/finetune.gin --gin_file=configs/topologies/2x8xh100.gin \
#       --gin.MODEL_DIR="'/shared/runs/sde_xl'" --gin.MIXTURE_OR_TASK_NAME="'beir:...'"
#
# Submits (sbatch) a job whose one srun step starts the command on every node:
# one process per GPU (--per=gpu, the default; jax's SLURM detection gives each
# process its GPU) or one per node owning all its GPUs (--per=node; sets
# JAX_LOCAL_DEVICE_IDS). t5dual/distributed.py finds the coordinator (the first
# node; port from the job id, JAX_COORDINATOR_PORT overrides), the process count
# and index in SLURM's variables. --srun runs the step directly, inside an
# allocation you already hold (salloc). Every task gets T5DUAL_ACCELERATOR=cuda, so
# that scripts/run.sh installs the 'cuda' extra (jax's CUDA plugin and cuDNN) whatever
# the node's nvidia-smi says. DIR (default: this repository) and
# every path the job writes must be on a filesystem all nodes share.
# --dry-run prints the exact command (and the batch script) instead.
set -euo pipefail

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
# q (shell-quote a word), words, die
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "launch_gpu_slurm.sh: $1 must be a positive integer, got '$2'"; }

nodes='' gpus=8 per=gpu partition='' account='' time_limit='' job_name=t5dual
workdir="$(cd "$(dirname "$0")/.." && pwd)" use_srun=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --job_name=*) job_name="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --srun) use_srun=1 ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) die "launch_gpu_slurm.sh: unknown option $1 (the command goes after --)" ;;
  esac
  shift
done
[[ -n "$nodes" ]] || die 'launch_gpu_slurm.sh: --nodes=N is required'
positive --nodes "$nodes"
positive --gpus_per_node "$gpus"
case "$per" in
  gpu) tasks_per_node=$gpus ;;
  node) tasks_per_node=1 ;;
  *) die "launch_gpu_slurm.sh: --per must be gpu or node, got '$per'" ;;
esac
[[ $# -gt 0 ]] || die 'launch_gpu_slurm.sh: no command given after --'

# What every task runs: one string for bash -c, every word quoted.
task="cd $(q "$workdir") && $(words "$@")"
step=(srun --kill-on-bad-exit=1 "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node"
      bash -c "$task")
env_lines=("export T5DUAL_ACCELERATOR=cuda")
if [[ $per == node ]]; then
  # Otherwise jax gives each process only the GPU of its SLURM_LOCALID (0).
  env_lines+=("export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))")
fi

if [[ $use_srun == 1 ]]; then
  if [[ $dry_run == 1 ]]; then
    for line in "${env_lines[@]}"; do echo "$line"; done
    words "${step[@]}"; echo
    exit 0
  fi
  for line in "${env_lines[@]}"; do eval "$line"; done
  exec "${step[@]}"
fi

script="#!/bin/bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
#SBATCH --gpus-per-node=$gpus
#SBATCH --output=$job_name-%j.out"
[[ -n "$partition" ]] && script+=$'\n'"#SBATCH --partition=$partition"
[[ -n "$account" ]] && script+=$'\n'"#SBATCH --account=$account"
[[ -n "$time_limit" ]] && script+=$'\n'"#SBATCH --time=$time_limit"
for line in "${env_lines[@]}"; do script+=$'\n'"$line"; done
script+=$'\n'"$(words "${step[@]}"; echo)"

if [[ $dry_run == 1 ]]; then
  printf "sbatch <<'SBATCH'\n%s\nSBATCH\n" "$script"
else
  sbatch <<<"$script"
fi
