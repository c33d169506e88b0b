#!/bin/bash
# Training on a Cloud TPU pod slice: runs the same command on every host of the slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/flux_sga.py /mnt/runs/flux_sga [--config.a.b=v ...]
#
# Every host needs this repository at the same path (REPO, default ~/sga-jax) with its .venv.
# On the hosts, TPU_WORKER_HOSTNAMES lists the slice's workers, so
# sga_jax.parallel.initialize_distributed() calls jax.distributed.initialize(), which finds the
# coordinator and process ids itself. A maintenance event sends SIGTERM: the run saves a checkpoint
# and exits 0; rerunning this script resumes from it. WORKDIR must be one directory that every host
# sees (NFS / Filestore, or a GCS bucket mounted at the same path with gcsfuse).
set -euo pipefail

if [ "$#" -lt 4 ]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.a.b=v ...]" >&2
  exit 64
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4
REPO=${REPO:-~/sga-jax}

ARGS=$(printf ' %q' --config "$CONFIG" --workdir "$WORKDIR" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && .venv/bin/python -m sga_jax.train$ARGS"
