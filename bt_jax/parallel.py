"""Devices, global arrays, and the two ways of mapping a per-device step over every device.

The trainer holds global ``jax.Array``s end to end: the state is replicated over a 1-D mesh of
every device of every process (what orbax saves and restores, on one host or many), and each
batch is one array sharded along that mesh, assembled once from each process's rows. A step is
one per-device function ``fn(state, batch, rng) -> (state, outputs)`` over the axis :data:`AXIS`;
:func:`map_step` runs it as

* ``jax.jit(jax.shard_map(fn))`` (``parallelism="shard_map"``, the default), or
* ``jax.pmap(fn)`` (``parallelism="pmap"``), a thin adapter at its own edge: the global arrays
  are viewed as pmap's ``[local_devices, ...]`` layout on the way in and back on the way out, on
  the devices that already hold them (no host copies).

Outputs that the host reads are either replicated (the same on every device: read this
process's copy, :func:`to_host`) or gathered over processes
(``multihost_utils.process_allgather``); never ``jax.device_get`` of an array that spans other
processes' devices, which only works on one host.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"
PARALLELISM = ("shard_map", "pmap")

StepFn = Callable[[Any, Any, jax.Array], tuple[Any, Any]]


def device_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default every device of every process, in process order)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's rows ``{key: [local_batch, ...]}`` -> one global array per key, sharded over
    the mesh; process p's rows are global rows ``[p * local_batch, (p + 1) * local_batch)``."""
    sharding = batch_sharded(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local.items()
    }


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Host values that every process holds alike -> replicated global arrays.

    Each process fills its own devices from its own copy: no collective (``jax.device_put``
    would all-gather every value across processes to check they agree). Arrays already on the
    mesh pass through.
    """
    return shard(tree, replicated(mesh))


def split_rows(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Host arrays that every process holds alike -> global arrays split along their first axis
    over the mesh (each device gets its rows; no collective)."""
    return shard(tree, batch_sharded(mesh))


def shard(tree: Any, sharding: NamedSharding) -> Any:
    def place(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            x = np.asarray(x)
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree)


def map_step(
    fn: StepFn, mesh: jax.sharding.Mesh, parallelism: str = "shard_map", *, donate: bool = True
) -> StepFn:
    """``fn(state, batch, rng)`` per device -> a function of the global arrays.

    ``state`` and ``rng`` are replicated, ``batch`` is split along its first axis; ``fn``'s
    outputs must be the same on every device (psum / pmean them), and come back replicated.
    ``donate`` lets the new state reuse the old state's buffers.
    """
    if parallelism == "shard_map":
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P())
        return CompiledOnce(
            jax.jit(mapped, donate_argnums=(0,) if donate else ()),
            getattr(fn, "__name__", None) or fn.func.__name__,
        )
    if parallelism == "pmap":
        return _pmap_adapter(fn, mesh, donate)
    raise ValueError(f"parallelism must be one of {PARALLELISM}; got {parallelism!r}.")


def _pmap_adapter(fn: StepFn, mesh: jax.sharding.Mesh, donate: bool) -> StepFn:
    local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    pmapped = jax.pmap(
        fn,
        axis_name=AXIS,
        in_axes=(0, 0, None),
        devices=local_devices,
        donate_argnums=(0,) if donate else (),
    )
    stacked = NamedSharding(jax.sharding.Mesh(np.array(local_devices), ("local",)), P("local"))

    def to_pmap(x: jax.Array) -> jax.Array:
        # Each local device's own shard (the whole value when replicated, its rows of a batch)
        # given a leading axis of 1: pmap's [L, ...] layout.
        shards = sorted(x.addressable_shards, key=lambda s: local_devices.index(s.device))
        pieces = [s.data[None] for s in shards]
        shape = (len(local_devices),) + pieces[0].shape[1:]
        return jax.make_array_from_single_device_arrays(shape, stacked, pieces)

    def from_pmap(x: jax.Array) -> jax.Array:
        # pmap's per-device copies (all equal) -> one replicated global array.
        pieces = [s.data[0] for s in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(pieces[0].shape, replicated(mesh), pieces)

    def step(state, batch, rng):
        new_state, outputs = pmapped(
            jax.tree.map(to_pmap, state), jax.tree.map(to_pmap, batch), rng
        )
        return jax.tree.map(from_pmap, (new_state, outputs))

    return step


BARRIER_TIMEOUT_SECONDS = 3600  # compiling a large model on a busy host takes minutes
_barriers = itertools.count()


def barrier(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process).

    Through the coordination service, not a collective: gloo gives a new cross-process group 30
    s to assemble, and processes whose compilations finish minutes apart must not fail on that.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.sync_global_processes(
        f"bt_jax:{name}:{next(_barriers)}",
        timeout=BARRIER_TIMEOUT_SECONDS,
        processes=set(range(jax.process_count())),
    )


class CompiledOnce:
    """A jitted function compiled ahead of its first call for each argument signature, then a
    :func:`barrier`, so that its first execution (where cross-process collectives set up their
    groups) starts at the same time on every process, however long each took to compile."""

    def __init__(self, jitted: Callable, name: str):
        self._jitted, self._name, self._compiled = jitted, name, {}

    def __call__(self, *args):
        leaves, treedef = jax.tree.flatten(args)
        signature = (
            treedef,
            tuple(
                (np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None))
                for x in leaves
            ),
        )
        compiled = self._compiled.get(signature)
        if compiled is None:
            compiled = self._compiled[signature] = self._jitted.lower(*args).compile()
            barrier(f"compiled {self._name}")
        return compiled(*args)


def to_host(tree: Any) -> Any:
    """Numpy copies, on every process, of replicated global arrays (this process's copy)."""

    def fetch(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if not x.is_fully_replicated:
            raise ValueError(
                f"to_host reads replicated arrays; this one has sharding {x.sharding}. Use "
                "gather_to_host for arrays split over processes."
            )
        return np.asarray(x.addressable_data(0))

    return jax.tree.map(fetch, tree)


def gather_to_host(tree: Any) -> Any:
    """Numpy copies, on every process, of global arrays split along their first axis."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


HEARTBEAT_TIMEOUT_SECONDS = 60


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
) -> None:
    """``jax.distributed.initialize`` (one process per host); on CPU the cross-process
    collectives go through gloo. Without arguments, JAX reads them from the cluster (Cloud TPU,
    SLURM, Open MPI, Kubernetes JobSet environments).

    heartbeat_timeout_seconds bounds a lost host: when a process dies or freezes, the others
    abort (SIGABRT, exit status 134) within about that long; when process 0 dies, within a second.
    JAX's default is 100 s.
    """
    # Only the CPU backend reads this; harmless where the devices are accelerators.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _use_coordination_barriers_in_orbax()
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )


def _use_coordination_barriers_in_orbax() -> None:
    """Orbax's barriers through the coordination service (with a timeout) rather than gloo
    collectives, which fail when processes arrive more than 30 s apart."""
    from absl import flags
    from orbax.checkpoint._src.multihost import multihost  # defines the flag

    del multihost
    try:
        flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    except (AttributeError, flags.Error):  # a later orbax without the flag: its own default
        pass
