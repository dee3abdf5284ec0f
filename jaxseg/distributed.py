"""Joining the JAX multi-controller runtime when launched as one of several processes."""
from __future__ import annotations

import os

import jax

_ENV = ("JAXSEG_COORDINATOR_ADDRESS", "JAXSEG_NUM_PROCESSES", "JAXSEG_PROCESS_ID")


def _auto_detected() -> bool:
    # Environments where jax.distributed.initialize() finds its own settings.
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               *, timeout_s: int = 300) -> None:
    """Calls jax.distributed.initialize when this is one process of several; no-op otherwise.

    Explicit arguments win, then $JAXSEG_COORDINATOR_ADDRESS / $JAXSEG_NUM_PROCESSES /
    $JAXSEG_PROCESS_ID, then what JAX detects itself (Cloud TPU VMs, SLURM).
    """
    address = coordinator_address or os.environ.get(_ENV[0], "")
    count = num_processes or int(os.environ.get(_ENV[1], "0") or 0)
    pid = process_id if process_id >= 0 else int(os.environ.get(_ENV[2], "-1") or -1)
    if address or count > 1:
        missing = [name for name, value, unset in zip(_ENV, (address, count, pid), ("", 0, -1))
                   if value == unset]
        if missing:
            raise ValueError(
                "a multi-process launch needs the coordinator address, the process count and this "
                f"process's id; missing: {', '.join(missing)} (or the matching --flags)")
        if count > 1:
            jax.distributed.initialize(address, count, pid, initialization_timeout=timeout_s,
                                       heartbeat_timeout_seconds=timeout_s // 5 or 10)
    elif _auto_detected():
        jax.distributed.initialize()


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
