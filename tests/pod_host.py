"""``python tests/pod_host.py ARGS`` runs ``python -m bt_jax.train ARGS`` as one host of a
simulated CPU pod, with each program compiled once for all its hosts.

Why: on XLA's CPU backend the topology fingerprint in JAX's compilation-cache key differs from
process to process (each CPU client describes only its own devices), so the processes of one
job never share a cache entry, and only process 0 writes one: every other simulated host
compiled every program in every start, several at once on two cores. On a TPU or GPU pod the
hosts' keys agree; this launcher makes the CPU processes agree too (the key hashes every
device's id, process and kind instead), and turns on JAX's own sharing of a freshly compiled
binary between hosts (process 0 compiles, the others load it); every process writes its own
process-local programs (one device each) to the cache, which JAX leaves to process 0 alone (on
GCS, many hosts writing one entry contend). Test-only: the trainer itself is run unchanged, as
``-m`` would run it.
"""

import runpy
import sys

import jax
from jax._src import cache_key, compilation_cache, compiler


def _hash_global_devices(hash_obj, devices) -> None:
    for device in devices.flat:
        hash_obj.update(f"{device.id}:{device.process_index}:{device.device_kind};".encode())


def _cache_write_from_any_process(
    key, compile_time_secs, module_name, backend, executable, host_callbacks
) -> None:
    if not host_callbacks:
        compilation_cache.put_executable_and_time(
            key, module_name, executable, backend, int(compile_time_secs)
        )


if __name__ == "__main__":
    # A JAX without this private hook only loses the speed-up: the run itself is unchanged.
    if hasattr(cache_key, "_hash_accelerator_config") and hasattr(compiler, "_cache_write"):
        cache_key._hash_accelerator_config = _hash_global_devices
        compiler._cache_write = _cache_write_from_any_process
        jax.config.update("jax_share_binary_between_hosts", True)
    sys.argv[0] = "bt_jax.train"
    runpy.run_module("bt_jax.train", run_name="__main__", alter_sys=True)
