#!/usr/bin/env bash
# Creates the Cloud TPU VM (one host) or pod slice (one VM per host) that the other tpu/ scripts use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SPOT=0
DIRECT=0
WAIT=0

usage() {
  cat <<USAGE
Usage: tpu/create.sh [flags] [-- EXTRA_GCLOUD_FLAGS...]

Requests ACCELERATOR_TYPE as a queued resource QUEUED_RESOURCE whose node is TPU_NAME (Google's
recommended way: the request waits in a queue until capacity is free), or with --direct creates
the TPU VM at once (fails when there is no capacity). Flags after -- go to gcloud as they are
(e.g. --service-account=SA --scopes=cloud-platform --data-disk=source=DISK,mode=read-write).

  --spot     a Spot TPU (cheaper, preemptible; lumenvq checkpoints on SIGTERM)
  --direct   gcloud compute tpus tpu-vm create instead of a queued resource
  --wait     poll the queued resource every 60 s until it is ACTIVE (stop on FAILED/SUSPENDED)

$COMMON_USAGE
USAGE
}

script_flag() {
  case "$1" in
    --spot) SPOT=1 ;;
    --direct) DIRECT=1 ;;
    --wait) WAIT=1 ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
spot=()
((SPOT)) && spot=(--spot)

if ((DIRECT)); then
  # https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}" "${ARGS[@]}"
  exit 0
fi

# https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
# https://cloud.google.com/tpu/docs/queued-resources
run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
  --zone="$ZONE" --project="$PROJECT" --accelerator-type="$ACCELERATOR_TYPE" \
  --runtime-version="$RUNTIME_VERSION" "${spot[@]}" "${ARGS[@]}"

((WAIT)) || exit 0
# States: https://cloud.google.com/tpu/docs/queued-resources (WAITING_FOR_RESOURCES, PROVISIONING,
# ACTIVE, FAILED, SUSPENDING, SUSPENDED). describe:
# https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/describe
describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE"
  --project="$PROJECT" --format="value(state.state)")
if ((DRY_RUN)); then
  run "${describe[@]}"
  note "would repeat the line above every 60 s until the state is ACTIVE"
  exit 0
fi
while true; do
  state="$("${describe[@]}")"
  case "$state" in
    ACTIVE)
      note "$QUEUED_RESOURCE is ACTIVE: node $TPU_NAME is ready"
      exit 0
      ;;
    FAILED | SUSPENDING | SUSPENDED)
      die "queued resource $QUEUED_RESOURCE is $state (gcloud compute tpus queued-resources" \
        "describe $QUEUED_RESOURCE says why); tpu/delete.sh removes it"
      ;;
  esac
  note "$QUEUED_RESOURCE is ${state:-not yet listed}; checking again in 60 s"
  sleep 60
done
