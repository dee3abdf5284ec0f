#!/usr/bin/env bash
# N JAX processes on this machine, each with D CPU devices, joined into one cluster on 127.0.0.1:
# the multi-process code path (jax.distributed, per-process data slices, cross-process collectives)
# without a cluster. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_cluster.sh [options] [--] [ARGS...]

Starts N processes of `python -m MODULE` on this machine as one JAX cluster (CPU only).
ARGS go to the module (e.g. --config.train.num_steps=100); for train, an ARG that is not a config
override (or a multi-process flag) is refused before anything starts.

  -n N        processes (default 2)
  -d D        CPU devices per process (default 2)
  -p PORT     coordinator port on 127.0.0.1 (default: a free port)
  -m MODULE   train (default) = jaxseg.train --config CONFIG --workdir WORKDIR,
              evaluate = jaxseg.evaluate --workdir WORKDIR,
              or any dotted module name, run with ARGS only
  -c CONFIG   training config (default configs/smoke.py)
  -w WORKDIR  (default runs/local_cluster)
  -l LOGDIR   one log per process, process_<i>.log (default WORKDIR/logs)
  --dry-run   print the commands and stop
  -h, --help  this help

Environment: PYTHON (default .venv/bin/python if present, else python3).
Relative paths are relative to the repository root. Process 0's log is shown as it runs; if any
process fails, the others are stopped and the script exits with the failing process's status.

Examples:
  launch/local_cluster.sh                                  # 2 processes x 2 devices, smoke config
  launch/local_cluster.sh -n 4 -d 1 -- --config.train.num_steps=40
  launch/local_cluster.sh -m evaluate -- --dataset ccp_person --split test
EOF
}

die() { echo "local_cluster.sh: error: $*" >&2; exit 2; }

cd "$(dirname "$0")/.."
num=2 devices=2 port="" module=train config=configs/smoke.py workdir=runs/local_cluster logdir=""
dry_run=""
while (($#)); do
  case $1 in
    -n) num=${2:?-n needs a value}; shift 2 ;;
    -d) devices=${2:?-d needs a value}; shift 2 ;;
    -p) port=${2:?-p needs a value}; shift 2 ;;
    -m) module=${2:?-m needs a value}; shift 2 ;;
    -c) config=${2:?-c needs a value}; shift 2 ;;
    -w) workdir=${2:?-w needs a value}; shift 2 ;;
    -l) logdir=${2:?-l needs a value}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # the rest goes to the module (checked below for train)
  esac
done
source launch/train_args.sh
# Other modules check their own flags at start-up, before any cross-process work.
[[ $module != train ]] || check_train_args local_cluster.sh ${1+"$@"}
[[ $num =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$num'"
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "-d must be a positive integer, got '$devices'"
[[ -z $port || $port =~ ^[0-9]+$ ]] || die "-p must be a port number, got '$port'"
logdir=${logdir:-$workdir/logs}

python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
command -v "$python" >/dev/null || die "python not found ('$python'); set PYTHON or create .venv"

case $module in
  train) [[ -f $config ]] || die "config not found: $config"
         cmd=("$python" -m jaxseg.train --config "$config" --workdir "$workdir") ;;
  evaluate) cmd=("$python" -m jaxseg.evaluate --workdir "$workdir") ;;
  *) cmd=("$python" -m "$module") ;;
esac
cmd+=(${1+"$@"})

if [[ -z $port ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g')"
xla_flags="${xla_flags# } --xla_force_host_platform_device_count=$devices"

echo "local cluster: $num processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $logdir/"
echo "each runs: JAX_PLATFORMS=cpu XLA_FLAGS='${xla_flags# }' JAXSEG_COORDINATOR_ADDRESS=127.0.0.1:$port" \
     "JAXSEG_NUM_PROCESSES=$num JAXSEG_PROCESS_ID=<i> $(printf '%q ' "${cmd[@]}")"
[[ -z $dry_run ]] || exit 0

mkdir -p "$logdir"
pids=()
tail_pid=""
stop_all() {  # TERM (train.py checkpoints on SIGTERM), then KILL whatever is left after 10 s
  local pid alive _
  for pid in ${pids[@]+"${pids[@]}"}; do [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 20); do
    alive=""
    for pid in ${pids[@]+"${pids[@]}"}; do [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ -n $alive ]] || break
    sleep 0.5
  done
  for pid in ${pids[@]+"${pids[@]}"}; do [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true; done
  [[ -z $tail_pid ]] || kill "$tail_pid" 2>/dev/null || true
}
trap 'echo "interrupted: stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  : >"$logdir/process_$i.log"
  JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" JAXSEG_COORDINATOR_ADDRESS="127.0.0.1:$port" \
    JAXSEG_NUM_PROCESSES="$num" JAXSEG_PROCESS_ID="$i" "${cmd[@]}" >"$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -f "$logdir/process_0.log" &
tail_pid=$!

failed="" status=0 remaining=$num
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then continue; fi  # empty or running
    rc=0; wait "$pid" || rc=$?
    pids[i]="" remaining=$((remaining - 1))
    if ((rc != 0)); then failed=$i status=$rc; break 2; fi
  done
  sleep 0.5
done
sleep 1  # let tail print the end of process 0's log
if [[ -n $failed ]]; then
  if ((status == 75)); then  # jaxseg.train's status after a stop signal and a committed save
    echo "process $failed stopped after saving (exit 75): rerun the same command to resume" >&2
  else
    echo "process $failed failed (exit $status); stopping the others" >&2
  fi
  stop_all
  echo "--- last lines of $logdir/process_$failed.log ---" >&2
  tail -n 30 "$logdir/process_$failed.log" >&2
  exit "$status"
fi
kill "$tail_pid" 2>/dev/null || true
echo "all $num processes finished; logs in $logdir/"
