"""Joining the JAX multi-controller runtime when launched as one of several processes."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import sys

import jax
import numpy as np

_ENV = ("JAXSEG_COORDINATOR_ADDRESS", "JAXSEG_NUM_PROCESSES", "JAXSEG_PROCESS_ID")
HEARTBEAT_ENV = "JAXSEG_HEARTBEAT_TIMEOUT_S"
# "auto": let jax.distributed.initialize() find the cluster itself. A Cloud TPU VM pod slice needs
# it: JAX reads its hosts from the VM's metadata server, which nothing in the environment shows.
AUTO_ENV = "JAXSEG_DISTRIBUTED"


def _auto_detected() -> bool:
    # Environments where jax.distributed.initialize() finds its own settings.
    if os.environ.get(AUTO_ENV) == "auto" or _slurm_step_tasks() > 1:
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))  # GKE TPU pods


def _slurm_step_tasks() -> int:
    """The task count of the srun job step this process is a task of; 1 outside a step."""
    # A batch script or an salloc shell holds its allocation's SLURM_NTASKS but is no task of it:
    # a program started there directly is one process, and JAX's SLURM detection, which reads the
    # step's node list, finds no cluster ("coordinator_address should be defined").
    if "SLURM_STEP_NODELIST" not in os.environ:
        return 1
    return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               *, timeout_s: int = 300) -> None:
    """Calls jax.distributed.initialize when this is one process of several; no-op otherwise.

    Explicit arguments win, then $JAXSEG_COORDINATOR_ADDRESS / $JAXSEG_NUM_PROCESSES /
    $JAXSEG_PROCESS_ID, then what JAX detects itself: in a SLURM job step (srun) of several
    tasks, in GKE TPU pods, and wherever $JAXSEG_DISTRIBUTED=auto (Cloud TPU VM pod slices). In a
    run of several processes, one that stops sending heartbeats for `heartbeat_timeout_s()`
    seconds (JAX's own 100 s where JAX finds the cluster itself and $JAXSEG_HEARTBEAT_TIMEOUT_S
    is unset) counts as dead and the others stop, and an uncaught exception ends this process at
    once (so that the others stop too instead of waiting for it).
    """
    try:
        address = coordinator_address or os.environ.get(_ENV[0], "")
        count = num_processes or _env_int(_ENV[1], 0)
        pid = process_id if process_id >= 0 else _env_int(_ENV[2], -1)
        # Either was ignored without a word: the process trained (into its workdir) alone.
        if count < 0:
            raise ValueError(f"the process count must be at least 1, got {count}")
        if pid > 0 and not (address or count > 1):
            raise ValueError(f"process id {pid} is one of several processes, but neither a "
                             "coordinator address nor a process count above 1 is given "
                             f"({_ENV[0]}, {_ENV[1]} or the matching --flags)")
        if address or count > 1:
            missing = [name for name, value, unset in zip(_ENV, (address, count, pid), ("", 0, -1))
                       if value == unset]
            if missing:
                raise ValueError(
                    "a multi-process launch needs the coordinator address, the process count and "
                    f"this process's id; missing: {', '.join(missing)} (or the matching --flags)")
            if not 0 <= pid < count:
                raise ValueError(f"process id {pid} must be from 0 to {count - 1}, one less than "
                                 f"the process count {count}")
            # Without a port JAX failed with an IndexError; with a bad one process 0 crashed
            # (SIGSEGV) and the others aborted after the whole start-up timeout.
            port = re.fullmatch(r".+:([0-9]{1,5})", address)
            if not port or not 0 < int(port[1]) <= 65535:
                raise ValueError(f"the coordinator address must be HOST:PORT, process 0's host "
                                 f"and a free port from 1 to 65535 (e.g. 10.0.0.1:8476), got "
                                 f"{address!r}")
        heartbeat = heartbeat_timeout_s(timeout_s) if count > 1 or os.environ.get(
            HEARTBEAT_ENV) else None
        # JAX's coordinator on a port another program holds crashed process 0 (SIGSEGV), and
        # the others waited for it through the whole start-up timeout.
        if (count > 1 and pid == 0 and "JAX_COORDINATOR_BIND_ADDRESS" not in os.environ
                and (why := _port_taken(int(address.rsplit(":", 1)[1])))):
            raise ValueError(f"process 0 cannot serve the coordinator on {address} {why}; "
                             "choose another")
    except ValueError as e:  # a launch mistake, before any process waits for this one
        raise SystemExit(f"error: {e}") from None
    if address or count > 1:
        if count > 1:
            jax.distributed.initialize(address, count, pid, initialization_timeout=timeout_s,
                                       heartbeat_timeout_seconds=heartbeat)
            _stop_all_on_failure(pid, count, heartbeat)
    elif _auto_detected():
        jax.distributed.initialize(**({"heartbeat_timeout_seconds": heartbeat} if heartbeat else {}))
        _stop_all_on_failure(jax.process_index(), jax.process_count(), heartbeat)
    if not jax.distributed.is_initialized() and jax.process_count() > 1:
        # A TPU runtime can span hosts on its own; checkpointing and collectives would then fail
        # later, deep in orbax, for want of JAX's distributed client.
        raise SystemExit(
            f"error: this process is one of {jax.process_count()}, but JAX's distributed runtime "
            f"was not started: set {AUTO_ENV}=auto on every host (launch/tpu_vm.sh does) or pass "
            "--coordinator_address, --num_processes and --process_id")


def _port_taken(port: int) -> str | None:
    """Why a server could not listen on PORT of every address here, as JAX's coordinator does
    (another program listens there, or the port is privileged); None where it can."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family) as s:
                # As gRPC does: a port an earlier run left in TIME_WAIT is free to it.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            return None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"({e.strerror}): another program, or another run's process 0, holds "
                        "that port")
            if e.errno == errno.EACCES:  # held by no one: "another program" misled
                return (f"({e.strerror}): this user may not listen on it (ports below 1024 "
                        "need root)")
    return None  # no IPv6 nor IPv4 here to try: JAX will say what it finds


def _env_int(name: str, unset: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else unset
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def heartbeat_timeout_s(timeout_s: int = 300) -> int:
    """Seconds without a heartbeat after which a process counts as dead and the others stop.

    $JAXSEG_HEARTBEAT_TIMEOUT_S when set (tests use ~10 s), else a fifth of the start-up timeout.
    """
    value = os.environ.get(HEARTBEAT_ENV, "")
    if value:
        try:
            seconds = int(value)
        except ValueError:
            seconds = 0
        if seconds < 1:
            raise ValueError(
                f"${HEARTBEAT_ENV} must be a positive number of seconds, got {value!r}")
        return seconds
    return timeout_s // 5 or 10


# What a failed cross-process operation says when the cause is another process, not this one.
_PEER_FAILURE = re.compile(r"gloo|connection (closed|reset)|unavailable|heartbeat|"
                           r"deadline_exceeded|barrier|coordination service|socket closed",
                           re.IGNORECASE)


def _stop_all_on_failure(index: int, count: int, heartbeat_s: int | None) -> None:
    """Makes an uncaught exception end this process at once, with a line saying what it means.

    Left alone, a process whose Python code raises waits at exit in JAX's shutdown barrier for
    the others, which wait in their next collective for it: the whole run hangs. Exiting at once
    closes its connections, so the others' collectives fail (or, if it was process 0, they lose
    the coordinator) and they stop too, each through this same hook; a process that is killed
    outright is noticed by the others' collectives or, at the latest, by the heartbeat timeout.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            if issubclass(exc_type, RunError):  # exit_with_error's message says it all
                print(exc, file=sys.stderr)
            else:
                previous(exc_type, exc, tb)
            if _PEER_FAILURE.search(f"{exc_type.__name__}: {exc}"):
                why = ("a cross-process operation failed: another process of this run probably "
                       "died or was killed; its log has the first error")
            else:
                latest = f" (at the latest after the {heartbeat_s} s heartbeat timeout)" if (
                    heartbeat_s) else ""
                why = ("the error above is this process's own; the other processes stop when "
                       f"their next cross-process operation fails{latest}")
            print(f"jaxseg: process {index} of {count} is stopping: {why}.", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(130 if issubclass(exc_type, KeyboardInterrupt) else 1)

    sys.excepthook = hook


class RunError(RuntimeError):
    """An error exit_with_error raises in a run of several processes (printed without traceback)."""


def exit_with_error(message: str):
    """Ends the program with MESSAGE, without a traceback.

    One process of several raises RunError instead, so that the failure hook stops it at once: a
    SystemExit would wait in JAX's shutdown barrier for the others, which wait for it in their
    next cross-process operation (an error met by one process alone would hang the run).
    """
    if jax.process_count() > 1:
        raise RunError(message) from None
    raise SystemExit(message)


def disagreement(items: dict[str, str]) -> str | None:
    """Which of ITEMS (a name -> this process's value as text, the same names in the same order on
    every process) differ between the processes, each with the processes whose value is not
    process 0's, as one phrase; None where all agree, as always for a single process.

    A cross-process operation: every process must call it at the same point.
    """
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    digests = np.stack([np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
                        for value in items.values()])
    gathered = multihost_utils.process_allgather(digests)  # (processes, items, 32)
    parts = []
    for k, name in enumerate(items):
        others = [p for p in range(1, len(gathered))
                  if not np.array_equal(gathered[p, k], gathered[0, k])]
        if others:
            parts.append(f"{name} (process{'es' if len(others) > 1 else ''} "
                         f"{', '.join(map(str, others))} against process 0)")
    return "; ".join(parts) or None


def define_flags() -> None:
    """The absl flags every multi-process entry point takes (read by `initialize`)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
    flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", -1, "This process's id (multi-process runs).")


def is_main_process() -> bool:
    """True on process 0, which alone logs, reports and writes files beside checkpoints."""
    return jax.process_index() == 0


def main_process_first(fn):
    """Runs `fn` on process 0, then on the others once it is done (e.g. preparing shared data)."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if is_main_process() else None
    multihost_utils.sync_global_devices("jaxseg:main_process_first")
    return result if is_main_process() else fn()
