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
override is refused before anything starts, and for train and evaluate so are --coordinator_address,
--num_processes and --process_id (the script gives each process its own).

  -n N        processes (default 2)
  -d D        CPU devices per process (default 2)
  -p PORT     coordinator port on 127.0.0.1 (default: a free port)
  -m MODULE   train (default) = jaxseg.train --config CONFIG --workdir WORKDIR,
              evaluate = jaxseg.evaluate --workdir WORKDIR,
              or any dotted module name, run with ARGS only
  -c CONFIG   training config (default configs/smoke.py)
  -w WORKDIR  (default runs/local_cluster)
  -l LOGDIR   one log per process, process_<i>.log, appended to (default WORKDIR/logs)
  --dry-run   print the commands and stop
  -h, --help  this help

Environment: PYTHON (default .venv/bin/python if present, else python3).
Relative paths are relative to the repository root. Each process appends to its log, after a
'==== DATE local_cluster.sh launch' line (a rerun keeps the earlier logs); process 0's is shown as
it runs. If a process fails, the others are stopped (SIGTERM, then SIGKILL after 10 s). SIGTERM or
Ctrl-C is passed on as SIGTERM (jaxseg.train saves, then exits 75) and the processes are waited
for however long they take; a second one kills them at once. Exit status: 0 when all finished, 75
when all stopped after saving (rerun to resume); otherwise every process's status is listed, the
first to fail first (the others fail after it: of several ending together, one killed by a signal
from outside is taken as the first), and the script exits with its status (130 or 143 when it had
to kill them after Ctrl-C or SIGTERM).

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
    -n|-d|-p|-m|-c|-w|-l)
      [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
      case $1 in
        -n) num=$2 ;; -d) devices=$2 ;; -p) port=$2 ;; -m) module=$2 ;; -c) config=$2 ;;
        -w) workdir=$2 ;; -l) logdir=$2 ;;
      esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # the rest goes to the module (checked below for train)
  esac
done
source launch/train_args.sh
# Other modules check their own flags at start-up, before any cross-process work.
[[ $module != train ]] || check_train_args local_cluster.sh ${1+"$@"}
case $module in  # the modules that join a cluster: their places come from the environment
  train|evaluate|jaxseg.train|jaxseg.evaluate) refuse_process_flags local_cluster.sh ${1+"$@"} ;;
esac
[[ $num =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$num'"
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "-d must be a positive integer, got '$devices'"
[[ -z $port || ($port =~ ^[1-9][0-9]{0,4}$ && $port -le 65535) ]] ||
  die "-p must be a port number (1-65535), got '$port'"
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
# Per process: its exit status once it ended, and the last signal this script sent it.
pids=() statuses=() sent=()
tail_pid=""
interrupted=""  # INT or TERM: the first stop signal this script got
first_failure=""  # the first process seen failing: the cause, the others failing after it
kill_at=""      # when ($SECONDS) to SIGKILL the processes still running after a failure

signal_running() {  # SIG: send SIG to every process still running
  local i
  for i in "${!pids[@]}"; do
    if [[ -z ${statuses[i]-} ]] && kill -"$1" "${pids[i]}" 2>/dev/null; then sent[i]=$1; fi
  done
}
# shellcheck disable=SC2329  # called by the traps below
on_signal() {  # SIG: a stop signal, passed on as SIGTERM (jaxseg.train saves, then exits 75)
  if [[ -z $interrupted ]]; then
    interrupted=$1
    echo "local_cluster.sh: got SIG$1: passing SIGTERM on to the processes and waiting for" \
         "them to stop (jaxseg.train saves a checkpoint first, which may take a validation);" \
         "SIGTERM or Ctrl-C again kills them at once" >&2
    signal_running TERM
  else
    echo "local_cluster.sh: got SIG$1 again: killing the processes" >&2
    signal_running KILL
  fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap '[[ -z $tail_pid ]] || kill "$tail_pid" 2>/dev/null || true' EXIT

# The logs are appended to, after a line per launch: a rerun (to resume, or -m evaluate on the same
# workdir) keeps the earlier runs' logs. offsets[i]: where this launch's part of log i begins.
offsets=()
launched=$(printf '%(%Y-%m-%d %H:%M:%S %z)T' -1)
for ((i = 0; i < num; i++)); do
  [[ -z $interrupted ]] || break  # a stop signal already
  log=$logdir/process_$i.log
  offsets[i]=0
  [[ ! -f $log ]] || offsets[i]=$(($(wc -c <"$log")))
  printf '==== %s local_cluster.sh launch, process %d of %d: %s\n' "$launched" "$i" "$num" \
    "JAXSEG_PROCESS_ID=$i $(printf '%q ' "${cmd[@]}")" >>"$log"
  JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" JAXSEG_COORDINATOR_ADDRESS="127.0.0.1:$port" \
    JAXSEG_NUM_PROCESSES="$num" JAXSEG_PROCESS_ID="$i" "${cmd[@]}" >>"$log" 2>&1 &
  pids[i]=$!
done
((${#pids[@]} > 0)) || exit $((128 + $(kill -l "$interrupted")))  # stopped before any started
# A signal between a start and its pid's record reached no process: pass it on to all now.
[[ -z $interrupted ]] || signal_running TERM
tail -c +$((offsets[0] + 1)) -f "$logdir/process_0.log" &
tail_pid=$!
running=${#pids[@]}

signal_of() {  # STATUS: the name of the signal a status above 128 stands for
  kill -l $(($1 - 128)) 2>/dev/null || echo "$(($1 - 128))"
}
by_us() {  # I: whether process I died of the signal this script sent it, or, after a stop
  # signal to the script, of SIGINT or SIGTERM (a terminal's Ctrl-C reaches it directly)
  local rc=${statuses[$1]}
  ((rc > 128)) || return 1
  [[ $(signal_of "$rc") == "${sent[$1]-}" ]] || [[ -n $interrupted && ($rc == 130 || $rc == 143) ]]
}
failed() {  # I: whether process I failed of itself (not 0, not 75, not stopped by this script)
  [[ ${statuses[$1]} != 0 && ${statuses[$1]} != 75 ]] && ! by_us "$1"
}
describe() {  # I: how process I ended
  local rc=${statuses[$1]} how
  if ((rc == 0)); then how="finished"
  elif ((rc == 75)); then how="stopped after saving"
  elif ((rc > 128)) && [[ $(signal_of "$rc") == "${sent[$1]-}" ]]; then
    how="was killed by this script's SIG$(signal_of "$rc")"
  elif ((rc > 128)); then how="was killed by SIG$(signal_of "$rc")"
  else how="failed"; fi
  echo "process $1 $how (exit $rc)"
}
killed_outright() {  # I: whether process I failed by a signal from outside (SIGKILL, say): the
  # cause of its peers' failures. SIGABRT is JAX aborting a process whose peer failed: an effect.
  failed "$1" && ((statuses[$1] > 128 && statuses[$1] != 134))
}
in_order() {  # I...: the processes I, likeliest cause first: killed outright, then failed by
  # an error of their own, then the rest (aborted by JAX, or ended well)
  local i
  for i; do if killed_outright "$i"; then echo "$i"; fi; done
  for i; do if failed "$i" && ((statuses[i] < 128)); then echo "$i"; fi; done
  for i; do
    if ! killed_outright "$i" && ! { failed "$i" && ((statuses[i] < 128)); }; then echo "$i"; fi
  done
}

while ((running > 0)); do
  ended=()
  for i in "${!pids[@]}"; do  # every process that ended since the last pass, before acting on any
    if [[ -n ${statuses[i]-} ]] || kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
    rc=0; wait "${pids[i]}" 2>/dev/null || rc=$?
    statuses[i]=$rc running=$((running - 1))
    ended+=("$i")
  done
  if ((running > 0 && ${#ended[@]} > 0)); then
    for i in $(in_order "${ended[@]}"); do
      if failed "$i" && [[ -z $first_failure ]]; then
        first_failure=$i
        # The others cannot save without it (a process blocked in a collective may not even
        # notice SIGTERM): SIGTERM, then SIGKILL.
        echo "local_cluster.sh: $(describe "$i"); stopping the others (SIGTERM, then SIGKILL" \
             "after 10 s)" >&2
        signal_running TERM
        kill_at=$((SECONDS + 10))
      elif failed "$i"; then
        echo "local_cluster.sh: $(describe "$i")" >&2
      elif ((statuses[i] == 75)) && [[ -z $kill_at ]]; then
        echo "local_cluster.sh: $(describe "$i"); waiting for the others" >&2
      fi
    done
  fi
  if ((running > 0)) && [[ -n $kill_at ]] && ((SECONDS >= kill_at)); then
    echo "local_cluster.sh: killing the processes still running 10 s after SIGTERM" >&2
    signal_running KILL
    kill_at=""
  fi
  # A terminal's Ctrl-C reaches sleep too: its status must not stop the script (set -e).
  if ((running > 0)); then sleep 0.5 || true; fi
done
sleep 1 || true  # let tail print the end of process 0's log
kill "$tail_pid" 2>/dev/null || true
tail_pid=""

all_finished=1 all_saved=1 clean=1  # clean: every process finished or stopped after saving
for i in "${!pids[@]}"; do
  ((statuses[i] == 0)) || all_finished=""
  ((statuses[i] == 75)) || all_saved=""
  ((statuses[i] == 0 || statuses[i] == 75)) || clean=""
done
if [[ -n $all_finished ]]; then
  echo "all $num processes finished; logs in $logdir/"
  exit 0
fi
if [[ -n $all_saved ]]; then  # jaxseg.train's status after a stop signal and a committed save
  echo "local_cluster.sh: all $num processes stopped after saving (exit 75): rerun the same" \
       "command to resume; logs in $logdir/" >&2
  exit 75
fi
# The cause: the first process seen failing (the others then fail in their next collective, or
# JAX aborts them), of those that ended together one killed outright first.
cause=$first_failure
if [[ -z $cause ]]; then
  for i in $(in_order "${!pids[@]}"); do
    if failed "$i"; then cause=$i; break; fi
  done
fi
[[ -z $cause ]] || echo "local_cluster.sh: $(describe "$cause")" >&2
for i in $(in_order "${!pids[@]}"); do
  [[ $i == "$cause" ]] || echo "local_cluster.sh: $(describe "$i")" >&2
done
if [[ -n $cause ]]; then
  status=${statuses[cause]} why="process $cause's status"
  echo "--- the end of $logdir/process_$cause.log, from this launch's '==== $launched' line on" \
       "(earlier launches' logs are above it) ---" >&2
  tail -c +$((offsets[cause] + 1)) "$logdir/process_$cause.log" | tail -n 30 >&2
elif [[ -n $clean ]]; then  # some finished, some stopped after saving: a rerun resumes them
  status=75 why="rerun the same command to resume"
else  # no failure of their own, yet not all saved: this script killed them after a stop signal
  status=$((128 + $(kill -l "$interrupted")))  # 130 after Ctrl-C, 143 after SIGTERM
  why="SIG$interrupted, and not every process stopped after saving: a rerun resumes from the"
  why+=" last complete checkpoint"
fi
echo "local_cluster.sh: exit $status ($why); logs in $logdir/" >&2
exit "$status"
