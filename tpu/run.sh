#!/usr/bin/env bash
# Runs one command on every worker of the TPU at the same time, as a multi-host JAX program needs
# (the same program in every process; JAX finds the others by itself on Cloud TPU): inside
# ~/REMOTE_DIR, with its .venv first on PATH, so `python` is the one tpu/install.sh made.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="all"
ENV_VARS=()
LOG=""

usage() {
  cat <<USAGE
Usage: tpu/run.sh [flags] -- COMMAND [ARGS...]

Runs COMMAND on the workers of TPU_NAME in ~/REMOTE_DIR with ~/REMOTE_DIR/.venv/bin first on PATH:
  tpu/run.sh -- python -m lumenvq.train --gin_file=gin_configs/runs/finetune.gin \\
      --gin_file=gin_configs/tpu/base_lumen_vq.gin --gin.MODEL_DIR="'/mnt/gcs/BUCKET/run1'" ...
ARGS reach the workers exactly as given here; every lumenvq path setting (MODEL_DIR, checkpoints,
outputs, KILT files, passage tables, vocabularies, memory stores) takes a gs:// path.

  --worker=W          all (default), or one worker's index, e.g. 0
  --env=NAME=VALUE    export NAME=VALUE before COMMAND (repeatable), e.g. --env=KILT_DATA_DIR=...
  --log=NAME          run COMMAND in the background (nohup) with its output in
                      ~/REMOTE_DIR/logs/NAME.log on each worker, and return at once; follow it with
                      tpu/run.sh --worker=0 -- tail -f logs/NAME.log

$COMMON_USAGE
USAGE
}

script_flag() {
  case "$1" in
    --worker=*) WORKER="${1#*=}" ;;
    --env=*) ENV_VARS+=("${1#*=}") ;;
    --log=*) LOG="${1#*=}" ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
((${#ARGS[@]})) || die "no command to run: put it after -- (see --help)"
[[ -z "$LOG" || "$LOG" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--log=$LOG: use letters, digits, _ . -"

dir="$(shell_word "$REMOTE_DIR")"
statements=("set -euo pipefail" "cd ~/$dir" "export PATH=\"\$HOME/$dir/.venv/bin:\$PATH\"")
for assignment in "${ENV_VARS[@]}"; do
  [[ "$assignment" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$assignment: expected NAME=VALUE"
  statements+=("export $(shell_word "$assignment")")
done
command_line="$(shell_line "${ARGS[@]}")"
if [[ -n "$LOG" ]]; then
  statements+=("mkdir -p logs" "nohup $command_line > logs/$LOG.log 2>&1 < /dev/null &"
    "echo \"\$(hostname): started; output in ~/$dir/logs/$LOG.log\"")
else
  statements+=("$command_line")
fi
on_workers "$WORKER" "${statements[@]}"
