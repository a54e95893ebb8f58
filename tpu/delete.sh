#!/usr/bin/env bash
# Deletes the TPU that tpu/create.sh made (the queued resource and its node, or the TPU VM).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DIRECT=0
YES=0

usage() {
  cat <<USAGE
Usage: tpu/delete.sh [flags]

Deletes the queued resource QUEUED_RESOURCE together with its node TPU_NAME (--force), or with
--direct the TPU VM TPU_NAME (made by tpu/create.sh --direct). Files on the workers' disks go
with them; what is in Cloud Storage stays. gcloud asks for confirmation unless --yes.

  --direct   delete the TPU VM (gcloud compute tpus tpu-vm delete)
  --yes      do not ask (gcloud --quiet)

$COMMON_USAGE
USAGE
}

script_flag() {
  case "$1" in
    --direct) DIRECT=1 ;;
    --yes) YES=1 ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
quiet=()
((YES)) && quiet=(--quiet)

if ((DIRECT)); then
  # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/delete
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" "${quiet[@]}"
else
  # --force deletes the running node first: https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete
  run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" \
    --project="$PROJECT" --force "${quiet[@]}"
fi
