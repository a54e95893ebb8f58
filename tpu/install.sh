#!/usr/bin/env bash
# Installs lumenvq on every worker of the TPU (`--worker=all`): the code (this checkout, or a git
# clone), a Python 3.11 virtual environment with `pip install -e '.[tpu]'`, a check that JAX sees
# every chip of the slice, and optionally a Cloud Storage FUSE mount of a bucket.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL=""
REF="HEAD"
PYTHON_VERSION="3.11"
GCSFUSE_BUCKET=""

usage() {
  cat <<USAGE
Usage: tpu/install.sh [flags]

On every worker of TPU_NAME: puts the code in ~/REMOTE_DIR, makes ~/REMOTE_DIR/.venv (Python
$PYTHON_VERSION through uv, since the TPU images ship an older python3) and installs lumenvq with its
tpu extra (jax[tpu]) into it, then prints each worker's view of the slice (process index, local and
global device counts). Rerunning it updates the code and the packages and keeps the environment.

  --repo_url=URL        git clone URL on the workers (and check out --ref) instead of copying
                        this checkout (its tracked and untracked, not ignored, files)
  --ref=REF             branch, tag or commit of --repo_url            default: HEAD
  --python=VERSION      Python version of the environment              default: 3.11
  --gcsfuse_bucket=B    also install Cloud Storage FUSE and mount gs://B at /mnt/gcs/B on every
                        worker: the shared MODEL_DIR of multi-host runs (tpu/README.md)

$COMMON_USAGE
USAGE
}

script_flag() {
  case "$1" in
    --repo_url=*) REPO_URL="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --python=*) PYTHON_VERSION="${1#*=}" ;;
    --gcsfuse_bucket=*) GCSFUSE_BUCKET="${1#*=}" ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
dir="$(shell_word "$REMOTE_DIR")"

# 1. The code.
if [[ -n "$REPO_URL" ]]; then
  on_workers all "set -euo pipefail" "cd ~" \
    "[ -d $dir/.git ] || git clone $(shell_word "$REPO_URL") $dir" \
    "git -C $dir fetch origin $(shell_word "$REF")" "git -C $dir checkout --detach FETCH_HEAD"
else
  root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
  if ((DRY_RUN)); then
    tarball="/tmp/lumenvq-code.tar.gz"
    echo "git -C $(shell_word "$root") ls-files -z --cached --others --exclude-standard |" \
      "tar -czf $tarball -C $(shell_word "$root") --null --files-from=-"
  else
    tarball="$(mktemp --suffix=.tar.gz)"
    trap 'rm -f "$tarball"' EXIT
    # Files deleted from the worktree but still tracked are skipped (--ignore-failed-read).
    git -C "$root" ls-files -z --cached --others --exclude-standard |
      tar -czf "$tarball" -C "$root" --null --files-from=- --ignore-failed-read
  fi
  # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:lumenvq-code.tar.gz" --worker=all \
    --zone="$ZONE" --project="$PROJECT"
  # Everything but the environment and the logs is replaced, so files deleted here go there too.
  on_workers all "set -euo pipefail" "cd ~" "mkdir -p $dir" \
    "find $dir -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +" \
    "tar -xzf lumenvq-code.tar.gz -C $dir" "rm lumenvq-code.tar.gz"
fi

# 2. The environment. jax[tpu] brings libtpu from PyPI (https://docs.jax.dev/en/latest/installation.html);
# jax.distributed.initialize() with no arguments finds the other workers on Cloud TPU
# (https://docs.jax.dev/en/latest/_autosummary/jax.distributed.initialize.html).
check='import jax; jax.distributed.initialize(); print(f"worker {jax.process_index()} of'
check+=' {jax.process_count()}: {jax.local_device_count()} local, {jax.device_count()} global'
check+=' {jax.devices()[0].device_kind} devices")'
on_workers all "set -euo pipefail" "cd ~/$dir" "python3 -m pip install --user --quiet --upgrade uv" \
  "[ -x .venv/bin/python ] || ~/.local/bin/uv venv --python $(shell_word "$PYTHON_VERSION") .venv" \
  "~/.local/bin/uv pip install --python .venv/bin/python --quiet -e \".[tpu]\"" \
  ".venv/bin/python -c ${check@Q}"

# 3. Cloud Storage FUSE: install (https://cloud.google.com/storage/docs/cloud-storage-fuse/install)
# and mount (https://cloud.google.com/storage/docs/cloud-storage-fuse/mount-bucket).
if [[ -n "$GCSFUSE_BUCKET" ]]; then
  bucket="$(shell_word "${GCSFUSE_BUCKET#gs://}")"
  keyring=/usr/share/keyrings/cloud.google.asc
  apt_source="deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main"
  on_workers all "set -euo pipefail" \
    "if ! command -v gcsfuse >/dev/null; then curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $keyring >/dev/null; echo \"$apt_source\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; sudo apt-get update -q; sudo apt-get install -y -q gcsfuse; fi" \
    "sudo mkdir -p /mnt/gcs/$bucket" "sudo chown \"\$(id -u):\$(id -g)\" /mnt/gcs/$bucket" \
    "mountpoint -q /mnt/gcs/$bucket || gcsfuse --implicit-dirs $bucket /mnt/gcs/$bucket" \
    "echo \"gs://$bucket is mounted at /mnt/gcs/$bucket on \$(hostname)\""
fi
