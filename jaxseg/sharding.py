"""Device mesh and sharding helpers: the one place that knows how arrays are laid out.

Parameters are replicated; batches are sharded on the leading axis over the mesh axis 'data'.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all (or the first `num_devices`) global devices, axis 'data'."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if n > len(devices):
        raise ValueError(f"asked for {n} devices but only {len(devices)} are available")
    # Auto axes: XLA propagates the batch sharding and inserts the gradient all-reduce itself.
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of a global batch (its devices' part)."""
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return global_batch * local_devices // mesh.devices.size


def local_batch_slice(global_batch: int, mesh: Mesh) -> slice:
    """The rows of the global batch that live on this process's devices.

    Devices of one process are contiguous in `jax.devices()` order, which `make_mesh` keeps,
    so each process owns one contiguous block of rows.
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
