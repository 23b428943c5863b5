"""Multi-process (multi-host) start-up: one call before anything touches a device.

``initialize(...)`` wraps ``jax.distributed.initialize``. With explicit arguments it joins a
cluster of ``num_processes`` processes whose process 0 listens on ``coordinator_address``
(local CPU runs, ``moejax launch``); with none it lets JAX detect the cluster (TPU pod slices,
SLURM, Open MPI, Kubernetes). On CPU, cross-process collectives go through gloo.

After it, ``jax.devices()`` lists the devices of every process, ``jax.local_devices()`` this
process's; each process feeds its own rows of each batch (``moejax.data.batches``) and orbax
writes each checkpoint array once (shard by shard, by the process that owns it).
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, cpu_collectives: str = "gloo") -> None:
    """Join the cluster (idempotent for a process already initialised with the same arguments).

    ``coordinator_address`` ``'host:port'`` of process 0; ``num_processes`` / ``process_id`` this
    job's size and rank. Pass all three, or none to auto-detect on TPU / SLURM / MPI clusters.
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("pass coordinator_address, num_processes and process_id together (got "
                         f"{coordinator_address!r}, {num_processes!r}, {process_id!r}), or none of them to "
                         "auto-detect the cluster")
    if num_processes is not None and not 0 <= int(process_id) < int(num_processes):
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes})")
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def is_primary() -> bool:
    """True in the one process that writes logs, metrics and files that are not checkpoints."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(x):
    """A ``jax.Array`` (possibly spanning several processes, e.g. batch-sharded) -> the full numpy
    array on every process; numpy input is returned as is."""
    import numpy as np

    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicated(x, mesh):
    """The same host value on every process -> one global array replicated over ``mesh``."""
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda idx: x[idx])
