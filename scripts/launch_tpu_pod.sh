#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod slice, as one multi-host job.
#
#   scripts/launch_tpu_pod.sh --tpu=NAME --zone=ZONE [--project=PROJECT] \
#       [--workdir=DIR] [--dry-run] -- COMMAND [ARGS...]
#
# e.g.
#   scripts/launch_tpu_pod.sh --tpu=my-v4-128 --zone=us-central2-b -- \
#     bash scripts/run.sh train --gin_file=gin/models/sde.gin --gin_file=gin/sizes/xxl.gin \
#       --gin_file=configs/runs/finetune.gin --gin_file=configs/topologies/v4-128.gin \
#       --gin.MODEL_DIR="'gs://bucket/sde_xxl'" --gin.MIXTURE_OR_TASK_NAME="'beir:...'"
#
# The same command runs on all workers at once (gcloud ... ssh --worker=all), in
# DIR (default: t5dual under the worker's home, where the repository must be; run
# `-- git clone URL t5dual` through this script first), with T5DUAL_MULTIHOST=1
# so that t5dual/distributed.py joins the job through jax's TPU detection, and
# T5DUAL_ACCELERATOR=tpu, so that scripts/run.sh installs the 'tpu' extra (libtpu). Paths
# the job writes (MODEL_DIR, export directories) must be shared by the workers:
# a gs:// bucket or a shared disk. --dry-run prints the exact command instead of
# running it.
set -euo pipefail

usage() {
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
# q (shell-quote a word), words, die
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

tpu='' zone='' project='' workdir='t5dual' dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) die "launch_tpu_pod.sh: unknown option $1 (the command goes after --)" ;;
  esac
  shift
done
[[ -n "$tpu" ]] || die 'launch_tpu_pod.sh: --tpu=NAME is required'
[[ -n "$zone" ]] || die 'launch_tpu_pod.sh: --zone=ZONE is required'
[[ $# -gt 0 ]] || die 'launch_tpu_pod.sh: no command given after --'

# The worker's shell receives one string: quote every word so it arrives intact.
remote="cd $(q "$workdir") && export T5DUAL_MULTIHOST=1 T5DUAL_ACCELERATOR=tpu && $(words "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -n "$project" ]] && cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote")

if [[ $dry_run == 1 ]]; then
  words "${cmd[@]}"
  printf '\n'
else
  exec "${cmd[@]}"
fi
