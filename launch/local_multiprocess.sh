#!/usr/bin/env bash
# One multi-process JAX run on this machine: NPROC CPU processes on 127.0.0.1, DEVICES_PER_PROC
# devices each, every one running `python <python args...>` (e.g. a launch.train command).
#
#   bash launch/local_multiprocess.sh 2 4 -m launch.train --config configs/tiny.py --workdir W
#
# Process 0 prints to this terminal; process I>0 writes LOG_DIR/process_I.log (LOG_DIR defaults to
# a new temporary directory, printed first). The first process to fail stops the others; the exit
# status is that process's (0 when all succeed). Interrupting this script stops every process.
# PYTHON picks the interpreter (default: python). Used by the tests; on real hosts use
# launch/tpu_pod.sh or launch/slurm.sbatch (the same flags, one process per host).
set -u

if [ $# -lt 3 ]; then
  echo "usage: $0 NPROC DEVICES_PER_PROC <python args...>" >&2
  exit 2
fi
NPROC=$1
DEVICES=$2
shift 2
case "$NPROC$DEVICES" in
  *[!0-9]*) echo "error: NPROC and DEVICES_PER_PROC must be positive integers" >&2; exit 2 ;;
esac
if [ "$NPROC" -lt 1 ] || [ "$DEVICES" -lt 1 ]; then
  echo "error: NPROC and DEVICES_PER_PROC must be positive integers" >&2
  exit 2
fi
PY=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t dplora_mp.XXXXXX)}
mkdir -p "$LOG_DIR"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "[local_multiprocess] $NPROC processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT, logs of processes 1.. in $LOG_DIR"

# DEVICES_PER_PROC decides the device count: drop a forced host device count from XLA_FLAGS
XLA_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/ +/ /g; s/^ //; s/ $//')
if [ -n "$XLA_FLAGS" ]; then export XLA_FLAGS; else unset XLA_FLAGS; fi
export JAX_PLATFORMS=cpu

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ((i = 0; i < NPROC; i++)); do
  if [ "$i" -eq 0 ]; then
    DPLORA_COORDINATOR=127.0.0.1:$PORT DPLORA_NUM_PROCESSES=$NPROC DPLORA_PROCESS_ID=$i \
      DPLORA_LOCAL_DEVICES=$DEVICES "$PY" "$@" &
  else
    DPLORA_COORDINATOR=127.0.0.1:$PORT DPLORA_NUM_PROCESSES=$NPROC DPLORA_PROCESS_ID=$i \
      DPLORA_LOCAL_DEVICES=$DEVICES "$PY" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
left=$NPROC
declare -A done_
while [ "$left" -gt 0 ] && [ "$status" -eq 0 ]; do
  for p in "${pids[@]}"; do
    if [ -z "${done_[$p]:-}" ] && ! kill -0 "$p" 2>/dev/null; then
      wait "$p"
      rc=$?
      done_[$p]=1
      left=$((left - 1))
      if [ "$rc" -ne 0 ]; then
        status=$rc
        echo "[local_multiprocess] a process exited with status $rc; stopping the others" >&2
        for ((i = 1; i < NPROC; i++)); do
          echo "--- process $i (last lines of $LOG_DIR/process_$i.log)" >&2
          tail -n 5 "$LOG_DIR/process_$i.log" >&2
        done
        break
      fi
    fi
  done
  sleep 0.2
done
exit $status
