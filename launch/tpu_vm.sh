#!/usr/bin/env bash
# Runs `python -m bert_jax.main` on a Cloud TPU VM or pod slice: one command for the whole slice,
# the same on every worker (gcloud `--worker=all`). See launch/README.md.
#
#   launch/tpu_vm.sh create --name=bert-pod --zone=us-central2-b --accelerator-type=v4-32
#   launch/tpu_vm.sh setup  --name=bert-pod --zone=us-central2-b
#   launch/tpu_vm.sh run    --name=bert-pod --zone=us-central2-b -- --config.train.batch_size=256
#   launch/tpu_vm.sh logs | copy-results | stop | delete  --name=bert-pod --zone=us-central2-b
#
# Add --dry-run to print every command (one per line, prefixed with "+ ") instead of running it.
set -euo pipefail

readonly PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT

usage() {
  cat <<EOF
usage: $PROG COMMAND [OPTIONS] [-- BERT_JAX_MAIN_ARGS...]

Commands:
  create        create the TPU VM (one host) or pod slice (several workers)
  setup         copy or clone the repo to every worker; make a venv; pip install -e . 'jax[tpu]'
  run           start bert_jax.main in the background on every worker (nohup; one log per worker)
  logs          follow the latest log of one worker (--worker, default 0)
  copy-results  fetch results.json, evaluate_results.json and config.json from worker 0's workdir
  stop          stop the run started by 'run' on every worker
  delete        delete the TPU VM (--quiet: no prompt)
  all           create, setup and run

Options (--opt VALUE or --opt=VALUE):
  --name NAME               TPU name (default: \$TPU_NAME; required)
  --zone ZONE               zone, e.g. us-central2-b for v4 (default: \$TPU_ZONE; required)
  --project PROJECT         GCP project (default: gcloud's configured project)
  --accelerator-type TYPE   create: v4-8 (one host), v4-32 (4 hosts), ... (default: v4-8)
  --version RUNTIME         create: TPU software version (default: tpu-ubuntu2204-base)
  --spot                    create: a Spot TPU (cheaper, can be preempted)
  --repo URL|PATH           setup: a git URL to clone on each worker, or a local checkout to copy
                            (default: this checkout, $REPO_ROOT)
  --python PYTHON           setup: interpreter for the venv (python3.N); installed with apt when missing
                            (default: python3.11; the project needs >= 3.11)
  --remote-dir DIR          the repo on each worker, relative to the home directory (default: bert_jax)
  --config FILE[:PRESET]    run: relative to the repo (default: configs/imdb.py)
  --workdir DIR             run/copy-results: relative to --remote-dir or absolute (default: runs/NAME)
  --worker N                logs: which worker (default: 0)
  --dest DIR                copy-results: local directory (default: runs/NAME)
  --dry-run                 print the commands instead of running them
  -h, --help                this message

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

# Shell quoting for printing and for the remote command strings. Words made of safe characters stay
# bare. quote() prefers single quotes (for the outer, local command line); quote_inner() prefers
# double quotes, so that a remote command built from it sits in single quotes without escapes.
is_bare() { [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; }
single_quoted() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

quote() {
  if is_bare "$1"; then
    printf '%s' "$1"
  elif [[ $1 != *\'* ]]; then
    printf "'%s'" "$1"
  elif [[ $1 != *[\$\`\"\\!]* ]]; then
    printf '"%s"' "$1"
  else
    single_quoted "$1"
  fi
}

quote_inner() {
  if is_bare "$1"; then
    printf '%s' "$1"
  elif [[ $1 != *[\$\`\"\\!]* ]]; then
    printf '"%s"' "$1"
  else
    single_quoted "$1"
  fi
}

# Quotes one argument; --flag=value prints as --flag=QUOTED_VALUE.
quote_arg() {
  local fn=${2:-quote}
  if [[ $1 =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    "$fn" "${BASH_REMATCH[2]}"
  else
    "$fn" "$1"
  fi
}

# Runs a command, or prints it under --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    local line="+" arg
    for arg in "$@"; do
      line+=" $(quote_arg "$arg")"
    done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------------------
# Arguments.

COMMAND=""
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=""
ACCELERATOR_TYPE="v4-8"
VERSION="tpu-ubuntu2204-base"
SPOT=0
REPO="$REPO_ROOT"
PYTHON="python3.11"
REMOTE_DIR="bert_jax"
CONFIG="configs/imdb.py"
WORKDIR=""
WORKER="0"
DEST=""
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
    --spot) SPOT=1 ;;
    --)
      EXTRA_ARGS=("$@")
      break
      ;;
    --name | --zone | --project | --accelerator-type | --version | --repo | --python | --remote-dir | \
      --config | --workdir | --worker | --dest | \
      --name=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --repo=* | --python=* | \
      --remote-dir=* | --config=* | --workdir=* | --worker=* | --dest=*)
      if [[ $arg == *=* ]]; then
        value=${arg#*=}
        arg=${arg%%=*}
      else
        if (($# == 0)) || [[ $1 == --* ]]; then die_usage "$arg needs a value"; fi
        value=$1
        shift
      fi
      [[ -n $value ]] || die_usage "$arg needs a non-empty value"
      case $arg in
        --name) NAME=$value ;;
        --zone) ZONE=$value ;;
        --project) PROJECT=$value ;;
        --accelerator-type) ACCELERATOR_TYPE=$value ;;
        --version) VERSION=$value ;;
        --repo) REPO=$value ;;
        --python) PYTHON=$value ;;
        --remote-dir) REMOTE_DIR=$value ;;
        --config) CONFIG=$value ;;
        --workdir) WORKDIR=$value ;;
        --worker) WORKER=$value ;;
        --dest) DEST=$value ;;
      esac
      ;;
    --config.*) die_usage "'$arg' is for bert_jax.main: put it after '--'" ;;
    -*) die_usage "unknown option '$arg'" ;;
    *)
      [[ -z $COMMAND ]] || die_usage "unexpected argument '$arg' (command is already '$COMMAND')"
      COMMAND=$arg
      ;;
  esac
done

case $COMMAND in
  create | setup | run | logs | copy-results | stop | delete | all) ;;
  "") die_usage "missing COMMAND" ;;
  *) die_usage "unknown command '$COMMAND'" ;;
esac
[[ -n $NAME ]] || die_usage "--name is required (or set TPU_NAME)"
[[ -n $ZONE ]] || die_usage "--zone is required (or set TPU_ZONE)"
[[ $WORKER =~ ^[0-9]+$ ]] || die_usage "--worker must be a worker index (0, 1, ...), not '$WORKER'"
[[ $REMOTE_DIR != /* && $REMOTE_DIR != *..* ]] ||
  die_usage "--remote-dir is relative to the home directory on the workers"
[[ $PYTHON =~ ^python3(\.[0-9]+)?$ ]] || die_usage "--python takes an apt package name like python3.11, not '$PYTHON'"
WORKDIR=${WORKDIR:-runs/$NAME}
DEST=${DEST:-runs/$NAME}
if [[ $WORKDIR == gs://* ]]; then
  # bert_jax writes its workdir with os/tempfile today: "gs://b/x" would become a local folder "gs:/b/x".
  die_usage "--workdir=$WORKDIR: bert_jax does not write to gs:// yet; use a path on the workers"
fi
if ((${#EXTRA_ARGS[@]})) && [[ $COMMAND != run && $COMMAND != all ]]; then
  die_usage "arguments after '--' are for 'run' (bert_jax.main), not '$COMMAND'"
fi

if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)," \
    "run 'gcloud auth login', or use --dry-run to print the commands"
fi

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=(--project="$PROJECT")
TPU_VM=(gcloud compute tpus tpu-vm)

# The workdir as a path on the worker (relative to the home directory, as ssh and scp see it).
if [[ $WORKDIR == /* ]]; then
  REMOTE_WORKDIR=$WORKDIR
else
  REMOTE_WORKDIR=$REMOTE_DIR/$WORKDIR
fi

# ---------------------------------------------------------------------------------------------------
# Commands.

ssh_all() { run "${TPU_VM[@]}" ssh "$NAME" --worker=all "${GCLOUD_FLAGS[@]}" --command="$1"; }

cmd_create() {
  local flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  [[ $SPOT == 0 ]] || flags+=(--spot)
  run "${TPU_VM[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" "${flags[@]}"
}

cmd_setup() {
  local dir py fetch install
  dir=$(quote_inner "$REMOTE_DIR")
  py=$(quote_inner "$PYTHON")
  if [[ -d $REPO ]]; then
    # A local checkout: tar it without venvs and caches, copy it to every worker, unpack.
    local tmp tarball
    if [[ $DRY_RUN == 1 ]]; then
      tmp="${TMPDIR:-/tmp}/bert_jax-launch"
    else
      tmp=$(mktemp -d)
      # shellcheck disable=SC2064  # expand $tmp now
      trap "rm -rf -- $(quote "$tmp")" EXIT
    fi
    tarball=$tmp/bert_jax-src.tar.gz
    run tar -czf "$tarball" --exclude=.venv --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache --exclude=./runs --exclude=./logs -C "$REPO" .
    run "${TPU_VM[@]}" scp "$tarball" "$NAME:bert_jax-src.tar.gz" --worker=all "${GCLOUD_FLAGS[@]}"
    fetch="mkdir -p $dir && tar -xzf bert_jax-src.tar.gz -C $dir && rm -f bert_jax-src.tar.gz"
  else
    local url
    url=$(quote_inner "$REPO")
    fetch="if [ -d $dir/.git ]; then git -C $dir pull --ff-only; else git clone $url $dir; fi"
  fi
  install="cd $dir"
  install+=" && if ! $py -c \"import ensurepip\" >/dev/null 2>&1; then sudo apt-get update -qq"
  install+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv; fi"
  install+=" && $py -m venv .venv && .venv/bin/pip install -q -U pip"
  install+=" && .venv/bin/pip install -q -e . \"jax[tpu]\""
  install+=" && .venv/bin/python -c \"import jax, bert_jax; print(jax.__version__)\""
  ssh_all "set -e; $fetch; $install"
}

# shellcheck disable=SC2016  # the single-quoted $! and $(...) are for the remote shell
cmd_run() {
  local dir log main arg cmd
  dir=$(quote_inner "$REMOTE_DIR")
  log="main-$(date +%Y%m%d-%H%M%S).log"
  # BERT_JAX_DISTRIBUTED=1: the program calls jax.distributed.initialize(), which finds the slice's
  # workers from the TPU VM's metadata (one worker: a single process, as before).
  main="nohup env PYTHONUNBUFFERED=1 BERT_JAX_DISTRIBUTED=1 .venv/bin/python -m bert_jax.main"
  main+=" $(quote_arg "--config=$CONFIG" quote_inner) $(quote_arg "--workdir=$WORKDIR" quote_inner)"
  for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
    main+=" $(quote_arg "$arg" quote_inner)"
  done
  # One log per worker (each on its own disk); logs/latest.log points at it, logs/main.pid at the process.
  cmd='cd '"$dir"' || exit 1; mkdir -p logs'
  cmd+='; if [ -f logs/main.pid ] && kill -0 "$(cat logs/main.pid)" 2>/dev/null; then'
  cmd+=' echo "bert_jax.main is already running on $(hostname); use stop" >&2; exit 1; fi'
  cmd+="; $main > logs/$log 2>&1 < /dev/null &"
  cmd+=' echo $! > logs/main.pid; ln -sfn '"$log"' logs/latest.log'
  cmd+='; echo "started on $(hostname): '"$REMOTE_DIR/logs/$log"'"'
  ssh_all "$cmd"
}

cmd_logs() {
  run "${TPU_VM[@]}" ssh "$NAME" --worker="$WORKER" "${GCLOUD_FLAGS[@]}" \
    --command="tail -n 100 -F $(quote_inner "$REMOTE_DIR/logs/latest.log")"
}

# shellcheck disable=SC2016  # the single-quoted $(...) are for the remote shell
cmd_stop() {
  local dir
  dir=$(quote_inner "$REMOTE_DIR")
  ssh_all 'cd '"$dir"' || exit 0; if [ -f logs/main.pid ]; then kill "$(cat logs/main.pid)" 2>/dev/null || true;'\
' rm -f logs/main.pid; echo "stopped on $(hostname)"; fi'
}

cmd_copy_results() {
  local file copied=0
  run mkdir -p "$DEST"
  for file in results.json evaluate_results.json config.json; do
    if run "${TPU_VM[@]}" scp "$NAME:$REMOTE_WORKDIR/$file" "$DEST/" --worker=0 "${GCLOUD_FLAGS[@]}"; then
      copied=$((copied + 1))
    else
      echo "$PROG: warning: no $REMOTE_WORKDIR/$file on worker 0" >&2
    fi
  done
  ((copied > 0)) || die "nothing copied from $REMOTE_WORKDIR on worker 0"
  [[ $DRY_RUN == 1 ]] || echo "copied $copied file(s) to $DEST/"
}

cmd_delete() {
  run "${TPU_VM[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
}

case $COMMAND in
  create) cmd_create ;;
  setup) cmd_setup ;;
  run) cmd_run ;;
  logs) cmd_logs ;;
  copy-results) cmd_copy_results ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  all)
    cmd_create
    cmd_setup
    cmd_run
    ;;
esac
