"""Scale-out with JAX's own runtime: the task axis sharded across devices, and across processes.

One code path serves a laptop, a multi-GPU box and a multi-host cluster:

* ``task_mesh()`` is a 1-D ``jax.sharding.Mesh`` named ``"tasks"`` over every device of the job (all
  processes' devices after ``initialize``). The training step samples the whole meta-batch inside the
  jitted program and constrains it to ``P("tasks")`` (``shard_tasks``): each device computes its share
  of the tasks — sampling included, since ``jax.random`` is partitionable — while parameters and
  optimiser state stay replicated (``P()``). The meta-gradient's mean over tasks then needs a
  cross-device sum, which XLA's partitioner inserts from the shardings: there is no hand-written
  all-reduce.
* ``initialize(...)`` wraps ``jax.distributed.initialize`` (coordinator address, process count and
  id from arguments, or from what JAX detects: ``JAX_COORDINATOR_ADDRESS``, SLURM, Open MPI, TPU
  pods), with bounded timeouts and CPU collectives over gloo, then checks that every process agrees
  on the settings (``check_same_everywhere``).
* Each process runs the same program on the same keys; the union of the processes' task shards is
  exactly the single-process meta-batch. Only process 0 writes logs, checkpoints, evaluation and
  plots (``is_writer``); every process reads the checkpoint on resume.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jmaml.engine import checkpoint

TASK_AXIS = "tasks"


class DistributedError(RuntimeError):
    """The processes of a distributed run could not start or do not agree."""


def task_mesh(num_devices: int | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh named ``"tasks"`` over ``devices`` (default: the first ``num_devices`` of
    ``jax.devices()``, all of them by default — every process's devices in a distributed job)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be an int in [1, {len(devices)}] (the devices JAX sees), "
                             f"got {num_devices!r}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (TASK_AXIS,))


def check_divisible(meta_batch_size: int, mesh: Mesh, name: str = "meta_batch_size") -> None:
    """The meta-batch must split evenly over the mesh's devices."""
    n = mesh.devices.size
    if meta_batch_size % n:
        down, up = meta_batch_size - meta_batch_size % n, meta_batch_size + n - meta_batch_size % n
        raise ValueError(f"{name} = {meta_batch_size} is not divisible by the {n} devices the task axis is "
                         f"sharded over; use a multiple of {n} (e.g. {down or n} or {up}) or fewer devices")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def task_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(TASK_AXIS))


def shard_tasks(tasks: Any, mesh: Mesh | None) -> Any:
    """Inside ``jit``: constrains every leaf's leading (task) axis to be split over the mesh."""
    if mesh is None or mesh.devices.size == 1:
        return tasks
    return jax.lax.with_sharding_constraint(tasks, task_sharding(mesh))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Inside ``jit``: constrains every leaf to be replicated (e.g. per-task metrics for the host)."""
    if mesh is None or mesh.devices.size == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def put_replicated(tree: Any, mesh: Mesh | None) -> Any:
    """Places a host tree (the same value in every process) on every device of the mesh."""
    if mesh is None or mesh.devices.size == 1:
        return tree
    sharding = replicated(mesh)

    def one(x):
        is_key = isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        host = np.asarray(jax.random.key_data(x) if is_key else x)
        # make_array_from_callback works whether or not the mesh spans other processes' devices
        out = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.random.wrap_key_data(out, impl=jax.random.key_impl(x)) if is_key else out

    return jax.tree.map(one, tree)


def to_host(tree: Any) -> Any:
    """Device arrays to host values; a replicated array spanning other processes' devices is read
    from this process's own copy."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if not x.sharding.is_fully_replicated:
            raise ValueError(f"an array of shape {x.shape} is sharded across processes; gather or replicate "
                             "it inside the jitted program first")
        return jax.device_get(x.addressable_data(0))

    return jax.tree.map(one, tree)


def is_writer() -> bool:
    """Whether this process writes files (logs, checkpoints, plots): process 0 only."""
    return jax.process_index() == 0


_ADDRESS = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 60, heartbeat_timeout_s: int = 20) -> None:
    """Starts JAX's multi-controller runtime for this process (once, before any other JAX work).

    Arguments left ``None`` come from the environment as JAX detects it (``JAX_COORDINATOR_ADDRESS``,
    SLURM, Open MPI, TPU pods). CPU collectives use gloo. ``timeout_s`` bounds the wait for the
    coordinator and the other processes; a process that stops answering for ``heartbeat_timeout_s``
    makes the others stop with an error instead of waiting forever.

    Raises:
      ValueError: malformed address, count or id (checked before anything starts).
      DistributedError: the coordinator is unreachable or the processes did not all arrive in time.
    """
    if coordinator_address is not None and (not isinstance(coordinator_address, str)
                                            or not _ADDRESS.match(coordinator_address)):
        raise ValueError(f"coordinator address must look like HOST:PORT, got {coordinator_address!r}")
    if num_processes is not None and (isinstance(num_processes, bool) or not isinstance(num_processes, int)
                                      or num_processes < 1):
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if process_id is not None:
        if isinstance(process_id, bool) or not isinstance(process_id, int) or process_id < 0:
            raise ValueError(f"process_id must be an int >= 0, got {process_id!r}")
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(f"process_id {process_id} is out of range for {num_processes} processes (0.."
                             f"{num_processes - 1})")
    for name, value in (("timeout_s", timeout_s), ("heartbeat_timeout_s", heartbeat_timeout_s)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (seconds), got {value!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and process_id not in (None, 0):
        # JAX's runtime aborts the whole process (a C++ fatal error, no exception) when the coordinator
        # does not answer in time; check that it listens first, so the error can say what is wrong.
        _wait_for_coordinator(address, timeout_s)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    except Exception as e:  # JAX raises several types here (RuntimeError, XlaRuntimeError, ValueError)
        where = coordinator_address or "the coordinator from the environment"
        raise DistributedError(f"could not join the distributed job at {where} as process {process_id} of "
                               f"{num_processes} within {timeout_s} s: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else e!r}") from e
    if num_processes is not None and jax.process_count() != num_processes:
        raise DistributedError(f"this process was started for {num_processes} processes but the job has "
                               f"{jax.process_count()}")


def broadcast_from_writer(tree: Any) -> Any:
    """Every process gets process 0's value of a host tree (e.g. the state it restored from its
    checkpoint), so only process 0 needs to see the run dir. A no-op in a 1-process job."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    is_key = [jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) for leaf in leaves]
    got = multihost_utils.broadcast_one_to_all(checkpoint.host_leaves(leaves))
    out = [jax.random.wrap_key_data(jnp.asarray(g), impl=jax.random.key_impl(leaf)) if k else jnp.asarray(g)
           for g, leaf, k in zip(got, leaves, is_key)]
    return jax.tree.unflatten(treedef, out)


def broadcast_int(value: int) -> int:
    """Process 0's ``value`` on every process (a no-op in a 1-process job)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"could not join the distributed job at {address}: nothing answered there "
                                       f"within {timeout_s} s ({e}); is process 0 running, and is the address "
                                       "reachable from this host?") from None
            time.sleep(0.25)


def check_same_everywhere(description: str, value: str) -> None:
    """Raises on every process unless all processes pass the same ``value`` (e.g. the settings, the
    process count they were started with). One small collective; a no-op in a 1-process job."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], dtype=np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(digest))
    if not (everyone == everyone[0]).all():
        differ = [i for i in range(everyone.shape[0]) if not (everyone[i] == everyone[0]).all()]
        raise DistributedError(f"the processes disagree on {description}: processes {differ} differ from "
                               "process 0; start every process with the same settings")
