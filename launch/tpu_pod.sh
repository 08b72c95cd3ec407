#!/usr/bin/env bash
# One run on every worker of a Cloud TPU VM pod (JAX's multi-controller runtime; the workers find
# each other through the TPU metadata: `--cluster auto`).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE -m launch.train --config configs/X.py --workdir gs-or-nfs/W
#
# Runs `cd $REMOTE_DIR && $REMOTE_PYTHON <python args...> --cluster auto` on all workers with
# `gcloud compute tpus tpu-vm ssh --worker=all` (REMOTE_DIR default: ~/dplora_jax, the checkout
# on every worker; REMOTE_PYTHON default: .venv/bin/python). The workdir must be shared by the
# workers (NFS/Filestore or a GCS FUSE mount): orbax saves from every process into it, and only
# process 0 writes metrics, TensorBoard and the summary. The config is the same as on one device;
# only mesh.fsdp decides how many devices split the frozen base weights.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE <python args...>" >&2
  exit 2
fi
TPU=$1
ZONE=$2
shift 2
REMOTE_DIR=${REMOTE_DIR:-"~/dplora_jax"}
REMOTE_PYTHON=${REMOTE_PYTHON:-.venv/bin/python}
ARGS=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "cd $REMOTE_DIR && $REMOTE_PYTHON $ARGS --cluster auto"
