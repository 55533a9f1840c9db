#!/usr/bin/env bash
# Run the same unimm-train command on every worker of a Cloud TPU pod slice (documented; it
# needs a TPU VM and gcloud, so it is not runnable in this repository's CI).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-proj \
#     launch/tpu_pod.sh --config configs/janus_pro_1b_train.py --workdir gs://bucket/run1 \
#                       --config.mesh.fsdp=-1 [--config.key=value ...]
#
# Every worker runs `unimm-train --distributed ...`: jax.distributed.initialize() auto-detects
# the pod's coordinator and process ids; each host feeds its own slice of the global batch.
# The workdir must be shared storage (gs://...), so orbax checkpoints and the Grain iterator
# state of every host land in one place. Re-running the same command resumes. To stop
# cleanly, send SIGTERM to the workers (preemptions do this): they save and exit.
#
# Optional: REPO_DIR (default ~/unimm-jax on the workers, cloned/installed beforehand with
#   pip install -e ".[tpu]" or pip install "jax[tpu]" && pip install -e .),
#   SETUP (a shell command run first on every worker, e.g. "cd ~/unimm-jax && git pull").
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")
REPO_DIR=${REPO_DIR:-~/unimm-jax}
ARGS=$(printf ' %q' "$@")
CMD="set -e; ${SETUP:-true}; cd $REPO_DIR && unimm-train --distributed$ARGS"
exec gcloud alpha compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
  --worker=all --command "$CMD"
