# Shared by scripts/launch_tpu_pod.sh and scripts/launch_gpu_slurm.sh (sourced).

# Shell quoting for what is printed and sent: a word as it is when it is safe, else in
# single quotes ('\'' for a quote inside), so the printed command reads well and runs.
q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
words() { local sep=''; for w in "$@"; do printf '%s' "$sep"; q "$w"; sep=' '; done; }
die() { echo "error: $*" >&2; exit 2; }
