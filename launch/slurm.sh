#!/usr/bin/env bash
# Runs `python -m bert_jax.main` on a SLURM GPU cluster: one task per node, the same command in every
# task, with the JAX coordinator variables set per task. See launch/README.md.
#
#   sbatch launch/slurm.sh [--config=configs/imdb.py[:PRESET]] [--workdir=DIR] [-- --config.KEY=VALUE ...]
#   sbatch --nodes=4 --time=12:00:00 launch/slurm.sh ...    (sbatch options override the defaults below)
#   bash launch/slurm.sh --dry-run ...                       (print the commands; run nothing)
#
# Submit from the repo root (or set REPO_DIR). Environment: CONFIG, WORKDIR (defaults for the flags),
# PYTHON (default: .venv/bin/python if the repo has one, else python), JAX_COORDINATOR_PORT.
# Add e.g. --cpus-per-task=16 for the input pipeline: SLURM's default is one CPU per task.
#
#SBATCH --job-name=bert_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

readonly PROG=slurm.sh

usage() {
  cat <<EOF
usage: sbatch [SBATCH_OPTIONS] launch/slurm.sh [--config=FILE[:PRESET]] [--workdir=DIR] [--dry-run]
                                               [-- BERT_JAX_MAIN_ARGS...]
       bash launch/slurm.sh --dry-run ...   (print the srun command instead of running it)

  --config FILE[:PRESET]  relative to the repo (default: \$CONFIG or configs/imdb.py)
  --workdir DIR           on a filesystem every node shares (default: \$WORKDIR or runs/slurm-JOBID)
  --dry-run               print the commands, one per line after "+ ", and exit
Arguments after '--' go to bert_jax.main unchanged, e.g. -- --config.train.batch_size=256
EOF
}

die_usage() {
  echo "$PROG: $*" >&2
  usage >&2
  exit 2
}

die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

# Quoting for the printed commands: safe words bare, else single quotes ('\'' for a quote).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

print_cmd() {
  local line="+" arg
  for arg in "$@"; do
    line+=" $(quote "$arg")"
  done
  printf '%s\n' "$line"
}

CONFIG=${CONFIG:-configs/imdb.py}
WORKDIR=${WORKDIR:-runs/slurm-${SLURM_JOB_ID:-JOBID}}
DRY_RUN=0
EXTRA_ARGS=()
while (($#)); do
  arg=$1
  shift
  case $arg in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --)
      EXTRA_ARGS=("$@")
      break
      ;;
    --config | --workdir)
      if (($# == 0)) || [[ $1 == --* ]]; then die_usage "$arg needs a value"; fi
      if [[ $arg == --config ]]; then CONFIG=$1; else WORKDIR=$1; fi
      shift
      ;;
    --config=*) CONFIG=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --config.*) die_usage "'$arg' is for bert_jax.main: put it after '--'" ;;
    *) die_usage "unknown argument '$arg'" ;;
  esac
done
[[ -n $CONFIG && -n $WORKDIR ]] || die_usage "--config and --workdir need non-empty values"

# Under sbatch this file runs from a spool copy: the repo is where the job was submitted from.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -d $REPO_DIR/bert_jax ]] || die "$REPO_DIR is not the bert_jax repo: submit from the repo root or set REPO_DIR"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO_DIR/.venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

# The coordinator: process 0's host (the first of the allocation) and a port derived from the job id,
# so that two jobs sharing a node do not collide.
PORT=${JAX_COORDINATOR_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null 2>&1; then
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  COORDINATOR=${HOSTS[0]}:$PORT
elif [[ $DRY_RUN == 1 ]]; then
  COORDINATOR="FIRST_HOST_OF_SLURM_JOB_NODELIST:$PORT"
else
  die "not inside a SLURM job (no SLURM_JOB_NODELIST or scontrol): submit with sbatch, or use --dry-run"
fi

# Per task: the process count and this task's rank, which bert_jax.main hands to jax.distributed.initialize
# with JAX_COORDINATOR_ADDRESS (bert_jax/partitioning.py). With one task per node, every GPU the task sees is
# one of its local devices (JAX's SLURM detection would otherwise give each process only GPU
# SLURM_LOCALID, i.e. GPU 0).
# shellcheck disable=SC2016  # expanded by the task's shell, not here
TASK_SCRIPT='export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID";'\
' if [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ] && [ "${SLURM_NTASKS_PER_NODE:-1}" = 1 ]; then'\
' n="${SLURM_GPUS_ON_NODE:-}";'\
' if [ -z "$n" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then n=$(echo "$CUDA_VISIBLE_DEVICES" | tr , "\n" | wc -l); fi;'\
' if [ -n "$n" ] && [ "$n" -gt 0 ]; then export JAX_LOCAL_DEVICE_IDS="$(seq -s , 0 $((n - 1)))"; fi;'\
' fi;'\
' exec "$@"'

MAIN=("$PYTHON" -m bert_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
SRUN=(srun --kill-on-bad-exit=1 bash -c "$TASK_SCRIPT" bash "${MAIN[@]}")

if [[ $DRY_RUN == 1 ]]; then
  print_cmd cd "$REPO_DIR"
  print_cmd export "JAX_COORDINATOR_ADDRESS=$COORDINATOR"
  print_cmd "${SRUN[@]}"
  exit 0
fi

cd "$REPO_DIR"
export JAX_COORDINATOR_ADDRESS=$COORDINATOR
echo "$PROG: job ${SLURM_JOB_ID:-?}: ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NODELIST:-?}," \
  "coordinator $JAX_COORDINATOR_ADDRESS, workdir $WORKDIR" >&2
exec "${SRUN[@]}"
