"""Device mesh and sharding helpers: the one place that knows how arrays are laid out.

Parameters are replicated; batches are sharded on the leading axis over the mesh axis 'data'.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def choose_devices(devices, num_devices: int | None, process_count: int) -> list:
    """NUM_DEVICES (default all) of DEVICES, the same number from each of the PROCESS_COUNT
    processes (the first of each by id), ordered by process."""
    n = len(devices) if num_devices is None else num_devices
    asked = f"all {n} devices" if num_devices is None else f"{n} devices"
    if n < 1:
        raise ValueError(f"asked for {n} devices: ask for at least 1")
    if n > len(devices):
        raise ValueError(f"asked for {n} devices but only {len(devices)} are available")
    if n % process_count:
        raise ValueError(f"asked for {asked}, which {process_count} processes cannot share "
                         f"equally: ask for a multiple of {process_count}")
    # Ordered by process, not by jax.make_mesh's physical topology (which can interleave the
    # hosts of a TPU slice): each process then owns one contiguous block of batch rows, which
    # local_batch_slice and the input pipeline rely on.
    by_process = collections.defaultdict(list)
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_process[d.process_index].append(d)
    share = n // process_count
    if len(by_process) != process_count or min(map(len, by_process.values())) < share:
        raise ValueError(f"asked for {asked}, {share} from each of {process_count} processes, "
                         f"but they hold " + ", ".join(
                             f"{len(v)}" for _, v in sorted(by_process.items())))
    return [d for _, v in sorted(by_process.items()) for d in v[:share]]


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all (or `num_devices`) global devices, axis 'data', with each process's
    devices contiguous and every process holding the same number of them."""
    chosen = choose_devices(jax.devices(), num_devices, jax.process_count())
    # Auto axes: XLA propagates the batch sharding and inserts the gradient all-reduce itself.
    return Mesh(np.array(chosen), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def local_device_count(mesh: Mesh) -> int:
    """How many of the mesh's devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of a global batch (its devices' part)."""
    return global_batch * local_device_count(mesh) // mesh.devices.size


def local_batch_slice(global_batch: int, mesh: Mesh) -> slice:
    """The rows of the global batch that live on this process's devices.

    make_mesh puts each process's devices next to each other, so each process owns one
    contiguous block of rows.
    """
    flat = list(mesh.devices.flat)
    per_device = global_batch // len(flat)
    rows = [i for i, d in enumerate(flat) if d.process_index == jax.process_index()]
    return slice(rows[0] * per_device, (rows[-1] + 1) * per_device)


def to_global(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's numpy batch into global arrays sharded on 'data'."""
    sharding = data_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def replicate(tree, mesh: Mesh):
    """Places a pytree of (host-identical) arrays on every device of the mesh, on every process."""
    # Through host memory: a single-device array cannot be moved onto devices of other processes.
    return jax.device_put(jax.device_get(tree), replicated(mesh))


_any = jax.jit(jnp.any)


def any_process_flag(flag: bool, mesh: Mesh) -> jax.Array:
    """A replicated scalar: whether FLAG is True in any process. Dispatched, not waited for:
    read it a step later, and the host need not wait for the step in flight. Every process must
    call it at the same point, as any collective."""
    local = np.full((local_device_count(mesh),), bool(flag))
    return _any(jax.make_array_from_process_local_data(data_sharded(mesh), local))
