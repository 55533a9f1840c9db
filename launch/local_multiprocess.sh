#!/usr/bin/env bash
# N local processes of the same unimm-train command, joined by jax.distributed on localhost
# with CPU (gloo) collectives: a multi-host run on one machine.
#
#   launch/local_multiprocess.sh N --config configs/NAME.py --workdir W [--config.key=value ...]
#
# Each process gets UNIMM_COORDINATOR / UNIMM_NUM_PROCESSES / UNIMM_PROCESS_ID (read by
# unimm-train) and, unless XLA_FLAGS is set, --xla_force_host_platform_device_count=$DEVICES
# (default 1) CPU devices. Logs go to W/logs/process_<i>.log; the script exits with the first
# non-zero status. PORT (default 23456) picks the coordinator port.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 N --config configs/NAME.py --workdir W [--config.key=value ...]" >&2
  exit 2
fi
N=$1; shift
PORT=${PORT:-23456}
DEVICES=${DEVICES:-1}
WORKDIR=""
for a in "$@"; do case "$a" in --workdir=*) WORKDIR="${a#--workdir=}";; esac; done
prev=""
for a in "$@"; do [[ "$prev" == "--workdir" ]] && WORKDIR="$a"; prev="$a"; done
LOGDIR=${WORKDIR:-.}/logs
mkdir -p "$LOGDIR"
PYTHON=${PYTHON:-python}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS=${XLA_FLAGS:---xla_force_host_platform_device_count=$DEVICES} \
  UNIMM_COORDINATOR=localhost:$PORT UNIMM_NUM_PROCESSES=$N UNIMM_PROCESS_ID=$i \
    "$PYTHON" -m unimm_jax.cli.train "$@" >"$LOGDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  if ! wait "$p"; then status=$?; fi
done
if [[ $status -ne 0 ]]; then
  echo "a process failed (status $status); see $LOGDIR/process_*.log" >&2
fi
exit $status
