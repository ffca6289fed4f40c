"""``python tests/pod_host.py ARGS`` runs ``python -m bt_jax.train ARGS`` as one host of a
simulated CPU pod, with each program compiled once for all its hosts and all the job's starts.

Why: on XLA's CPU backend the topology fingerprint in JAX's compilation-cache key differs from
process to process (each CPU client describes only its own devices), so the processes of one
job never share a cache entry, and only process 0 writes one: every other simulated host
compiled every program in every start, several at once on two cores. On a TPU or GPU pod the
hosts' keys agree; this launcher makes the CPU processes agree too, and the job's
factorisations of the same 4 devices (1 x 4, 4 x 1, 2 x 2: the same program over a mesh of 4)
with them: the key hashes the mesh's shape and device kind, not the device ids (a process's CPU
devices are numbered by process) nor the XLA flag that sets the simulated devices per process,
and leaves the device assignment out of the compile options (as JAX itself does on GPUs, and
then loads a binary onto the caller's own devices). It also turns on JAX's own sharing of a
freshly compiled binary between hosts (process 0 compiles, the others load it); every process
writes its own process-local programs (one device each) to the cache, which JAX leaves to
process 0 alone (on GCS, many hosts writing one entry contend). Test-only: the trainer itself
is run unchanged, as ``-m`` would run it.
"""

import runpy
import sys

import jax
from jax._src import cache_key, compilation_cache, compiler


def _hash_mesh_shape(hash_obj, devices) -> None:
    kinds = sorted({device.device_kind for device in devices.flat})
    hash_obj.update(f"{devices.shape}:{kinds};".encode())


def _hash_compile_options_without_devices(hash_obj, options, strip_device_assignment=False):
    del strip_device_assignment
    _hash_compile_options(hash_obj, options, strip_device_assignment=True)


def _cache_write_from_any_process(
    key, compile_time_secs, module_name, backend, executable, host_callbacks
) -> None:
    if not host_callbacks:
        compilation_cache.put_executable_and_time(
            key, module_name, executable, backend, int(compile_time_secs)
        )


if __name__ == "__main__":
    # A JAX without this private hook only loses the speed-up: the run itself is unchanged.
    if all(
        hasattr(module, name)
        for module, name in (
            (cache_key, "_hash_accelerator_config"),
            (cache_key, "_hash_serialized_compile_options"),
            (cache_key, "xla_flags_to_exclude_from_cache_key"),
            (compiler, "_cache_write"),
        )
    ):
        _hash_compile_options = cache_key._hash_serialized_compile_options
        cache_key._hash_accelerator_config = _hash_mesh_shape
        cache_key._hash_serialized_compile_options = _hash_compile_options_without_devices
        cache_key.xla_flags_to_exclude_from_cache_key.append(
            "--xla_force_host_platform_device_count"
        )
        compiler._cache_write = _cache_write_from_any_process
        jax.config.update("jax_share_binary_between_hosts", True)
    sys.argv[0] = "bt_jax.train"
    runpy.run_module("bt_jax.train", run_name="__main__", alter_sys=True)
