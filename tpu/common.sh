# Sourced by the tpu/*.sh scripts (not run on its own): their shared settings, flags, dry run and
# gcloud invocations, so that every script reads PROJECT, ZONE, TPU_NAME, ... the same way.
#
# Settings come from environment variables, overridden by flags (--project=..., --zone=...):
#   PROJECT          Google Cloud project         default: gcloud's core/project
#   ZONE             zone of the TPU              default: us-central2-b (has v4)
#   TPU_NAME         TPU VM / node name           default: lumenvq
#   QUEUED_RESOURCE  queued-resource id           default: ${TPU_NAME}-qr
#   ACCELERATOR_TYPE e.g. v4-32, v5litepod-16     default: v4-32
#   RUNTIME_VERSION  TPU software version         default: from ACCELERATOR_TYPE (below)
#   REMOTE_DIR       the checkout on each worker  default: lumenvq (under the home directory)

# The TPU software versions Google documents for JAX, by TPU generation:
# https://cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX").
default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-lumenvq}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
REMOTE_DIR="${REMOTE_DIR:-lumenvq}"
DRY_RUN=0
ARGS=()  # what follows `--` on the command line

COMMON_USAGE="Settings (environment variable, or flag):
  PROJECT          --project=ID           default: gcloud config get-value project
  ZONE             --zone=ZONE            default: us-central2-b
  TPU_NAME         --tpu_name=NAME        default: lumenvq
  QUEUED_RESOURCE  --queued_resource=ID   default: \${TPU_NAME}-qr
  ACCELERATOR_TYPE --accelerator_type=T   default: v4-32 (e.g. v5litepod-16, v5p-32, v6e-16)
  RUNTIME_VERSION  --runtime_version=V    default: tpu-ubuntu2204-base (v2-v4), v2-alpha-tpuv5-lite
                                          (v5litepod), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  REMOTE_DIR       --remote_dir=DIR       default: lumenvq (the checkout under ~ on each worker)
  --dry_run    print the commands instead of running them
  --help       this text"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

note() {
  echo "$(basename "$0"): $*" >&2
}

# parse_flags "$@": the common flags; each script handles its own in `script_flag FLAG` (returns
# non-zero for a flag it does not know) and prints its help with `usage`.
parse_flags() {
  while (($#)); do
    case "$1" in
      --project=*) PROJECT="${1#*=}" ;;
      --zone=*) ZONE="${1#*=}" ;;
      --tpu_name=*) TPU_NAME="${1#*=}" ;;
      --queued_resource=*) QUEUED_RESOURCE="${1#*=}" ;;
      --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
      --runtime_version=*) RUNTIME_VERSION="${1#*=}" ;;
      --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
      --dry_run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        ARGS=("$@")
        break
        ;;
      *) script_flag "$1" || die "unknown flag '$1' (see --help)" ;;
    esac
    shift
  done
  if [[ -z "$PROJECT" ]] && command -v gcloud >/dev/null; then
    PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
  fi
  [[ -n "$PROJECT" ]] || die "PROJECT is not set: export PROJECT=... or pass --project=..."
  [[ -n "$QUEUED_RESOURCE" ]] || QUEUED_RESOURCE="${TPU_NAME}-qr"
  if [[ -z "$RUNTIME_VERSION" ]]; then
    RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")" ||
      die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE: no default RUNTIME_VERSION; set RUNTIME_VERSION" \
        "(https://cloud.google.com/tpu/docs/runtimes)"
  fi
}

# A word as the shell reads it back: plain words as they are, others single-quoted (after the
# `=` of a --flag=value).
shell_word() {
  local plain='^[A-Za-z0-9_./=:,@%+-]+$' value
  if [[ "$1" =~ $plain ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^--[A-Za-z0-9_-]+= ]]; then
    value="${1#*=}"
    printf '%s%s' "${BASH_REMATCH[0]}" "${value@Q}"
  else
    printf '%s' "${1@Q}"
  fi
}

shell_line() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    shell_word "$word"
    sep=" "
  done
  echo
}

# run CMD ARGS...: runs it, or under --dry_run prints it as one copy-pasteable line.
run() {
  if ((DRY_RUN)); then
    shell_line "$@"
  else
    "$@"
  fi
}

# on_workers WORKER STATEMENT...: runs the statements, in order, under `bash -c` on worker WORKER (a
# number, or `all`: every worker of a pod slice, at the same time). They are joined by "; " into
# one line ("&" ends a background one without ";"), so each must be complete on its own (write
# `if ...; then ...; fi` in one).
# Flags: https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh
on_workers() {
  local worker="$1" script="$2" statement
  shift 2
  for statement in "$@"; do
    if [[ "$script" == *"&" ]]; then script+=" $statement"; else script+="; $statement"; fi
  done
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker="$worker" --command="bash -c ${script@Q}"
}
